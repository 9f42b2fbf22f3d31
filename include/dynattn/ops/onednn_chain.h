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
// conv-kernel selection switch (ops/conv2d.h) is on; callers fall back to the ordinary path
// otherwise, so results never depend on it beyond rounding.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <mutex>

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

}  // namespace dynattn
