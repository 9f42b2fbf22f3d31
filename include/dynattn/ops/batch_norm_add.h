// Training-mode batch normalisation followed by a residual add, out = BN(z) + residual, as one
// op with its own backward: two passes over z for the batch statistics (mean, then centred
// squares), one that writes the output, and two in the backward. The running statistics are
// updated as torch::nn::BatchNorm does (unbiased variance, the given averaging factor).
//
// Why: LibTorch 1.13's CPU batch norm is slow on an NCHW tensor with few channels (the
// non-local block's 32 at 14x14), and the add is a pass of its own. BM_BatchNormAdd
// (bench/bench_attention_nonlocal.cpp) times this op against torch::batch_norm + add side by
// side.
//
// Applies to contiguous float CPU tensors with the kernel policy (ops/dispatch.h) on;
// callers keep the ATen form otherwise. Double backward is not supported.
#pragma once
#include <torch/torch.h>

namespace dynattn {

bool batch_norm_add_applicable(const torch::Tensor& z, const torch::Tensor& residual);

// z, residual [N, C, ...]; weight, bias, running_mean, running_var [C] (the running statistics
// may be undefined: then none are kept). factor: the running average's weight of this batch.
torch::Tensor batch_norm_add(const torch::Tensor& z, const torch::Tensor& residual,
                             const torch::Tensor& weight, const torch::Tensor& bias,
                             const torch::Tensor& running_mean, const torch::Tensor& running_var,
                             double factor, double eps);

}  // namespace dynattn
