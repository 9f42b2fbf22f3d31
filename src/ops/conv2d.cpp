#include "dynattn/ops/conv2d.h"

#include <atomic>

#include "dynattn/core/compat.h"

namespace dynattn {
namespace {
std::atomic<bool> g_selection_enabled{true};

// ATen's own rule (ConvParams::use_mkldnn, LibTorch 1.13 and 2.x) for float CPU input, groups 1:
// oneDNN unless a single small image meets a kernel of at most 3x3.
bool aten_picks_onednn(const torch::Tensor& input, const torch::Tensor& weight) {
  return input.size(0) > 1 || input.numel() > 20480 || (weight.size(-1) > 3 && weight.size(-2) > 3);
}
}  // namespace

void set_conv2d_kernel_selection(bool enabled) {
  g_selection_enabled = enabled;
}
bool conv2d_kernel_selection_enabled() {
  return g_selection_enabled;
}

ConvKernel select_conv2d_kernel(const torch::Tensor& input, const torch::nn::Conv2dImpl& conv) {
  if (!g_selection_enabled || !at::hasMKLDNN()) return ConvKernel::Aten;
  if (torch::GradMode::is_enabled() && (input.requires_grad() || conv.weight.requires_grad()))
    return ConvKernel::Aten;
  const auto& o = conv.options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  if (!input.is_cpu() || input.scalar_type() != torch::kFloat || input.dim() != 4 ||
      o.groups() != 1 || o.transposed() || padding == nullptr ||
      !variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) ||
      aten_picks_onednn(input, conv.weight))
    return ConvKernel::Aten;
  // MACs of this call; oneDNN's fixed cost only pays off on larger convolutions, and the
  // im2col kernel is already good on small feature maps (see the measurements above).
  const auto& k = o.kernel_size();
  const auto& s = o.stride();
  const auto& d = o.dilation();
  const int64_t h = input.size(2), w = input.size(3);
  const int64_t out_h = (h + 2 * (*padding)->at(0) - d->at(0) * (k->at(0) - 1) - 1) / s->at(0) + 1;
  const int64_t out_w = (w + 2 * (*padding)->at(1) - d->at(1) * (k->at(1) - 1) - 1) / s->at(1) + 1;
  const double macs =
      static_cast<double>(o.in_channels()) * o.out_channels() * k->at(0) * k->at(1) * out_h * out_w;
  const bool large_map = h * w >= 28 * 28 && macs >= 1.0e6;
  return (large_map || macs >= 4.0e6) ? ConvKernel::OneDnn : ConvKernel::Aten;
}

torch::Tensor conv2d_forward(torch::nn::Conv2dImpl& conv, const torch::Tensor& input) {
  if (select_conv2d_kernel(input, conv) == ConvKernel::Aten) return conv.forward(input);
  const auto& o = conv.options;
  const auto& padding = *variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  // oneDNN keeps the input's memory format, so the weight must follow it.
  const auto format = input.suggest_memory_format();
  const auto input_c = input.contiguous(format);
  const auto weight = conv.weight.contiguous(format);
  return at::mkldnn_convolution(input_c, weight, conv.bias.defined() ? conv.bias : torch::Tensor(),
                                *padding, *o.stride(), *o.dilation(), o.groups());
}

torch::Tensor conv1x1_on_pooled(const torch::nn::Conv2dImpl& conv, const torch::Tensor& pooled) {
  const auto& o = conv.options;
  TORCH_CHECK(pooled.dim() == 4 && pooled.size(2) == 1 && pooled.size(3) == 1 &&
                  pooled.size(1) == o.in_channels(),
              "conv1x1_on_pooled: expected [N,", o.in_channels(), ",1,1], got ", pooled.sizes());
  TORCH_CHECK(o.kernel_size()->at(0) == 1 && o.kernel_size()->at(1) == 1 && o.groups() == 1,
              "conv1x1_on_pooled: needs a 1x1 convolution without groups");
  const auto weight = conv.weight.view({o.out_channels(), o.in_channels()});
  const auto z = pooled.reshape({pooled.size(0), o.in_channels()});
  const auto y = conv.bias.defined() ? torch::addmm(conv.bias, z, weight.t()) : z.mm(weight.t());
  return y.view({pooled.size(0), o.out_channels(), 1, 1});
}

}  // namespace dynattn
