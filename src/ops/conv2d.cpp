#include "dynattn/ops/conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "dynattn/core/compat.h"
#include "dynattn/profile/mac_counter.h"
#include "lane_conv.h"
#include "vector_clones.h"

namespace dynattn {
namespace {

// ATen's own rule (ConvParams::use_mkldnn, LibTorch 1.13 and 2.x) for float CPU input, groups 1:
// oneDNN unless a single small image meets a kernel of at most 3x3.
bool aten_picks_onednn(const torch::Tensor& input, const torch::Tensor& weight) {
  return input.size(0) > 1 || input.numel() > 20480 || (weight.size(-1) > 3 && weight.size(-2) > 3);
}

bool is_channels_last(const torch::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

// ---- Direct loops for convolutions with few channels ----
// oneDNN and ATen's backward kernels are built for wide convolutions: on 1..4 channels they spend
// their time in set-up and layout work, not arithmetic (N=64, 28x28, one thread: a 1 -> 1
// dilated 3x3 conv takes 0.73 ms forward; its work is 0.45 M multiply-adds). These loops run
// each tap as a product over the valid part of each row, where the compiler vectorises it.
// NCHW float only; weight [O,I,k,k] row-major.

// Where the direct loops beat ATen's kernels (forward + backward, N=64 and 1, one thread): up to
// 128 multiply-adds per pixel (in * out * k * k) for k > 1 (2 -> 1 7x7 at 28x28: 3.3 vs 12.1
// ms; 2 -> 2 3x3 dilated at 14x14: 0.42 vs 0.61 ms; but 4 -> 4 at 7x7: 0.48 vs 0.33 ms), and up
// to 64 channel pairs for 1x1 (16 -> 1 at 28x28: 1.2 vs 4.3 ms; 32 -> 2 at 14x14: 1.06 vs 1.20
// ms; but 64 -> 4 at 7x7: 1.24 vs 0.60 ms, where a matrix product is the better kernel).
constexpr int64_t kDirectMaxTaps = 128;
constexpr int64_t kDirectMaxPairs1x1 = 64;

struct PlaneShape {
  int64_t h, w, k, dilation;
};

// The rows and columns where the tap (a, b) reads inside the plane: output (y, x) reads input
// (y + dy, x + dx).
struct TapWindow {
  int64_t dy, dx, y0, y1, x0, x1;
  TapWindow(const PlaneShape& s, int64_t a, int64_t b) {
    const int64_t r = s.k / 2;
    dy = s.dilation * (a - r);
    dx = s.dilation * (b - r);
    y0 = std::max<int64_t>(0, -dy);
    y1 = std::min<int64_t>(s.h, s.h - dy);
    x0 = std::max<int64_t>(0, -dx);
    x1 = std::min<int64_t>(s.w, s.w - dx);
  }
};

// out[o] = sum_i sum_taps weight[o, i, a, b] * in[i] shifted by the tap, one image. With
// `adjoint`, the transposed, flipped kernel (the input gradient of the convolution with weight
// [cin, cout, k, k], in = the output gradient).
DYNATTN_VECTOR_CLONES
void direct_conv_image(const float* in, int64_t cin, float* out, int64_t cout, const float* weight,
                       const PlaneShape& s, bool adjoint) {
  const int64_t plane = s.h * s.w, k = s.k;
  std::fill(out, out + cout * plane, 0.0f);  // here, while the image is in cache
  for (int64_t o = 0; o < cout; ++o) {
    float* __restrict__ op = out + o * plane;
    for (int64_t i = 0; i < cin; ++i) {
      const float* __restrict__ ip = in + i * plane;
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = 0; b < k; ++b) {
          const float wv = adjoint ? weight[((i * cout + o) * k + (k - 1 - a)) * k + (k - 1 - b)]
                                   : weight[((o * cin + i) * k + a) * k + b];
          const TapWindow t(s, a, b);
          if (t.x0 == 0 && t.x1 == s.w) {  // whole rows: one run over the block of rows
            const float* src = ip + (t.y0 + t.dy) * s.w + t.dx;
            float* dst = op + t.y0 * s.w;
            const int64_t n = (t.y1 - t.y0) * s.w;
            for (int64_t j = 0; j < n; ++j) dst[j] += wv * src[j];
            continue;
          }
          for (int64_t y = t.y0; y < t.y1; ++y) {
            const float* src = ip + (y + t.dy) * s.w + t.dx;
            float* dst = op + y * s.w;
            for (int64_t x = t.x0; x < t.x1; ++x) dst[x] += wv * src[x];
          }
        }
      }
    }
  }
}

// gw[o, i, a, b] += sum over the pixels of g[o] * in[i] shifted by the tap, one image.
DYNATTN_VECTOR_CLONES
void direct_conv_weight_grad_image(const float* in, int64_t cin, const float* g, int64_t cout,
                                   const PlaneShape& s, float* gw) {
  constexpr int kLanes = 8;  // independent partial sums: vectorised without reassociation
  const int64_t plane = s.h * s.w, k = s.k;
  for (int64_t o = 0; o < cout; ++o) {
    for (int64_t i = 0; i < cin; ++i) {
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = 0; b < k; ++b) {
          const TapWindow t(s, a, b);
          float acc[kLanes] = {};
          for (int64_t y = t.y0; y < t.y1; ++y) {
            const float* __restrict__ src = in + i * plane + (y + t.dy) * s.w + t.dx;
            const float* __restrict__ gr = g + o * plane + y * s.w;
            int64_t x = t.x0;
            for (; x + kLanes <= t.x1; x += kLanes)
              for (int l = 0; l < kLanes; ++l) acc[l] += gr[x + l] * src[x + l];
            for (int l = 0; x < t.x1; ++x, ++l) acc[l] += gr[x] * src[x];
          }
          float total = 0.0f;
          for (int l = 0; l < kLanes; ++l) total += acc[l];
          gw[((o * cin + i) * k + a) * k + b] += total;
        }
      }
    }
  }
}

