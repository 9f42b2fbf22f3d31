// Matrix square root of a batch of symmetric positive (semi-)definite matrices by the coupled
// Newton-Schulz iteration, as in Lin & Maji, "Improved Bilinear Pooling with CNNs" (BMVC 2017)
// and Li et al., "Towards Faster Training of Global Covariance Pooling Networks by Iterative
// Matrix Square Root Normalization" (iSQRT-COV, CVPR 2018). Deviations: none in the maths;
// gradients come from autograd through the iterations instead of a hand-written backward.
#pragma once
#include <torch/torch.h>

#include <string>

namespace dynattn {

struct MatrixSqrtOptions {
  TORCH_ARG(int64_t, iterations) = 5;
  // Pre-normalisation that puts the eigenvalues in (0, 1], where the iteration converges:
  // "frobenius" (Lin & Maji: ||A||_F >= lambda_max, the faster of the two) or "trace"
  // (iSQRT-COV: tr(A)).
  TORCH_ARG(std::string, normalization) = "frobenius";
};

// sqrt(A) for A of shape [N,C,C] (symmetric, positive semi-definite), approximately, in the
// dtype and on the device of A:
//   c = ||A||_F or tr(A);  Y0 = A / c,  Z0 = I;
//   T_k = (3I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k;   sqrt(A) ~ sqrt(c) Y_n.
// Y_k converges quadratically to sqrt(A/c) once the normalised eigenvalues are near 1; tiny
// eigenvalues converge slowly (each iteration multiplies them by about 1.5), so a
// rank-deficient Gram matrix needs more iterations for the same error. The first iteration
// (Z0 = I) and the last (Z_n unused) are shortened, so n iterations cost 3n - 3 batched
// matrix products for n >= 2 (1 for n = 1), each N*C^3 MACs. An all-zero matrix gives zeros
// (c is clamped to 1e-30 to avoid 0/0).
torch::Tensor matrix_sqrt_newton_schulz(const torch::Tensor& a,
                                        const MatrixSqrtOptions& options = MatrixSqrtOptions());

}  // namespace dynattn
