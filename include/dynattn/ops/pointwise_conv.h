// A 1x1 convolution (stride 1, no groups, optional bias) of a channels-first batch
// [N, C_in, spatial...], forward and backward as oneDNN products with the weight shared across
// the batch (ops/strided_matmul.h): y[n] = W x[n] + b, dx[n] = W^T dy[n], dW = sum_n dy[n] x[n]^T.
//
// Why: LibTorch 1.13 runs a 1x1 convolution of an NCHW tensor through oneDNN with a reorder to
// and from the blocked layout on each side, forward and backward; at the non-local block's
// shapes those reorders cost more than the products. BM_PointwiseConv
// (bench/bench_attention_nonlocal.cpp) times this op against torch::conv2d side by side.
//
// Applies to float CPU tensors when dynattn was built with the oneDNN library and the kernel
// policy (ops/dispatch.h) is dynattn's; callers keep the ATen convolution otherwise. Double
// backward is not supported.
#pragma once
#include <torch/torch.h>

namespace dynattn {

bool pointwise_conv_applicable(const torch::Tensor& x, const torch::Tensor& weight);

// weight [C_out, C_in, 1, ...] (as many 1s as x has spatial dimensions); bias [C_out] or
// undefined. Records autograd when any input requires grad.
torch::Tensor pointwise_conv(const torch::Tensor& x, const torch::Tensor& weight,
                             const torch::Tensor& bias);

}  // namespace dynattn
