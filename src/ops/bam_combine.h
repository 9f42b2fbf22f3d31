// BAM's combine y = x + x * sigmoid(M_c + M_s) (M_c * M_s with `product`) and its backward
// without autograd, for the training nodes that contain it (private to the library): the
// kernels of ops/fused_gates.cpp. x float [N,C,H,W], contiguous or channels-last; mc [N,C] and
// ms [N,H*W] contiguous float.
#pragma once
#include <torch/torch.h>

namespace dynattn::detail {

// y in x's layout.
torch::Tensor bam_combine_forward(const torch::Tensor& x, const torch::Tensor& mc,
                                  const torch::Tensor& ms, bool product);

// dx (x's layout), dmc [N,C] and dms [N,H*W] from the output gradient `grad`, the gate
// recomputed from mc and ms.
void bam_combine_backward(const torch::Tensor& x, const torch::Tensor& grad,
                          const torch::Tensor& mc, const torch::Tensor& ms, bool product,
                          torch::Tensor& dx, torch::Tensor& dmc, torch::Tensor& dms);

}  // namespace dynattn::detail