bool direct_applies(const torch::Tensor& input, const torch::Tensor& weight) {
  const bool small = weight.size(2) == 1 ? weight.size(0) * weight.size(1) <= kDirectMaxPairs1x1
                                         : weight.numel() <= kDirectMaxTaps;
  return small && input.is_cpu() && input.scalar_type() == torch::kFloat &&
         weight.scalar_type() == torch::kFloat && input.is_contiguous() && input.numel() > 0;
}

#ifdef DYNATTN_HAVE_VEC16
// From this batch on, a k x k conv (k > 1) runs on the lane layout of ops/lane_conv.h (the
// images side by side in each vector, padding taps skipped) instead of per image along rows:
// CBAM's 2 -> 1 7x7 on 7x7 maps spends the per-row loops on runs of 1 to 7 pixels.
constexpr int64_t kLaneMinBatch = 8;

bool lanes_apply(int64_t batch, int64_t k) {
  return batch >= kLaneMinBatch && k > 1 && k % 2 == 1 && k <= detail::kLaneConvMaxKernel;
}

// direct_conv on the lane layout: transposes in and out around detail::lane_conv.
torch::Tensor lane_direct_conv(const torch::Tensor& input, const torch::Tensor& w, int64_t cout,
                               int64_t dilation, bool adjoint) {
  const int64_t cin = input.size(1), k = w.size(2);
  const detail::LaneShape g{input.size(0), input.size(2), input.size(3)};
  auto in = detail::lane_buffer(cin, g, input.options());
  auto out_lanes = detail::lane_buffer(cout, g, input.options());
  detail::to_lanes(input.data_ptr<float>(), cin, g, in.data_ptr<float>());
  if (adjoint) {
    detail::lane_conv_input_grad(in.data_ptr<float>(), cin, w.data_ptr<float>(), cout, k, dilation,
                                 g, out_lanes.data_ptr<float>());
  } else {
    detail::lane_conv(in.data_ptr<float>(), cin, w.data_ptr<float>(), nullptr, cout, k, dilation, g,
                      out_lanes.data_ptr<float>());
  }
  auto out = torch::empty({g.n, cout, g.h, g.w}, input.options());
  detail::from_lanes(out_lanes.data_ptr<float>(), cout, g, out.data_ptr<float>());
  return out;
}
#endif

