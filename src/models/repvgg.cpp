#include "dynattn/models/repvgg.h"

#include <algorithm>

#include "dynattn/ops/conv2d.h"
#include "dynattn/reparam/fold_batch_norm.h"

namespace dynattn {

RepVGGBlockImpl::RepVGGBlockImpl(RepVGGBlockOptions options_) : options(std::move(options_)) {
  reset();
}

void RepVGGBlockImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.in_channels() > 0 && o.out_channels() > 0 && o.stride() > 0 && o.groups() > 0,
              "RepVGGBlock: channels, stride and groups must be positive, got in=", o.in_channels(),
              " out=", o.out_channels(), " stride=", o.stride(), " groups=", o.groups());
  TORCH_CHECK(o.in_channels() % o.groups() == 0 && o.out_channels() % o.groups() == 0,
              "RepVGGBlock: groups=", o.groups(), " must divide in_channels=", o.in_channels(),
              " and out_channels=", o.out_channels());
  rbr_dense = rbr_1x1 = nullptr;
  rbr_identity = nullptr;
  rbr_reparam = nullptr;
  if (o.deployed()) {
    rbr_reparam = register_module(
        "rbr_reparam",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), 3)
                              .stride(o.stride())
                              .padding(1)
                              .groups(o.groups())
                              .bias(true)));
    return;
  }
  if (o.in_channels() == o.out_channels() && o.stride() == 1)
    rbr_identity = register_module("rbr_identity", torch::nn::BatchNorm2d(o.in_channels()));
  rbr_dense =
      register_module("rbr_dense", ConvBn(ConvBnOptions(o.in_channels(), o.out_channels(), 3)
                                              .stride(o.stride())
                                              .padding(1)
                                              .groups(o.groups())));
  rbr_1x1 = register_module("rbr_1x1", ConvBn(ConvBnOptions(o.in_channels(), o.out_channels(), 1)
                                                  .stride(o.stride())
                                                  .padding(0)
                                                  .groups(o.groups())));
}

torch::Tensor RepVGGBlockImpl::forward(const torch::Tensor& x) {
  if (!rbr_reparam.is_empty()) return conv2d_forward(*rbr_reparam, x).relu_();
  auto y = rbr_dense(x);
  y.add_(rbr_1x1(x));
  if (!rbr_identity.is_empty()) y.add_(rbr_identity(x));
  return y.relu_();
}

torch::Tensor RepVGGBlockImpl::forward_onednn(const torch::Tensor& x) {
  TORCH_CHECK(!rbr_reparam.is_empty(), "RepVGGBlock: forward_onednn needs the deployed form");
  return packed_.forward(*rbr_reparam, x).relu_();
}

std::pair<torch::Tensor, torch::Tensor> RepVGGBlockImpl::equivalent_kernel_bias() const {
  TORCH_CHECK(rbr_reparam.is_empty(), "RepVGGBlock: already deployed, no branches to fuse");
  const std::string where = "RepVGGBlock " + name();
  // Each branch as (3x3 kernel, bias) in double; summed at the end.
  auto branch = [&](const ConvBnImpl& unit, const std::string& label) {
    if (unit.bn.is_empty())  // its BN already folded on its own
      return std::make_pair(unit.conv->weight.to(torch::kDouble),
                            unit.conv->bias.to(torch::kDouble));
    TORCH_CHECK(!unit.bn->is_training(), where, " ", label,
                ": the BatchNorm is in training mode; call eval() before fusing (in training it "
                "normalises with batch statistics, not a fixed affine map)");
    auto folded = fold_batch_norm(unit.conv->weight.to(torch::kDouble), torch::Tensor(),
                                  unit.bn->running_mean, unit.bn->running_var, unit.bn->weight,
                                  unit.bn->bias, unit.bn->options.eps(), where + " " + label);
    return std::make_pair(folded.weight, folded.bias);
  };
  auto [kernel, bias] = branch(*rbr_dense, "rbr_dense");
  auto [k1, b1] = branch(*rbr_1x1, "rbr_1x1");
  kernel = kernel + torch::constant_pad_nd(k1, {1, 1, 1, 1});
  bias = bias + b1;
  if (!rbr_identity.is_empty()) {
    const auto& bn = *rbr_identity;
    TORCH_CHECK(!bn.is_training(), where,
                " rbr_identity: the BatchNorm is in training mode; call eval() before fusing");
    // The identity as a grouped 3x3 conv: output channel c reads input channel c, which is
    // index c % (channels / groups) within its group.
    const int64_t channels = options.in_channels(), per_group = channels / options.groups();
    auto identity = torch::zeros({channels, per_group, 3, 3}, kernel.options());
    for (int64_t c = 0; c < channels; ++c) identity[c][c % per_group][1][1] = 1.0;
    auto folded = fold_batch_norm(identity, torch::Tensor(), bn.running_mean, bn.running_var,
                                  bn.weight, bn.bias, bn.options.eps(), where + " rbr_identity");
    kernel = kernel + folded.weight;
    bias = bias + folded.bias;
  }
  return {kernel, bias};
}

