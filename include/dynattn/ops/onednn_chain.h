// Inference chains in oneDNN's blocked layout.
//
// A plain stack of convolutions (a deployed RepVGG) spends much of its CPU time outside the
// arithmetic when each conv is called on ordinary (NCHW or NHWC) tensors: oneDNN reorders the
// input into its blocked layout and the output back on every call, and the weight too. Keeping
// the activations in the blocked layout (Tensor::to_mkldnn()) between layers, with each weight
// reordered once and cached, removes those passes. Measured here on the deployed RepVGG-A0
// stack (2 threads, PyTorch 1.13, same kernels): 2.2 vs 5.6-8.0 ms at batch 1 and 37 vs 43-50 ms
// at batch 64; `dynattn bench --compare-deployed` reports the whole-model figures.
// The chain applies only to CPU float inference (no autograd) when oneDNN is available and the
// kernel policy (ops/dispatch.h) is dynattn's; callers fall back to the ordinary path
// otherwise, so results never depend on it beyond rounding.
#pragma once
#include <torch/torch.h>

#include "dynattn/ops/dispatch.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dynattn {

// True when `x` (dense) may enter a oneDNN chain: CPU, float, 4-D, no gradient recording.
bool onednn_chain_applicable(const torch::Tensor& x);

// A convolution's weight, reordered once into oneDNN's layout for input in that layout, and
// reused until the weight changes (another tensor, or an in-place update such as loading).
// Copies start with an empty cache; safe to call from several threads.
class PackedConv2d {
 public:
  PackedConv2d() = default;
  PackedConv2d(const PackedConv2d&) {}
  PackedConv2d& operator=(const PackedConv2d&) { return *this; }

  // conv(x) for `x` in oneDNN layout (x.is_mkldnn()); the result stays in that layout.
  torch::Tensor forward(const torch::nn::Conv2dImpl& conv, const torch::Tensor& x);

 private:
  torch::Tensor packed(const torch::nn::Conv2dImpl& conv);
  std::mutex mutex_;
  torch::Tensor packed_;
  const void* source_ = nullptr;  // the weight's TensorImpl the cache was made from
  int64_t version_ = -1;          // and its version counter then
};

// A plain stack of conv (+ bias) + ReLU layers run by the oneDNN library itself (libdnnl, the
// same library ATen uses here), for the inference of deployed RepVGG models.
//
// What it adds over PackedConv2d (ATen's oneDNN convolution on blocked tensors):
// - the ReLU runs inside each conv (a oneDNN post-op), not as another pass over the map;
// - each layer may run as a Winograd convolution (oneDNN's F(4x4,3x3) / F(2x2,3x3) kernels for
//   AVX-512), which ATen never requests. Winograd does 2.25-4x fewer multiplications for 3x3
//   stride-1 convs, at the price of a rounding error a few times larger than a direct
//   convolution's (tests/ops/test_onednn_chain.cpp bounds it at 1e-5 of the output scale).
// Algorithms are chosen per layer and input shape: with WinogradPolicy::kMeasured (default) both
// are timed the first time the process meets a layer configuration (input shape, weight shape,
// stride, dilation, padding, bias, thread count), like cudnn.benchmark, and the faster kept for
// that configuration process-wide, so stacks with the same layers run the same algorithms (and
// give bitwise-equal outputs for equal weights). Which one wins depends on channels, map size and
// batch (`dynattn bench --compare-deployed` prints how many layers chose Winograd;
// experiments/reparam compares with `--winograd never`).
// Plans (primitives and reordered weights) are cached per input shape and rebuilt when a weight
// changes. Without oneDNN at build time (DYNATTN_HAVE_ONEDNN unset), available() is false and
// callers keep the PackedConv2d path.
// The policy (WinogradPolicy) is KernelPolicy::winograd of ops/dispatch.h.

class OnednnConvStack {
 public:
  OnednnConvStack();
  ~OnednnConvStack();
  OnednnConvStack(const OnednnConvStack&);  // copies start with an empty cache
  OnednnConvStack& operator=(const OnednnConvStack&);

  static bool available();
  // True when every conv can run here: zero padding, float weights on the CPU.
  static bool supports(const std::vector<const torch::nn::Conv2dImpl*>& convs);
  // relu(conv_n(... relu(conv_1(x)))) for dense 4-D float CPU `x` (NCHW or channels-last);
  // the result is dense NCHW. Inference only: nothing is recorded for autograd.
  // Errors when try_forward() refuses.
  torch::Tensor forward(const std::vector<const torch::nn::Conv2dImpl*>& convs,
                        const torch::Tensor& x);
  // The same, or an undefined tensor when some layer would run oneDNN's reference kernel on
  // this CPU whatever the layout (refusal() then says which and why): the caller takes its next
  // candidate (ops/dispatch.h). Never runs a reference kernel.
  torch::Tensor try_forward(const std::vector<const torch::nn::Conv2dImpl*>& convs,
                            const torch::Tensor& x);
  std::string refusal() const;  // of the last call, empty when it ran
  // Per layer, the oneDNN implementation the last call used (e.g. "jit_wino_4x3:avx512_core").
  std::vector<std::string> implementations() const;

 private:
  struct Plan;
  static void build(Plan& plan, const std::vector<const torch::nn::Conv2dImpl*>& convs,
                    bool may_measure);
  static torch::Tensor run(const Plan& plan, const torch::Tensor& x);
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<Plan>> plans_;
  std::shared_ptr<Plan> last_;
};

}  // namespace dynattn