// conv(input, weight) (adjoint: the input gradient for output gradient `input`), NCHW.
torch::Tensor direct_conv(const torch::Tensor& input, const torch::Tensor& weight, int64_t dilation,
                          bool adjoint) {
  const int64_t n = input.size(0), cin = input.size(1), k = weight.size(2);
  const int64_t cout = adjoint ? weight.size(1) : weight.size(0);
  const PlaneShape s{input.size(2), input.size(3), k, dilation};
  const auto w = weight.contiguous();
#ifdef DYNATTN_HAVE_VEC16
  if (lanes_apply(n, k)) return lane_direct_conv(input, w, cout, dilation, adjoint);
#endif
  auto out = torch::empty({n, cout, s.h, s.w}, input.options());
  const float* ip = input.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, w.numel() * s.h * s.w));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      direct_conv_image(ip + i * cin * s.h * s.w, cin, op + i * cout * s.h * s.w, cout, wp, s,
                        adjoint);
  });
  return out;
}

torch::Tensor direct_conv_weight_grad(const torch::Tensor& input, const torch::Tensor& grad,
                                      const torch::Tensor& weight, int64_t dilation) {
  const int64_t n = input.size(0), cin = input.size(1), cout = grad.size(1);
  const PlaneShape s{input.size(2), input.size(3), weight.size(2), dilation};
  const auto g = grad.contiguous();
#ifdef DYNATTN_HAVE_VEC16
  if (lanes_apply(n, s.k)) {
    const detail::LaneShape lg{n, s.h, s.w};
    auto in = detail::lane_buffer(cin, lg, input.options());
    auto d_out = detail::lane_buffer(cout, lg, input.options());
    detail::to_lanes(input.data_ptr<float>(), cin, lg, in.data_ptr<float>());
    detail::to_lanes(g.data_ptr<float>(), cout, lg, d_out.data_ptr<float>());
    auto gw = torch::empty(weight.sizes(), input.options());
    detail::lane_conv_weight_grad(d_out.data_ptr<float>(), cout, in.data_ptr<float>(), cin, s.k,
                                  dilation, lg, gw.data_ptr<float>());
    return gw;
  }
#endif
  auto gw = torch::zeros(weight.sizes(), input.options());
  const float* ip = input.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* out = gw.data_ptr<float>();
  std::mutex merge;
  const int64_t grain =
      std::max<int64_t>(1, 32768 / std::max<int64_t>(1, weight.numel() * s.h * s.w));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> partial(weight.numel(), 0.0f);
    for (int64_t i = begin; i < end; ++i)
      direct_conv_weight_grad_image(ip + i * cin * s.h * s.w, cin, gp + i * cout * s.h * s.w, cout,
                                    s, partial.data());
    std::lock_guard<std::mutex> lock(merge);
    for (size_t j = 0; j < partial.size(); ++j) out[j] += partial[j];
  });
  return gw;
}

class SameConv2d : public torch::autograd::Function<SameConv2d> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, const torch::Tensor& bias,
                               int64_t dilation) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["bias"] = bias.numel() > 0;
    return same_conv2d_forward(input, weight, bias.numel() > 0 ? bias : torch::Tensor(), dilation);
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

