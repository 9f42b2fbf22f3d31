#include "dynattn/models/conv_bn.h"

#include "dynattn/ops/conv2d.h"
#include "dynattn/reparam/fold_batch_norm.h"

namespace dynattn {

ConvBnImpl::ConvBnImpl(ConvBnOptions options_) : options(std::move(options_)) {
  reset();
}

void ConvBnImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.in_channels() > 0 && o.out_channels() > 0 && o.kernel_size() > 0 &&
                  o.stride() > 0 && o.groups() > 0,
              "ConvBn: channels, kernel size, stride and groups must be positive, got in=",
              o.in_channels(), " out=", o.out_channels(), " kernel=", o.kernel_size(),
              " stride=", o.stride(), " groups=", o.groups());
  TORCH_CHECK(o.in_channels() % o.groups() == 0 && o.out_channels() % o.groups() == 0,
              "ConvBn: groups=", o.groups(), " must divide in_channels=", o.in_channels(),
              " and out_channels=", o.out_channels());
  const int64_t padding = o.padding() >= 0 ? o.padding() : o.kernel_size() / 2;
  conv = register_module(
      "conv",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), o.kernel_size())
                            .stride(o.stride())
                            .padding(padding)
                            .groups(o.groups())
                            .bias(o.deployed())));
  bn = o.deployed() ? nullptr : register_module("bn", torch::nn::BatchNorm2d(o.out_channels()));
}

torch::Tensor ConvBnImpl::forward(const torch::Tensor& x) {
  auto y = conv2d_forward(*conv, x);
  if (!bn.is_empty()) y = bn(y);
  return options.relu() ? y.relu_() : y;
}

std::vector<std::string> ConvBnImpl::reparameterize() {
  if (options.deployed()) return {};
  auto fused = fold_conv_bn(*conv, *bn, name() + " conv+bn");
  unregister_module("bn");
  bn = nullptr;
  conv = torch::nn::Conv2d(replace_module("conv", fused));
  options.deployed(true);
  return {"conv+bn"};
}

void ConvBnImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "dynattn::ConvBn(" << o.in_channels() << ", " << o.out_channels()
         << ", kernel_size=" << o.kernel_size() << ", stride=" << o.stride();
  if (o.groups() != 1) stream << ", groups=" << o.groups();
  if (o.relu()) stream << ", relu";
  if (o.deployed()) stream << ", deployed";
  stream << ")";
}

}  // namespace dynattn
