#include "dynattn/ops/onednn_chain.h"

#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"

namespace dynattn {

bool onednn_chain_applicable(const torch::Tensor& x) {
  return conv2d_kernel_selection_enabled() && at::hasMKLDNN() && x.is_cpu() && !x.is_mkldnn() &&
         x.scalar_type() == torch::kFloat && x.dim() == 4 && !torch::GradMode::is_enabled();
}

torch::Tensor PackedConv2d::packed(const torch::nn::Conv2dImpl& conv) {
  const auto& w = conv.weight;
  const auto& o = conv.options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  TORCH_CHECK(padding != nullptr, "PackedConv2d: needs explicit padding");
  auto pack = [&] {
    return at::mkldnn_reorder_conv2d_weight(w.detach().contiguous().to_mkldnn(), **padding,
                                            *o.stride(), *o.dilation(), o.groups());
  };
  // An inference tensor (made under InferenceMode) has no version counter, so an in-place
  // change could not be seen: such weights are packed on every call.
  if (w.is_inference()) return pack();
  std::lock_guard<std::mutex> lock(mutex_);
  if (!packed_.defined() || source_ != w.unsafeGetTensorImpl() || version_ != w._version()) {
    packed_ = pack();
    source_ = w.unsafeGetTensorImpl();
    version_ = w._version();
  }
  return packed_;
}

torch::Tensor PackedConv2d::forward(const torch::nn::Conv2dImpl& conv, const torch::Tensor& x) {
  TORCH_CHECK(x.is_mkldnn(), "PackedConv2d: the input must be in oneDNN layout (to_mkldnn())");
  const auto& o = conv.options;
  TORCH_CHECK(variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) != nullptr,
              "PackedConv2d: only zero padding");
  const auto weight = packed(conv);
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  return at::mkldnn_convolution(x, weight, conv.bias.defined() ? conv.bias : torch::Tensor(),
                                **padding, *o.stride(), *o.dilation(), o.groups());
}

}  // namespace dynattn