torch::Tensor same_conv2d_forward(const torch::Tensor& input, const torch::Tensor& weight,
                                  const torch::Tensor& bias, int64_t dilation) {
  if (!direct_applies(input, weight)) {
    return torch::conv2d(input, weight, bias, 1, dilation * (weight.size(2) / 2), dilation);
  }
  // Outside ATen's operators: counted as aten::convolution would count it.
  record_macs("dynattn::same_conv2d",
              input.size(0) * input.size(2) * input.size(3) * weight.numel());
  auto out = direct_conv(input, weight, dilation, false);
  if (bias.defined()) out.add_(bias.view({1, -1, 1, 1}));
  return out;
}

bool same_conv2d_direct(const torch::Tensor& input, const torch::Tensor& weight) {
  return direct_applies(input, weight);
}

SameConv2dGrads same_conv2d_backward(const torch::Tensor& input, const torch::Tensor& weight,
                                     const torch::Tensor& grad, int64_t dilation, bool input_grad,
                                     bool weight_grad) {
  const int64_t pad = dilation * (weight.size(2) / 2);
  const int64_t n = input.size(0), in_c = weight.size(1), out_c = weight.size(0);
  const auto format = input.suggest_memory_format();
  SameConv2dGrads g;
  if (direct_applies(input, weight)) {
    const auto grad_c = grad.contiguous();
    if (input_grad) g.input = direct_conv(grad_c, weight, dilation, true);
    if (weight_grad) g.weight = direct_conv_weight_grad(input, grad_c, weight, dilation);
    return g;
  }
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

namespace {

struct ConvCall {
  torch::nn::Conv2dImpl* conv;
  const torch::Tensor& input;
};

// The rule of conv2d_inference's "onednn" candidate (ops/dispatch.h).
bool onednn_conv_applies(const ConvCall& c) {
  const auto& input = c.input;
  const auto& conv = *c.conv;
  if (!at::hasMKLDNN()) return false;
  if (torch::GradMode::is_enabled() && (input.requires_grad() || conv.weight.requires_grad()))
    return false;
  const auto& o = conv.options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  if (!input.is_cpu() || input.scalar_type() != torch::kFloat || input.dim() != 4 ||
      o.groups() != 1 || o.transposed() || padding == nullptr ||
      !variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) ||
      aten_picks_onednn(input, conv.weight))
    return false;
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
  return large_map || macs >= 4.0e6;
}

torch::Tensor onednn_conv(const ConvCall& c) {
  const auto& o = c.conv->options;
  const auto& padding = *variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  // oneDNN keeps the input's memory format, so the weight must follow it.
  const auto format = c.input.suggest_memory_format();
  const auto input_c = c.input.contiguous(format);
  const auto weight = c.conv->weight.contiguous(format);
  return at::mkldnn_convolution(input_c, weight,
                                c.conv->bias.defined() ? c.conv->bias : torch::Tensor(), *padding,
                                *o.stride(), *o.dilation(), o.groups());
}

const KernelOp<ConvCall>& conv2d_inference() {
  static const KernelOp<ConvCall> op(
      "conv2d_inference", {{"onednn", onednn_conv_applies, onednn_conv},
                           {"aten", always_applies<ConvCall>,
                            [](const ConvCall& c) { return c.conv->forward(c.input); }}});
  return op;
}

}  // namespace

ConvKernel select_conv2d_kernel(const torch::Tensor& input, const torch::nn::Conv2dImpl& conv) {
  const ConvCall call{const_cast<torch::nn::Conv2dImpl*>(&conv), input};
  return conv2d_inference().choose(call) == 0 ? ConvKernel::OneDnn : ConvKernel::Aten;
}

torch::Tensor conv2d_forward(torch::nn::Conv2dImpl& conv, const torch::Tensor& input) {
  return conv2d_inference()({&conv, input});
}

torch::Tensor conv2d_forward_with(const std::string& kernel, torch::nn::Conv2dImpl& conv,
                                  const torch::Tensor& input) {
  return conv2d_inference().run(kernel, {&conv, input});
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
