#include "attention_kernel.h"

#include "dynattn/ops/dispatch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec16.h"

namespace dynattn::detail {

namespace {
constexpr int64_t kQueryBlock = 16;  // queries per vector
}  // namespace

bool attention_kernel_suits(int64_t d, int64_t dv, int64_t k) {
  return attention_kernel_available() && (d + dv) * k <= (int64_t{1} << 16);
}

int64_t attention_kernel_probs_size(int64_t q, int64_t k) {
  return (q + kQueryBlock - 1) / kQueryBlock * k * kQueryBlock;
}

AttentionKernelArgs attention_kernel_images(AttentionKernelArgs a, int64_t n0, int64_t n1) {
  a.theta += n0 * a.theta_stride;
  a.phi += n0 * a.phi_stride;
  a.g += n0 * a.g_stride;
  if (a.y != nullptr) a.y += n0 * a.y_stride;
  if (a.y_residual != nullptr) a.y_residual += n0 * a.y_stride;
  if (a.probs != nullptr) a.probs += n0 * attention_kernel_probs_size(a.q, a.k);
  a.count = n1 - n0;
  return a;
}

#ifdef DYNATTN_HAVE_VEC16

namespace {

using namespace vec16;

// s in the first `lanes` lanes, 0 after them.
DYNATTN_ALWAYS_INLINE Vec load_bias(float s, int64_t lanes) {
  Vec v{};
  for (int64_t l = 0; l < lanes; ++l) v[l] = s;
  return v;
}

// exp(x) for x <= 0 (logits minus their row maximum): Cephes' single-precision polynomial after
// x = n ln2 + r, within ~2 ulp; below -87 the result is clamped to ~1.6e-38, not 0, which
// changes a probability by less than a float's resolution. NaN stays NaN.
DYNATTN_ALWAYS_INLINE Vec exp_nonpositive(Vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * (x * x) + x + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;  // 2^n, n >= -126
  return p * (Vec)bits;  // a vector cast reinterprets the bits
}

// out[t] = sum_r rows[r] * m[r * k + t] for t in [0, W): W keys at once, one accumulator each.
template <int W>
DYNATTN_ALWAYS_INLINE void rows_times_keys(const Vec* rows, int64_t r_count, const float* m,
                                           int64_t k, Vec* out) {
  Vec acc[W] = {};
  for (int64_t r = 0; r < r_count; ++r) {
    const Vec v = rows[r];
    const float* row = m + r * k;
#pragma GCC unroll 16
    for (int t = 0; t < W; ++t) acc[t] += v * row[t];
  }
  for (int t = 0; t < W; ++t) out[t] = acc[t];
}

// rows_times_keys<w> for a w <= W known at run time only (0: nothing).
template <int W>
DYNATTN_ALWAYS_INLINE void rows_times_last_keys(int64_t w, const Vec* rows, int64_t r_count,
                                                const float* m, int64_t k, Vec* out) {
  if constexpr (W > 0) {
    if (w == W) return rows_times_keys<W>(rows, r_count, m, k, out);
    rows_times_last_keys<W - 1>(w, rows, r_count, m, k, out);
  }
}

// out[j] (vectors over the block's queries) = sum_r rows[r] (vectors) * m[r * k + j] for
// j in [0, k): the logits (rows = theta, m = phi) and the backward's dP (rows = dy, m = g).
// Keys go 8 at a time; the last 9 to 15 (or the only 1 to 7) in one pass of their own, not one
// key at a time: a single key is a chain of r_count dependent FMAs (at 9 keys it took as long
// as the other 8). Each output's sum runs over r in the same order either way.
DYNATTN_ALWAYS_INLINE void rows_times_matrix(const Vec* rows, int64_t r_count, const float* m,
                                             int64_t k, Vec* out) {
  const int64_t rest = k < 8 ? k : (k % 8 == 0 ? 0 : 8 + k % 8);
  int64_t j = 0;
  for (; j < k - rest; j += 8) rows_times_keys<8>(rows, r_count, m + j, k, out + j);
  rows_times_last_keys<15>(rest, rows, r_count, m + j, k, out + j);
}

// dst (first `lanes` lanes) = acc * factor (+ bias) (+ residual): one output row of
// matrix_times_columns.
DYNATTN_ALWAYS_INLINE void finish_row(Vec acc, Vec factor, const float* bias, const float* residual,
                                      float* dst, int64_t lanes) {
  Vec out = acc * factor;
  if (bias != nullptr) out += *bias;
  if (residual != nullptr) out += load(residual, lanes);
  store(dst, out, lanes);
}

// dst[i * stride] (first `lanes` lanes) = factor * sum_j cols[j] * m[i * k + j] for i in
// [0, count): the output y (cols = probabilities, m = g) and dtheta (cols = dS, m = phi). When
// given, bias[i] and then residual[i * stride] (same lanes) are added to each output.
DYNATTN_ALWAYS_INLINE void matrix_times_columns(const float* m, int64_t count, int64_t k,
                                                const Vec* cols, Vec factor, float* dst,
                                                int64_t stride, int64_t lanes,
                                                const float* bias = nullptr,
                                                const float* residual = nullptr) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    Vec acc[8] = {};
    for (int64_t j = 0; j < k; ++j) {
      const Vec c = cols[j];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] += c * m[(i + t) * k + j];
    }
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t)
      finish_row(acc[t], factor, bias == nullptr ? nullptr : bias + i + t,
                 residual == nullptr ? nullptr : residual + (i + t) * stride,
                 dst + (i + t) * stride, lanes);
  }
  for (; i < count; ++i) {
    Vec acc{};
    for (int64_t j = 0; j < k; ++j) acc += cols[j] * m[i * k + j];
    finish_row(acc, factor, bias == nullptr ? nullptr : bias + i,
               residual == nullptr ? nullptr : residual + i * stride, dst + i * stride, lanes);
  }
}

