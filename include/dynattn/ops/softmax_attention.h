// The attention product of the non-local block's softmax modes (embedded and plain gaussian,
// Wang et al., CVPR 2018, eq. 2-3), as one op with its own backward on oneDNN's batched matmul
// and softmax kernels:
//
//   y[n] = g[n] softmax_keys(theta[n]^T phi[n])^T     theta [N, D, Q], phi [N, D, K],
//                                                     g [N, Dv, K]  ->  y [N, Dv, Q]
//
// Why: LibTorch 1.13 runs torch::bmm on the CPU as one BLAS call per sample plus a select per
// operand; oneDNN's brgemm matmul takes the whole batch in one call. BM_SoftmaxAttention
// (bench/bench_attention_nonlocal.cpp) times this op against ATen's bmm/softmax/bmm at the
// shapes of a non-local block in stages 2 and 3 of a CIFAR ResNet. The backward (dtheta, dphi, dg)
// is four more batched products and oneDNN's softmax backward, on the softmax output saved by the
// forward (what ATen's own backward saves too).
//
// Applies to CPU float tensors when dynattn was built with the oneDNN library and the kernel
// selection switch (ops/conv2d.h) is on; callers keep the ATen form otherwise. Double backward
// is not supported (the ATen form, `--kernels aten`, supports it).
#pragma once
#include <torch/torch.h>

namespace dynattn {

bool softmax_attention_applicable(const torch::Tensor& theta, const torch::Tensor& phi,
                                  const torch::Tensor& g);

// y as above with the logits scale theta^T phi (scale folded into the kernel, not a pass over
// theta); records autograd when any input requires grad.
torch::Tensor softmax_attention(const torch::Tensor& theta, const torch::Tensor& phi,
                                const torch::Tensor& g, double scale = 1.0);

}  // namespace dynattn
