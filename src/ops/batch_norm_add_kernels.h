// The computations of ops/batch_norm_add.h without autograd, for ops that fuse it into their own
// backward (private to the library). Contiguous float CPU tensors, shapes checked by the caller.
#pragma once
#include <torch/torch.h>

namespace dynattn::detail {

// out = BN(z) + residual with batch statistics (mean, 1/sqrt(var + eps) per channel returned);
// running statistics updated when defined and non-empty.
void batch_norm_add_forward(const torch::Tensor& z, const torch::Tensor& residual,
                            const torch::Tensor& weight, const torch::Tensor& bias,
                            const torch::Tensor& running_mean, const torch::Tensor& running_var,
                            double factor, double eps, torch::Tensor& out, torch::Tensor& mean,
                            torch::Tensor& inv_std);

// dz, d_weight, d_bias from the output gradient dy (contiguous) and the forward's statistics.
void batch_norm_add_backward(const torch::Tensor& z, const torch::Tensor& weight,
                             const torch::Tensor& mean, const torch::Tensor& inv_std,
                             const torch::Tensor& dy, torch::Tensor& dz, torch::Tensor& d_weight,
                             torch::Tensor& d_bias);

}  // namespace dynattn::detail
