// Hand-written CPU kernel for the softmax attention product of ops/softmax_attention.h, one
// image at a time (private to the library; the batch loop and autograd live in
// softmax_attention.cpp).
//
// Queries are taken 16 at a time, one 16-lane vector per key: the logits, the softmax and
// both products stay in registers and L1 for a block of queries, every reduction over keys is
// an element-wise one across vectors, and the affinity is never written out in [Q, K] form.
// At the non-local block's shapes (D and K of a few dozen) a batched GEMM runs these products
// at a fraction of its peak and adds two passes over the affinity around a separate softmax.
#pragma once
#include <cstdint>

namespace dynattn::detail {

// Whether the kernel may run: this build has it (GCC/Clang vector extensions) and the dispatch's
// 16-float forms run here (AVX-512; see the measurement in attention_kernel.cpp).
bool attention_kernel_available();

// Whether the kernel is the better choice: it keeps phi and g of one image in L1/L2 while it
// walks the queries; beyond 2^16 floats of them a batched GEMM reuses its operands better.
bool attention_kernel_suits(int64_t d, int64_t dv, int64_t k);

// Floats of the softmax output a forward saves for its backward: ceil(q/16) blocks of [k][16].
int64_t attention_kernel_probs_size(int64_t q, int64_t k);

// The operands of one forward over `count` images: per image, theta [d, q], phi [d, k] and
// g [dv, k] row-major, `*_stride` floats from one image to the next.
struct AttentionKernelArgs {
  const float* theta = nullptr;
  int64_t theta_stride = 0;
  const float* phi = nullptr;
  int64_t phi_stride = 0;
  const float* g = nullptr;
  int64_t g_stride = 0;
  // When not null: d floats added to theta's rows (a projection's bias, applied in the load).
  const float* theta_bias = nullptr;
  float* y = nullptr;  // [dv, q] per image, y_stride floats apart
  int64_t y_stride = 0;
  // Also writes a row of ones after y's dv rows (y_stride >= (dv + 1) q): the next product can
  // then take a bias as one more weight column.
  bool y_ones_row = false;
  // When not null: y[i] += y_bias[i] (dv floats), then y += y_residual (laid out as y): the
  // block's output when its last projection was applied to g before the product.
  const float* y_bias = nullptr;
  const float* y_residual = nullptr;
  // When not null: the softmax output for the backward, attention_kernel_probs_size floats per
  // image, 64-byte aligned (a tensor's storage is).
  float* probs = nullptr;
  int64_t count = 0, d = 0, dv = 0, q = 0, k = 0;
  float scale = 1.0f;
};

// Images [n0, n1) of a: the operands (and probs) moved on by n0 images, count n1 - n0.
AttentionKernelArgs attention_kernel_images(AttentionKernelArgs a, int64_t n0, int64_t n1);

// y = g softmax_k(scale (theta + theta_bias)^T phi)^T for each image.
void attention_kernel_forward(const AttentionKernelArgs& args);

// Output gradient and input gradients of one backward, `*_stride` floats from one image to the
// next; d_theta, d_phi or d_g may be null when not needed (d_theta is also theta_bias's, per
// image and query).
struct AttentionKernelGrads {
  const float* dy = nullptr;
  int64_t dy_stride = 0;
  float* d_theta = nullptr;
  int64_t d_theta_stride = 0;
  float* d_phi = nullptr;
  int64_t d_phi_stride = 0;
  float* d_g = nullptr;
  int64_t d_g_stride = 0;
};

// Gradients of attention_kernel_forward(a) from the probs it saved (a.probs; a.y is not read).
void attention_kernel_backward(const AttentionKernelArgs& a, const AttentionKernelGrads& grads);

}  // namespace dynattn::detail