// One R x J tile (R * J <= 16) of reduce_over_queries at rows r0.., columns j0..: the 16 lane
// sums are folded together. Edge tiles repeat the last row/column, stored once.
template <int R, int J>
DYNATTN_ALWAYS_INLINE void reduce_tile(const Vec* a, int64_t a_count, const Vec* c, int64_t k,
                                       int64_t blocks, int64_t r0, int64_t j0, float* out) {
  static_assert(R * J <= 16);
  int64_t rs[R], js[J];
  for (int t = 0; t < R; ++t) rs[t] = std::min(r0 + t, a_count - 1);
  for (int u = 0; u < J; ++u) js[u] = std::min(j0 + u, k - 1);
  Vec acc[16] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const Vec* ab = a + b * a_count;
    const Vec* cb = c + b * k;
    Vec cv[J];
    for (int u = 0; u < J; ++u) cv[u] = cb[js[u]];
#pragma GCC unroll 16
    for (int t = 0; t < R; ++t) {
      const Vec v = ab[rs[t]];
      for (int u = 0; u < J; ++u) acc[t * J + u] += v * cv[u];
    }
  }
  const Vec sums = sum_lanes_of_16(acc);
  for (int t = 0; t < R && r0 + t < a_count; ++t)
    for (int u = 0; u < J && j0 + u < k; ++u) out[(r0 + t) * k + j0 + u] = sums[t * J + u];
}

// out [rows, k] = sum over blocks b and lanes of a[b][r] * c[b][j] (a: blocks of a_count
// vectors, c: blocks of k vectors): the products that reduce over queries, dg = dy P and
// dphi = theta dS. 4 x 4 tiles; the last 1 to 3 columns in tiles of 16 x 1, 8 x 2 or 5 x 3, so
// that at 9 keys a quarter of the tiles' products is not spent on repeated columns. Each
// output's sum has the same order whichever tile holds it (the lane fold is the same tree for
// every vector).
DYNATTN_ALWAYS_INLINE void reduce_over_queries(const Vec* a, int64_t a_count, const Vec* c,
                                               int64_t k, int64_t blocks, float* out) {
  const int64_t whole = k - k % 4;
  for (int64_t r0 = 0; r0 < a_count; r0 += 4)
    for (int64_t j0 = 0; j0 < whole; j0 += 4)
      reduce_tile<4, 4>(a, a_count, c, k, blocks, r0, j0, out);
  switch (k % 4) {
    case 1:
      for (int64_t r0 = 0; r0 < a_count; r0 += 16)
        reduce_tile<16, 1>(a, a_count, c, k, blocks, r0, whole, out);
      break;
    case 2:
      for (int64_t r0 = 0; r0 < a_count; r0 += 8)
        reduce_tile<8, 2>(a, a_count, c, k, blocks, r0, whole, out);
      break;
    case 3:
      for (int64_t r0 = 0; r0 < a_count; r0 += 5)
        reduce_tile<5, 3>(a, a_count, c, k, blocks, r0, whole, out);
      break;
    default:
      break;
  }
}

