#include "dynattn/attention/efficient_channel_attention.h"

#include <cmath>

#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/fused_gates.h"

namespace dynattn {

int64_t eca_kernel_size(int64_t channels, double gamma, double beta) {
  TORCH_CHECK(channels > 0, "ECA: channels must be positive, got ", channels);
  TORCH_CHECK(std::isfinite(gamma) && gamma != 0, "ECA: gamma must be finite and non-zero, got ",
              gamma);
  TORCH_CHECK(std::isfinite(beta), "ECA: beta must be finite, got ", beta);
  const auto t =
      static_cast<int64_t>(std::abs((std::log2(static_cast<double>(channels)) + beta) / gamma));
  // Rounds to the nearest odd size: [odd, odd+1) keeps the odd, [even, even+1) goes up.
  return t % 2 == 1 ? t : t + 1;
}

EfficientChannelAttentionImpl::EfficientChannelAttentionImpl(
    EfficientChannelAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void EfficientChannelAttentionImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.channels() > 0, "ECA: channels must be positive, got ", o.channels());
  TORCH_CHECK(o.kernel_size() >= 0 && (o.kernel_size() == 0 || o.kernel_size() % 2 == 1),
              "ECA: kernel size k must be odd and positive (or 0 for the adaptive size), got ",
              o.kernel_size());
  kernel_size =
      o.kernel_size() > 0 ? o.kernel_size() : eca_kernel_size(o.channels(), o.gamma(), o.beta());
  conv = register_module(
      "conv",
      torch::nn::Conv1d(
          torch::nn::Conv1dOptions(1, 1, kernel_size).padding((kernel_size - 1) / 2).bias(false)));
}

torch::Tensor EfficientChannelAttentionImpl::gate(const torch::Tensor& x) {
  check_attention_input("ECA", x, options.channels());
  const int64_t n = x.size(0);
  // The pooled channels as a 1-channel sequence of length C: [N, 1, C].
  auto y = conv(x.mean({2, 3}).reshape({n, 1, options.channels()}));
  return torch::sigmoid(y).view({n, options.channels(), 1, 1});
}

const KernelOp<EfficientChannelAttentionImpl::KernelCall>&
EfficientChannelAttentionImpl::kernels() {
  using Call = KernelCall;
  static const KernelOp<Call> op(
      "eca",
      {// Inference: one fused kernel instead of the ATen operators of gate().
       {"fused",
        [](const Call& c) {
          return fused_gates_apply(c.x, {c.self->conv->weight, c.self->conv->bias});
        },
        [](const Call& c) {
          return fused_efficient_channel_attention(c.x, c.self->conv->weight, c.self->conv->bias);
        }},
       // Training: one autograd node with a two-pass backward instead of ATen's operator chain.
       {"fused_train",
        [](const Call& c) {
          return fused_gates_train_apply(c.x, {c.self->conv->weight, c.self->conv->bias});
        },
        [](const Call& c) {
          return fused_efficient_channel_attention_train(c.x, c.self->conv->weight,
                                                         c.self->conv->bias);
        }},
       {"aten", always_applies<Call>, [](const Call& c) { return c.x * c.self->gate(c.x); }}});
  return op;
}

torch::Tensor EfficientChannelAttentionImpl::forward(const torch::Tensor& x) {
  check_attention_input("ECA", x, options.channels());
  return kernels()({this, x});
}

std::string EfficientChannelAttentionImpl::kernel_for(const torch::Tensor& x) {
  return kernels().chosen({this, x});
}

torch::Tensor EfficientChannelAttentionImpl::forward_with(const std::string& kernel,
                                                          const torch::Tensor& x) {
  check_attention_input("ECA", x, options.channels());
  return kernels().run(kernel, {this, x});
}

AttentionOutput EfficientChannelAttentionImpl::forward_with_maps(const torch::Tensor& x) {
  return gated_output(x, gate(x));
}

void EfficientChannelAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::EfficientChannelAttention(channels=" << options.channels()
         << ", k=" << kernel_size << ")";
}

AttentionInfo efficient_channel_attention_info() {
  return {"eca", "Efficient Channel Attention (Wang et al., CVPR 2020); k, gamma, beta",
          [](int64_t channels, const OptionMap& o) {
            o.check_known({"k", "gamma", "beta"});
            return torch::nn::AnyModule(
                EfficientChannelAttention(EfficientChannelAttentionOptions(channels)
                                              .kernel_size(o.get_int("k", 0))
                                              .gamma(o.get_double("gamma", 2))
                                              .beta(o.get_double("beta", 1))));
          }};
}

}  // namespace dynattn
