// Convolution kernels chosen by measurement: for inference (conv2d_forward) and, for the narrow
// same-padded convolutions of the attention gates, in training too (same_conv2d).
//
// ATen picks its CPU convolution kernel with a fixed heuristic: a single image whose input has
// at most 20480 elements goes to the im2col + GEMM kernel ("thnn"), everything else to oneDNN.
// For the 3x3 convolutions of small-image networks at batch 1 that choice is often the slower
// one; measured here (2 threads, channels-last, OpenBLAS SkylakeX kernels), per call:
//   16ch 28x28: im2col 64 us, oneDNN 38 us;  64ch 14x14: 88 vs 67 us;  128ch 7x7: 101 vs 89 us;
//   but 32ch 14x14: 34 vs 40 us and 64ch 7x7: 37 vs 40 us.
// conv2d_forward() routes the cases where oneDNN wins to at::mkldnn_convolution, computes the
// same maths, and otherwise calls the module's own forward. It never applies with autograd
// recording, on non-CPU tensors, without oneDNN, or for non-zero padding modes.
// bench/bench_conv.cpp measures both kernels side by side.
#pragma once
#include <torch/torch.h>

#include "dynattn/ops/dispatch.h"

namespace dynattn {

enum class ConvKernel { Aten, OneDnn };

// Which kernel conv2d_forward() uses for this input and convolution.
ConvKernel select_conv2d_kernel(const torch::Tensor& input, const torch::nn::Conv2dImpl& conv);

// Same result as conv.forward(input), with the kernel chosen by select_conv2d_kernel().
torch::Tensor conv2d_forward(torch::nn::Conv2dImpl& conv, const torch::Tensor& input);
// The named candidate of op conv2d_inference (ops/dispatch.h) whatever the preference: tests.
torch::Tensor conv2d_forward_with(const std::string& kernel, torch::nn::Conv2dImpl& conv,
                                  const torch::Tensor& input);

// A 1x1 convolution applied to pooled features [N,C,1,1] (SE, CBAM and BAM gates), computed
// as one matrix product: same result and the same weights as conv.forward(pooled), without the
// convolution machinery, which costs ~10x more per call than the product on a 1x1 map.
torch::Tensor conv1x1_on_pooled(const torch::nn::Conv2dImpl& conv, const torch::Tensor& pooled);

// conv2d(input, weight, bias, stride 1, padding dilation * (k / 2), dilation) for a square odd
// kernel k and groups 1 (bias may be undefined), with a backward made of forward operators.
// LibTorch 1.13 computes such a conv's gradients on CPU with a transposed convolution and a
// weight-gradient kernel that are ~10x slower than forward convolutions when the conv has one or
// two channels on a side (CBAM's 7x7 2 -> 1, BAM's 1x1 C -> 1 and dilated 1 -> 1): the adjoint of
// a same-padded correlation is the correlation with the flipped, transposed kernel, and the
// weight gradient is the correlation of the input with the output gradient (batch and channels
// swapped, stride = dilation); a 1x1 conv's gradients are matrix products. Same maths, same
// result within rounding; no double backward.
torch::Tensor same_conv2d(const torch::Tensor& input, const torch::Tensor& weight,
                          const torch::Tensor& bias, int64_t dilation = 1);

// Whether same_conv2d runs its own direct loops (forward and backward) on this input and weight
// instead of ATen's kernels: a CPU float NCHW input and a small kernel (at most 128
// multiply-adds per output pixel for k > 1, 64 channel pairs for 1x1), where ATen's kernels cost
// several times the arithmetic.
bool same_conv2d_direct(const torch::Tensor& input, const torch::Tensor& weight);

// The same convolution without autograd (bias may be undefined): the forward same_conv2d runs,
// for callers with an autograd node of their own.
torch::Tensor same_conv2d_forward(const torch::Tensor& input, const torch::Tensor& weight,
                                  const torch::Tensor& bias, int64_t dilation = 1);

// The input and weight gradients of that convolution (without bias) for the output gradient
// `grad` (in the input's memory format), as same_conv2d's backward computes them: for callers
// with an autograd node of their own. Gradients not asked for stay undefined.
struct SameConv2dGrads {
  torch::Tensor input, weight;
};
SameConv2dGrads same_conv2d_backward(const torch::Tensor& input, const torch::Tensor& weight,
                                     const torch::Tensor& grad, int64_t dilation,
                                     bool input_grad = true, bool weight_grad = true);

}  // namespace dynattn