DYNATTN_KERNEL_CLONES
void forward_impl(const float* theta, const float* phi, const float* g, const float* theta_bias,
                  float* y, const float* y_bias, const float* y_residual, float* probs, int64_t d,
                  int64_t dv, int64_t q, int64_t k, float scale, Vec* t, Vec* s) {
  for (int64_t q0 = 0; q0 < q; q0 += kLanes) {
    const int64_t lanes = std::min(kLanes, q - q0);
    for (int64_t i = 0; i < d; ++i) {
      t[i] = load(theta + i * q + q0, lanes);
      if (theta_bias != nullptr) t[i] += theta_bias[i];
      t[i] *= scale;
    }
    rows_times_matrix(t, d, phi, k, s);
    // Four partial maxima and sums: one chain of dependent max/add would take their latency
    // once per key.
    const Vec lowest = splat(-std::numeric_limits<float>::infinity());
    Vec top[4] = {lowest, lowest, lowest, lowest};
    int64_t j = 0;
    for (; j + 4 <= k; j += 4)
      for (int u = 0; u < 4; ++u) top[u] = vmax(s[j + u], top[u]);
    for (; j < k; ++j) top[0] = vmax(s[j], top[0]);
    const Vec row_max = vmax(vmax(top[0], top[1]), vmax(top[2], top[3]));
    // total[u] sums keys j = u mod 4 in order; four at a time, so that the index is a constant
    // and the partial sums stay in registers (total[j & 3] put them on the stack).
    Vec total[4] = {};
    for (j = 0; j + 4 <= k; j += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        s[j + u] = exp_nonpositive(s[j + u] - row_max);
        total[u] += s[j + u];
      }
    }
    for (int u = 0; j < k; ++j, ++u) {
      s[j] = exp_nonpositive(s[j] - row_max);
      total[u] += s[j];
    }
    Vec inv = 1.0f / ((total[0] + total[1]) + (total[2] + total[3]));
    // Padding lanes get probability 0, so the backward's sums over queries can include them.
    for (int64_t l = lanes; l < kLanes; ++l) inv[l] = 0.0f;
    if (probs != nullptr) {
      for (j = 0; j < k; ++j) s[j] *= inv;
      std::memcpy(probs + q0 / kLanes * k * kLanes, s, static_cast<size_t>(k) * sizeof(Vec));
      inv = splat(1.0f);
    }
    // Without probs to save, the normalisation scales the dv outputs instead of the k weights.
    matrix_times_columns(g, dv, k, s, inv, y + q0, q, lanes, y_bias,
                         y_residual == nullptr ? nullptr : y_residual + q0);
  }
}

