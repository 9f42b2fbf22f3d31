// The attention product of the non-local block's softmax modes (embedded and plain gaussian,
// Wang et al., CVPR 2018, eq. 2-3), as one op with its own backward:
//
//   y[n] = g[n] softmax_keys(scale theta[n]^T phi[n])^T     theta [N, D, Q], phi [N, D, K],
//                                                           g [N, Dv, K]  ->  y [N, Dv, Q]
//
// Two implementations. A hand-written CPU kernel (src/ops/attention_kernel.h): 16 queries per
// vector, the logits, softmax and both products of a block in registers and L1, the affinity
// never written out in [Q, K] form; used on CPUs with AVX-512 (its vectors are AVX-512
// registers: on AVX2 it ran 3x slower than ATen) while phi and g of one image fit in L2
// ((D + Dv) K <= 2^16 floats). Otherwise oneDNN's batched matmul and softmax (when built with
// the oneDNN library; ATen's softmax where oneDNN has only its reference kernel), whose GEMMs
// reuse large operands better. BM_SoftmaxAttention
// (bench/bench_attention_nonlocal.cpp) times the op against ATen's bmm/softmax/bmm at the shapes
// of a non-local block in stages 2 and 3 of a CIFAR ResNet. The backward (dtheta, dphi, dg) works
// from the softmax output the forward saves (what ATen's own backward saves too).
//
// Applies to CPU float tensors when either implementation is in the build (the kernel needs GCC
// or Clang) and the kernel policy (ops/dispatch.h) is on; callers keep the ATen form
// otherwise. Double backward is not supported (the ATen form, `--kernels aten`, supports it).
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
