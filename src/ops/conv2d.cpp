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

bool is_channels_last(const torch::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

class SameConv2d : public torch::autograd::Function<SameConv2d> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, const torch::Tensor& bias,
                               int64_t dilation) {
    const int64_t pad = dilation * (weight.size(2) / 2);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["bias"] = bias.numel() > 0;
    return torch::conv2d(input, weight, bias.numel() > 0 ? bias : torch::Tensor(), 1, pad,
                         dilation);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto grad = grads[0].contiguous(saved[0].suggest_memory_format());
    const auto g =
        same_conv2d_backward(saved[0], saved[1], grad, ctx->saved_data["dilation"].toInt(),
                             ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    torch::Tensor grad_bias;
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2))
      grad_bias = grad.sum({0, 2, 3});
    return {g.input, g.weight, grad_bias, torch::Tensor()};
  }
};
}  // namespace

SameConv2dGrads same_conv2d_backward(const torch::Tensor& input, const torch::Tensor& weight,
                                     const torch::Tensor& grad, int64_t dilation, bool input_grad,
                                     bool weight_grad) {
  const int64_t pad = dilation * (weight.size(2) / 2);
  const int64_t n = input.size(0), in_c = weight.size(1), out_c = weight.size(0);
  const auto format = input.suggest_memory_format();
  SameConv2dGrads g;
  if (weight.size(2) == 1) {
    const auto w = weight.reshape({out_c, in_c});
    if (input_grad) {
      if (out_c == 1) {  // dx = grad w: a broadcast product, written in the input's layout
        g.input = torch::empty_like(input);
        torch::mul_out(g.input, grad, w.view({1, in_c, 1, 1}));
      } else {
        g.input = torch::conv2d(grad, w.t().reshape({in_c, out_c, 1, 1}).contiguous(format));
      }
    }
    if (weight_grad) {
      if (is_channels_last(input)) {  // [N*H*W, C] views of both: one product
        g.weight = grad.permute({0, 2, 3, 1})
                       .reshape({-1, out_c})
                       .t()
                       .mm(input.permute({0, 2, 3, 1}).reshape({-1, in_c}));
      } else {
        g.weight =
            torch::bmm(grad.reshape({n, out_c, -1}), input.reshape({n, in_c, -1}).transpose(1, 2))
                .sum(0);
      }
      g.weight = g.weight.view(weight.sizes());
    }
    return g;
  }
  if (input_grad) {
    g.input = torch::conv2d(grad, weight.flip({2, 3}).transpose(0, 1).contiguous(format), {}, 1,
                            pad, dilation);
  }
  if (weight_grad) {
    g.weight = torch::conv2d(input.transpose(0, 1), grad.transpose(0, 1), {}, dilation, pad)
                   .transpose(0, 1)
                   .contiguous();
  }
  return g;
}

torch::Tensor same_conv2d(const torch::Tensor& input, const torch::Tensor& weight,
                          const torch::Tensor& bias, int64_t dilation) {
  TORCH_CHECK(
      input.dim() == 4 && weight.dim() == 4 && weight.size(2) == weight.size(3) &&
          weight.size(2) % 2 == 1 && weight.size(1) == input.size(1) && dilation > 0,
      "same_conv2d: expected input [N,C,H,W], weight [O,C,k,k] with odd k and dilation > 0, "
      "got input ",
      input.sizes(), ", weight ", weight.sizes(), ", dilation ", dilation);
  return SameConv2d::apply(input, weight,
                           bias.defined() ? bias : torch::empty({0}, weight.options()), dilation);
}

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