DYNATTN_KERNEL_CLONES
void backward_impl(const float* theta, const float* phi, const float* g, const float* theta_bias,
                   const float* probs, const float* dy, float* d_theta, float* d_phi, float* d_g,
                   int64_t d, int64_t dv, int64_t q, int64_t k, float scale, Vec* scratch) {
  const int64_t blocks = (q + kLanes - 1) / kLanes;
  Vec* tb = scratch;            // [blocks][d], scaled theta
  Vec* dyb = tb + blocks * d;   // [blocks][dv]
  Vec* ds = dyb + blocks * dv;  // [blocks][k], the logits' gradient
  Vec* dp = ds + blocks * k;    // [k], the probabilities' gradient of one block
  const Vec* pb = reinterpret_cast<const Vec*>(probs);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t q0 = b * kLanes, lanes = std::min(kLanes, q - q0);
    for (int64_t i = 0; i < d; ++i) {
      Vec t = load(theta + i * q + q0, lanes);
      // The bias only in the real lanes: padding lanes of theta stay 0, as in the forward's sums.
      if (theta_bias != nullptr)
        t += (lanes == kLanes ? splat(theta_bias[i]) : load_bias(theta_bias[i], lanes));
      tb[b * d + i] = t * scale;
    }
    for (int64_t i = 0; i < dv; ++i) dyb[b * dv + i] = load(dy + i * q + q0, lanes);
    rows_times_matrix(dyb + b * dv, dv, g, k, dp);
    const Vec* p = pb + b * k;
    Vec dot{};
    for (int64_t j = 0; j < k; ++j) dot += p[j] * dp[j];
    for (int64_t j = 0; j < k; ++j) ds[b * k + j] = p[j] * (dp[j] - dot);
    if (d_theta != nullptr)
      matrix_times_columns(phi, d, k, ds + b * k, splat(scale), d_theta + q0, q, lanes);
  }
  if (d_g != nullptr) reduce_over_queries(dyb, dv, pb, k, blocks, d_g);
  if (d_phi != nullptr) reduce_over_queries(tb, d, ds, k, blocks, d_phi);
}

}  // namespace

bool attention_kernel_available() {
  // 16 queries per vector is one AVX-512 register; on AVX2 each vector is two and the blocks
  // spill: BM_SoftmaxAttention D16 Q196 K49 N64 on an AVX2-only AMD EPYC ran 3x slower than ATen's
  // bmm/softmax/bmm (11.0 vs 3.7 ms forward, 29.0 vs 9.4 ms with backward; 5 interleaved
  // repetitions), and nl_resnet20 with it 0.7-0.8x of --kernels aten. So the kernel needs the
  // 16-float forms of the dispatch (ops/dispatch.h: AVX-512, not capped, not switched off).
  return wide_vector_kernels_run();
}

void attention_kernel_forward(const AttentionKernelArgs& a) {
  VecBuffer scratch(a.d + a.k);
  const int64_t probs_size = attention_kernel_probs_size(a.q, a.k);
  for (int64_t n = 0; n < a.count; ++n) {
    float* y = a.y + n * a.y_stride;
    forward_impl(a.theta + n * a.theta_stride, a.phi + n * a.phi_stride, a.g + n * a.g_stride,
                 a.theta_bias, y, a.y_bias,
                 a.y_residual == nullptr ? nullptr : a.y_residual + n * a.y_stride,
                 a.probs == nullptr ? nullptr : a.probs + n * probs_size, a.d, a.dv, a.q, a.k,
                 a.scale, scratch.data(), scratch.data() + a.d);
    if (a.y_ones_row) std::fill(y + a.dv * a.q, y + (a.dv + 1) * a.q, 1.0f);
  }
}

void attention_kernel_backward(const AttentionKernelArgs& a, const AttentionKernelGrads& grads) {
  const int64_t blocks = (a.q + kLanes - 1) / kLanes;
  VecBuffer scratch(blocks * (a.d + a.dv + a.k) + a.k);
  const int64_t probs_size = attention_kernel_probs_size(a.q, a.k);
  auto at = [](float* base, int64_t stride, int64_t n) {
    return base == nullptr ? nullptr : base + n * stride;
  };
  for (int64_t n = 0; n < a.count; ++n) {
    backward_impl(a.theta + n * a.theta_stride, a.phi + n * a.phi_stride, a.g + n * a.g_stride,
                  a.theta_bias, a.probs + n * probs_size, grads.dy + n * grads.dy_stride,
                  at(grads.d_theta, grads.d_theta_stride, n),
                  at(grads.d_phi, grads.d_phi_stride, n), at(grads.d_g, grads.d_g_stride, n), a.d,
                  a.dv, a.q, a.k, a.scale, scratch.data());
  }
}

#else

bool attention_kernel_available() {
  return false;
}

void attention_kernel_forward(const AttentionKernelArgs&) {}

void attention_kernel_backward(const AttentionKernelArgs&, const AttentionKernelGrads&) {}

#endif

}  // namespace dynattn::detail