std::vector<std::string> RepVGGBlockImpl::reparameterize() {
  if (!rbr_reparam.is_empty()) return {};
  const auto [kernel, bias] = equivalent_kernel_bias();
  // By value: reset() below drops rbr_dense, and a reference into it would dangle.
  const auto device = rbr_dense->conv->weight.device();
  const auto dtype = rbr_dense->conv->weight.scalar_type();
  std::vector<std::string> merged = {rbr_identity.is_empty()
                                         ? "rbr_dense+rbr_1x1 -> rbr_reparam"
                                         : "rbr_dense+rbr_1x1+rbr_identity -> rbr_reparam"};
  unregister_module("rbr_dense");
  unregister_module("rbr_1x1");
  if (!rbr_identity.is_empty()) unregister_module("rbr_identity");
  options.deployed(true);
  reset();  // registers rbr_reparam only
  torch::NoGradGuard no_grad;
  rbr_reparam->to(device, dtype);
  rbr_reparam->weight.copy_(kernel);
  rbr_reparam->bias.copy_(bias);
  rbr_reparam->eval();
  return merged;
}

void RepVGGBlockImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "dynattn::RepVGGBlock(" << o.in_channels() << ", " << o.out_channels()
         << ", stride=" << o.stride();
  if (o.groups() != 1) stream << ", groups=" << o.groups();
  stream << (o.deployed() ? ", deployed)" : ")");
}

RepVGGOptions RepVGGOptions::family(const std::string& name) {
  RepVGGOptions o;
  if (name == "a0") return o.num_blocks({2, 4, 14, 1}).width_multiplier({0.75, 0.75, 0.75, 2.5});
  if (name == "a1") return o.num_blocks({2, 4, 14, 1}).width_multiplier({1, 1, 1, 2.5});
  if (name == "b0") return o.num_blocks({4, 6, 16, 1}).width_multiplier({1, 1, 1, 2.5});
  TORCH_CHECK(false, "RepVGG: unknown family '", name, "' (known: a0, a1, b0)");
}

RepVGGImpl::RepVGGImpl(RepVGGOptions options_) : options(std::move(options_)) {
  reset();
}

void RepVGGImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.num_blocks().size() == 4 && o.width_multiplier().size() == 4,
              "RepVGG: num_blocks and width_multiplier need 4 entries (stages 1-4), got ",
              o.num_blocks().size(), " and ", o.width_multiplier().size());
  TORCH_CHECK(o.strides().size() == 5, "RepVGG: strides needs 5 entries (stage0-stage4), got ",
              o.strides().size());
  TORCH_CHECK(o.groups() >= 1, "RepVGG: groups must be >= 1, got ", o.groups());
  for (auto n : o.num_blocks()) TORCH_CHECK(n >= 1, "RepVGG: every stage needs a block");
  const auto& a = o.width_multiplier();
  const std::vector<int64_t> widths = {
      static_cast<int64_t>(64 * a[0]), static_cast<int64_t>(128 * a[1]),
      static_cast<int64_t>(256 * a[2]), static_cast<int64_t>(512 * a[3])};
  int64_t in = std::min<int64_t>(64, widths[0]);
  stage0 = register_module(
      "stage0",
      RepVGGBlock(
          RepVGGBlockOptions(o.in_channels(), in).stride(o.strides()[0]).deployed(o.deployed())));
  stages.clear();
  int64_t layer = 1;  // the official code's layer index: blocks of stages 1-4, from 1
  for (size_t s = 0; s < 4; ++s) {
    torch::nn::Sequential stage;
    for (int64_t b = 0; b < o.num_blocks()[s]; ++b, ++layer) {
      const int64_t groups = layer % 2 == 0 ? o.groups() : 1;
      stage->push_back(RepVGGBlock(RepVGGBlockOptions(in, widths[s])
                                       .stride(b == 0 ? o.strides()[s + 1] : 1)
                                       .groups(groups)
                                       .deployed(o.deployed())));
      in = widths[s];
    }
    stages.push_back(register_module("stage" + std::to_string(s + 1), stage));
  }
  linear = register_module("linear", torch::nn::Linear(in, o.num_classes()));
}

torch::Tensor RepVGGImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(), "RepVGG: expected input [N, ",
              options.in_channels(), ", H, W], got ", x.sizes());
  const auto all = blocks();
  const bool plain = std::all_of(all.begin(), all.end(),
                                 [](const RepVGGBlock& b) { return !b->rbr_reparam.is_empty(); });
  if (plain && onednn_chain_applicable(x)) {
    std::vector<const torch::nn::Conv2dImpl*> convs;
    for (const auto& block : all) convs.push_back(block->rbr_reparam.get());
    // The candidates of ops/dispatch.h's deployed_conv_stack, in order: the libdnnl stack
    // (it refuses where a layer would run a reference kernel), ATen's oneDNN convolution on
    // blocked tensors, ATen.
    if (OnednnConvStack::supports(convs) && x.numel() > 0) {
      auto y = conv_stack_.try_forward(convs, x);
      if (y.defined()) return linear(y.mean({2, 3}));
    }
    auto y = x.contiguous().to_mkldnn();
    for (auto block : all) y = block->forward_onednn(y);
    return linear(y.to_dense().mean({2, 3}));
  }
  auto y = stage0(x);
  for (auto& stage : stages) y = stage->forward(y);
  return linear(y.mean({2, 3}));
}

std::vector<std::string> RepVGGImpl::onednn_implementations() const {
  return conv_stack_.implementations();
}

std::vector<std::string> RepVGGImpl::reparameterize() {
  options.deployed(true);
  return {};
}

std::vector<RepVGGBlock> RepVGGImpl::blocks() const {
  std::vector<RepVGGBlock> out = {stage0};
  for (const auto& stage : stages)
    for (const auto& m : stage->children())
      out.emplace_back(std::dynamic_pointer_cast<RepVGGBlockImpl>(m));
  return out;
}

}  // namespace dynattn
