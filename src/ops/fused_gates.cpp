#include "dynattn/ops/fused_gates.h"
#include "dynattn/ops/dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "bam_combine.h"
#include "dynattn/ops/bam_spatial_branch.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "vec16.h"
#include "vector_clones.h"

namespace dynattn {
namespace {
std::atomic<int64_t> g_calls{0};

// Elements per parallel task, as ATen's own grain (at::internal::GRAIN_SIZE).
constexpr int64_t kGrain = 32768;
// Independent partial sums per reduction: lets the compiler vectorise it without reordering
// anything itself, and keeps the rounding error of long sums small.
constexpr int kLanes = 8;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_item));
}

// ---- Helpers, inlined into the clones below (so compiled for each ISA) ----

DYNATTN_ALWAYS_INLINE float lanes_total(const float* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

DYNATTN_ALWAYS_INLINE float sum_of(const float* p, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += p[i];
  return lanes_total(acc);
}

// Sum and maximum of p[0..n), n >= 1.
DYNATTN_ALWAYS_INLINE void sum_max_of(const float* p, int64_t n, float* sum, float* max) {
  float acc[kLanes] = {}, top[kLanes];
  for (int j = 0; j < kLanes; ++j) top[j] = p[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc[j] += p[i + j];
      top[j] = top[j] < p[i + j] ? p[i + j] : top[j];
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc[j] += p[i];
    top[j] = top[j] < p[i] ? p[i] : top[j];
  }
  *sum = lanes_total(acc);
  *max = *std::max_element(top, top + kLanes);
}

DYNATTN_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return lanes_total(acc);
}

// y[i] += a * x[i]
DYNATTN_ALWAYS_INLINE void axpy(float a, const float* __restrict__ x, float* __restrict__ y,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Register-blocked accumulation: kChunk outputs stay in vector registers across many axpys.
constexpr int64_t kChunk = 32;

DYNATTN_ALWAYS_INLINE void axpy_chunk(float a, const float* __restrict__ x,
                                      float* __restrict__ acc) {
  for (int64_t j = 0; j < kChunk; ++j) acc[j] += a * x[j];
}

DYNATTN_ALWAYS_INLINE float max_of(float a, float b) {
  return a < b ? b : a;
}

#ifdef DYNATTN_HAVE_VEC16
// sum_max_of for rows of at least 16 on explicit 16-float vectors (max_of's rule throughout):
// GCC leaves sum_max_of's array form scalar (the conditional maximum beside the sum keeps it
// from vectorising), which was a quarter of CBAM's NCHW inference. Its sum adds in another order
// than sum_max_of's: the channels-last training kernels, which the experiments train with, keep
// sum_max_of's rounding; the NCHW ones use this form where the CPU has AVX-512.
DYNATTN_ALWAYS_INLINE void vector_sum_max_of(const float* p, int64_t n, float* sum, float* max) {
  namespace v16 = detail::vec16;
  v16::Vec acc = v16::load(p, v16::kLanes), top = acc;
  int64_t i = v16::kLanes;
  for (; i + v16::kLanes <= n; i += v16::kLanes) {
    const v16::Vec v = v16::load(p + i, v16::kLanes);
    acc += v;
    top = top < v ? v : top;
  }
  float total = v16::lanes_sum(acc), best = top[0];
  for (int64_t l = 1; l < v16::kLanes; ++l) best = max_of(best, top[l]);
  for (; i < n; ++i) {
    total += p[i];
    best = max_of(best, p[i]);
  }
  *sum = total;
  *max = best;
}
#endif

// e^v for v in [-87, 88] within 2 ulp, branch-free so that loops over it vectorise: Cephes'
// expf (n = round(v / ln 2) by the 1.5 * 2^23 trick, v - n ln 2 in two parts, degree-6
// polynomial, 2^n from the exponent bits). std::exp does not vectorise here.
DYNATTN_ALWAYS_INLINE float exp_in_range(float v) {
  const float shifted = v * 1.44269504088896341f + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const float nf = shifted - 12582912.0f;
  const float r = (v - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t scale_bits = ((bits - 0x4B400000) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// v[i] = sigmoid(v[i]) = 1 / (1 + e^-v[i]), within 2e-7 relative for |v| <= 80 (saturating
// beyond, NaN stays NaN). Two loops: GCC vectorises the clamp (a select) and the arithmetic
// separately but not fused, under the default -ftrapping-math.
DYNATTN_ALWAYS_INLINE void sigmoid_array(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float t = -v[i];
    t = t < -87.0f ? -87.0f : t;
    v[i] = t > 88.0f ? 88.0f : t;
  }
  for (int64_t i = 0; i < n; ++i) v[i] = 1.0f / (1.0f + exp_in_range(v[i]));
}

// ---- Range kernels: every loop over the map, one call per parallel task ----

// mean[ch] (and max[ch] when not null) over the hw pixels of channels [c0, c1), NCHW image.
DYNATTN_VECTOR_CLONES
void pool_nchw(const float* x, int64_t hw, int64_t c0, int64_t c1, float* mean, float* max) {
  const float inv = 1.0f / static_cast<float>(hw);
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* row = x + ch * hw;
    float sum;
    if (max != nullptr) {
      sum_max_of(row, hw, &sum, &max[ch]);
    } else {
      sum = sum_of(row, hw);
    }
    mean[ch] = sum * inv;
  }
}

#ifdef DYNATTN_HAVE_VEC16
// Whether the 16-float vector forms below run: the dispatch's rule (ops/dispatch.h), AVX-512
// and the policy's 16-float forms on. With AVX-512 they run as one register; the AVX2 clone of
// pool_max_nchw16 measured slower than pool_nchw here, channel_stats_cl16's no faster.
inline bool sixteen_lane_kernels_pay() {
  return wide_vector_kernels_run();
}

// pool_nchw with max, for hw >= 16, on 16-float vectors. Called from outside the AVX2 clones
// (see channel_stats_cl16) so that its AVX-512 clone runs.
DYNATTN_KERNEL_CLONES
void pool_max_nchw16(const float* x, int64_t hw, int64_t c0, int64_t c1, float* mean, float* max) {
  const float inv = 1.0f / static_cast<float>(hw);
  for (int64_t ch = c0; ch < c1; ++ch) {
    float sum;
    vector_sum_max_of(x + ch * hw, hw, &sum, &max[ch]);
    mean[ch] = sum * inv;
  }
}
#endif

// The same for a channels-last image of c channels: four pixels per step into the accumulators.
DYNATTN_VECTOR_CLONES
void pool_cl(const float* x, int64_t c, int64_t hw, int64_t c0, int64_t c1, float* mean,
             float* max) {
  const int64_t len = c1 - c0;
  float* __restrict__ sum = mean + c0;
  float* __restrict__ top = max != nullptr ? max + c0 : nullptr;
  std::fill(sum, sum + len, 0.0f);
  if (top != nullptr) std::copy(x + c0, x + c1, top);
  int64_t p = 0;
  for (; p + 4 <= hw; p += 4) {
    const float* a = x + p * c + c0;
    const float* b = a + c;
    const float* d = b + c;
    const float* e = d + c;
    for (int64_t j = 0; j < len; ++j) sum[j] += (a[j] + b[j]) + (d[j] + e[j]);
    if (top != nullptr) {
      for (int64_t j = 0; j < len; ++j)
        top[j] = max_of(top[j], max_of(max_of(a[j], b[j]), max_of(d[j], e[j])));
    }
  }
  for (; p < hw; ++p) {
    const float* a = x + p * c + c0;
    for (int64_t j = 0; j < len; ++j) sum[j] += a[j];
    if (top != nullptr) {
      for (int64_t j = 0; j < len; ++j) top[j] = max_of(top[j], a[j]);
    }
  }
  const float inv = 1.0f / static_cast<float>(hw);
  for (int64_t j = 0; j < len; ++j) sum[j] *= inv;
}

// y = x * gate[ch] * (pixel_gate ? pixel_gate[p] : 1), the products in that order; channels
// [c0, c1) of an NCHW image.
DYNATTN_VECTOR_CLONES
void gate_nchw(const float* x, float* y, int64_t hw, int64_t c0, int64_t c1, const float* gate,
               const float* pixel_gate) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* __restrict__ src = x + ch * hw;
    float* __restrict__ dst = y + ch * hw;
    const float g = gate[ch];
    if (pixel_gate == nullptr) {
      for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] * g;
    } else {
      for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] * g * pixel_gate[p];
    }
  }
}

// The same for pixels [p0, p1) of a channels-last image.
DYNATTN_VECTOR_CLONES
void gate_cl(const float* x, float* y, int64_t c, int64_t p0, int64_t p1, const float* gate,
             const float* pixel_gate) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ src = x + p * c;
    float* __restrict__ dst = y + p * c;
    if (pixel_gate == nullptr) {
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch] * gate[ch];
    } else {
      const float s = pixel_gate[p];
      for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch] * gate[ch] * s;
    }
  }
}

DYNATTN_VECTOR_CLONES
void sigmoid_inplace(float* v, int64_t n) {
  sigmoid_array(v, n);
}

DYNATTN_VECTOR_CLONES
void hard_sigmoid_inplace(float* v, int64_t n) {  // ATen's: min(max(v + 3, 0), 6) / 6
  for (int64_t i = 0; i < n; ++i) {
    float t = v[i] + 3.0f;
    t = t < 0.0f ? 0.0f : t;
    v[i] = (t > 6.0f ? 6.0f : t) / 6.0f;
  }
}

// CBAM: per pixel p in [p0, p1), the sum and max over channels of x * gate, into
// sum[p - p0], max[p - p0].
DYNATTN_VECTOR_CLONES
void channel_stats_nchw(const float* x, int64_t c, int64_t hw, const float* gate, int64_t p0,
                        int64_t p1, float* __restrict__ sum, float* __restrict__ max) {
  const int64_t len = p1 - p0;
  const float* src = x + p0;
  for (int64_t p = 0; p < len; ++p) sum[p] = max[p] = src[p] * gate[0];
  for (int64_t ch = 1; ch < c; ++ch) {
    src = x + ch * hw + p0;
    const float g = gate[ch];
    for (int64_t p = 0; p < len; ++p) {
      const float v = src[p] * g;
      sum[p] += v;
      max[p] = max_of(max[p], v);
    }
  }
}

#ifdef DYNATTN_HAVE_VEC16
// channel_stats_cl for c a multiple of 16, sixteen pixels [p, p + 16) at a time: each pixel's
// channels reduce to one vector of partial sums (and maxima), then the 16 vectors fold into the
// 16 pixels' totals together. One horizontal reduction per pixel was most of CBAM's
// channels-last inference at batch 64.
DYNATTN_KERNEL_CLONES
void channel_stats_cl16(const float* x, int64_t c, const float* gate, int64_t p0, int64_t p1,
                        float* sum, float* max) {
  namespace v16 = detail::vec16;
  for (int64_t p = p0; p + v16::kLanes <= p1; p += v16::kLanes) {
    v16::Vec sums[v16::kLanes], maxima[v16::kLanes];
    for (int64_t j = 0; j < v16::kLanes; ++j) {
      const float* px = x + (p + j) * c;
      v16::Vec s = v16::load(px, v16::kLanes) * v16::load(gate, v16::kLanes), m = s;
      for (int64_t ch = v16::kLanes; ch < c; ch += v16::kLanes) {
        const v16::Vec v = v16::load(px + ch, v16::kLanes) * v16::load(gate + ch, v16::kLanes);
        s += v;
        m = m < v ? v : m;
      }
      sums[j] = s;
      maxima[j] = m;
    }
    v16::store(sum + (p - p0), v16::sum_lanes_of_16(sums), v16::kLanes);
    v16::store(max + (p - p0), v16::fold_lanes_of_16(maxima, v16::MaxLanes{}), v16::kLanes);
  }
}
#endif

// The same for a channels-last image; scratch holds c floats.
DYNATTN_VECTOR_CLONES
void channel_stats_cl(const float* x, int64_t c, const float* gate, int64_t p0, int64_t p1,
                      float* sum, float* max, float* __restrict__ scratch) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* px = x + p * c;
    for (int64_t ch = 0; ch < c; ++ch) scratch[ch] = px[ch] * gate[ch];
    sum_max_of(scratch, c, &sum[p - p0], &max[p - p0]);
  }
}

// Stride-1 "same" convolution over `cin` zero-padded planes (`plane` floats apart, rows of `wp`
// floats, padding dil * (k/2)), output rows [r0, r1). Computed on the padded row width so that
// every tap reads one contiguous run: output (o, row, col) lands at
// ext[o * ext_plane + row * wp + col] for col < wp - 2 * pad; the other columns are junk. The
// planes need 2 * pad floats of slack after the last one (PaddedPlanes has them).
DYNATTN_VECTOR_CLONES
void conv_same_ext(const float* in, int64_t cin, int64_t plane, int64_t wp, const float* weight,
                   int64_t cout, int64_t k, int64_t dil, int64_t r0, int64_t r1, float* ext,
                   int64_t ext_plane) {
  const int64_t len = (r1 - r0) * wp;
  for (int64_t o = 0; o < cout; ++o) {
    float* dst = ext + o * ext_plane + r0 * wp;
    const float* w = weight + o * cin * k * k;
    int64_t base = 0;
    for (; base + kChunk <= len; base += kChunk) {
      float acc[kChunk] = {};
      for (int64_t i = 0; i < cin; ++i) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const float* src = in + i * plane + (r0 + ky * dil) * wp + base;
          for (int64_t kx = 0; kx < k; ++kx)
            axpy_chunk(w[(i * k + ky) * k + kx], src + kx * dil, acc);
        }
      }
      std::copy(acc, acc + kChunk, dst + base);
    }
    if (base == len) continue;
    std::fill(dst + base, dst + len, 0.0f);
    for (int64_t i = 0; i < cin; ++i) {
      for (int64_t ky = 0; ky < k; ++ky) {
        const float* src = in + i * plane + (r0 + ky * dil) * wp + base;
        for (int64_t kx = 0; kx < k; ++kx)
          axpy(w[(i * k + ky) * k + kx], src + kx * dil, dst + base, len - base);
      }
    }
  }
}

#ifdef DYNATTN_HAVE_VEC16
// conv_same_ext on 16-float vectors, 64 outputs per register block: the AVX2 clone's taps were
// a multiply and an add on 8 floats each (no FMA in that ISA), about 45% of CBAM's
// channels-last inference at 16@28x28. The taps add in the same order.
DYNATTN_KERNEL_CLONES
void conv_same_ext16(const float* in, int64_t cin, int64_t plane, int64_t wp, const float* weight,
                     int64_t cout, int64_t k, int64_t dil, int64_t r0, int64_t r1, float* ext,
                     int64_t ext_plane) {
  namespace v16 = detail::vec16;
  constexpr int64_t L = v16::kLanes, kBlock = 4;
  const int64_t len = (r1 - r0) * wp;
  for (int64_t o = 0; o < cout; ++o) {
    float* dst = ext + o * ext_plane + r0 * wp;
    const float* w = weight + o * cin * k * k;
    int64_t base = 0;
    for (; base + kBlock * L <= len; base += kBlock * L) {
      v16::Vec acc[kBlock] = {};
      for (int64_t i = 0; i < cin; ++i) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const float* src = in + i * plane + (r0 + ky * dil) * wp + base;
          for (int64_t kx = 0; kx < k; ++kx) {
            const float t = w[(i * k + ky) * k + kx];
            for (int64_t b = 0; b < kBlock; ++b) acc[b] += v16::load(src + kx * dil + b * L, L) * t;
          }
        }
      }
      for (int64_t b = 0; b < kBlock; ++b) v16::store(dst + base + b * L, acc[b], L);
    }
    for (; base < len; base += L) {
      const int64_t lanes = std::min(L, len - base);
      v16::Vec acc{};
      for (int64_t i = 0; i < cin; ++i) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const float* src = in + i * plane + (r0 + ky * dil) * wp + base;
          for (int64_t kx = 0; kx < k; ++kx)
            acc += v16::load(src + kx * dil, lanes) * w[(i * k + ky) * k + kx];
        }
      }
      v16::store(dst + base, acc, lanes);
    }
  }
}
#endif

// conv_same_ext, or its 16-float form where that pays. Called from outside the clones (see
// channel_stats_cl16).
void same_conv_rows(const float* in, int64_t cin, int64_t plane, int64_t wp, const float* weight,
                    int64_t cout, int64_t k, int64_t dil, int64_t r0, int64_t r1, float* ext,
                    int64_t ext_plane) {
#ifdef DYNATTN_HAVE_VEC16
  if (sixteen_lane_kernels_pay())
    return conv_same_ext16(in, cin, plane, wp, weight, cout, k, dil, r0, r1, ext, ext_plane);
#endif
  conv_same_ext(in, cin, plane, wp, weight, cout, k, dil, r0, r1, ext, ext_plane);
}

// BAM's 1x1 reduce without bias: out[r * hw + p] = sum_c w[r][c] x[c][p] for p in [p0, p1).
DYNATTN_VECTOR_CLONES
void reduce_nchw(const float* x, int64_t c, int64_t hw, const float* w, int64_t rd, int64_t p0,
                 int64_t p1, float* out) {
  for (int64_t r = 0; r < rd; ++r) {
    const float* wr = w + r * c;
    float* dst = out + r * hw;
    int64_t base = p0;
    for (; base + kChunk <= p1; base += kChunk) {
      float acc[kChunk] = {};
      for (int64_t ch = 0; ch < c; ++ch) axpy_chunk(wr[ch], x + ch * hw + base, acc);
      std::copy(acc, acc + kChunk, dst + base);
    }
    if (base == p1) continue;
    std::fill(dst + base, dst + p1, 0.0f);
    for (int64_t ch = 0; ch < c; ++ch) axpy(wr[ch], x + ch * hw + base, dst + base, p1 - base);
  }
}

DYNATTN_VECTOR_CLONES
void reduce_cl(const float* x, int64_t c, int64_t hw, const float* w, int64_t rd, int64_t p0,
               int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r = 0; r < rd; ++r) out[r * hw + p] = dot(w + r * c, x + p * c, c);
  }
}

// BAM's conv epilogue: dst = relu(src * scale + shift) over `rows` rows of w values.
DYNATTN_VECTOR_CLONES
void affine_relu_rows(const float* src, int64_t src_row, float* dst, int64_t dst_row, int64_t rows,
                      int64_t w, float scale, float shift) {
  for (int64_t y = 0; y < rows; ++y) {
    const float* __restrict__ in = src + y * src_row;
    float* __restrict__ out = dst + y * dst_row;
    for (int64_t j = 0; j < w; ++j) {
      const float v = in[j] * scale + shift;
      out[j] = v < 0.0f ? 0.0f : v;  // NaN stays NaN, as in ATen's relu
    }
  }
}

// out = e^-in for |in| <= 80.
DYNATTN_VECTOR_CLONES
void exp_neg(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_in_range(-in[i]);
}

// BAM's output y = x + x * s, s = sigmoid(mc + ms) (sum) or sigmoid(mc * ms) (product). With
// `factor` (sum form only), s = 1 / (1 + ec[ch] * es[p]), ec = e^-mc, es = e^-ms.
struct BamCombine {
  const float *mc, *ms, *ec, *es;
  bool factor, product;
};

// The gate value s of BAM's combine for channel ch at pixels [p0, p0 + len) into s.
DYNATTN_ALWAYS_INLINE void bam_gate_row(const BamCombine& k, int64_t ch, int64_t p0, int64_t len,
                                        float* s) {
  if (k.factor) {
    const float e = k.ec[ch];
    for (int64_t j = 0; j < len; ++j) s[j] = 1.0f / (1.0f + e * k.es[p0 + j]);
    return;
  }
  const float a = k.mc[ch];
  if (k.product) {
    for (int64_t j = 0; j < len; ++j) s[j] = a * k.ms[p0 + j];
  } else {
    for (int64_t j = 0; j < len; ++j) s[j] = a + k.ms[p0 + j];
  }
  sigmoid_array(s, len);
}

// The gate value s of BAM's combine at pixel p for every one of the c channels into s.
DYNATTN_ALWAYS_INLINE void bam_gate_pixel(const BamCombine& k, int64_t p, int64_t c, float* s) {
  if (k.factor) {
    const float e = k.es[p];
    for (int64_t ch = 0; ch < c; ++ch) s[ch] = 1.0f / (1.0f + k.ec[ch] * e);
    return;
  }
  const float b = k.ms[p];
  if (k.product) {
    for (int64_t ch = 0; ch < c; ++ch) s[ch] = k.mc[ch] * b;
  } else {
    for (int64_t ch = 0; ch < c; ++ch) s[ch] = k.mc[ch] + b;
  }
  sigmoid_array(s, c);
}

DYNATTN_VECTOR_CLONES
void bam_combine_nchw(const float* x, float* y, int64_t hw, int64_t c0, int64_t c1,
                      const BamCombine& k) {
  std::vector<float> s(k.factor ? 0 : hw);
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* __restrict__ src = x + ch * hw;
    float* __restrict__ dst = y + ch * hw;
    if (k.factor) {
      const float e = k.ec[ch];
      for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] + src[p] * (1.0f / (1.0f + e * k.es[p]));
      continue;
    }
    bam_gate_row(k, ch, 0, hw, s.data());
    for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] + src[p] * s[p];
  }
}

DYNATTN_VECTOR_CLONES
void bam_combine_cl(const float* x, float* y, int64_t c, int64_t p0, int64_t p1,
                    const BamCombine& k) {
  std::vector<float> s(k.factor ? 0 : c);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ src = x + p * c;
    float* __restrict__ dst = y + p * c;
    if (k.factor) {
      const float e = k.es[p];
      for (int64_t ch = 0; ch < c; ++ch)
        dst[ch] = src[ch] + src[ch] * (1.0f / (1.0f + k.ec[ch] * e));
      continue;
    }
    bam_gate_pixel(k, p, c, s.data());
    for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch] + src[ch] * s[ch];
  }
}

#ifdef DYNATTN_HAVE_VEC16
// BAM's factor form on 16 elements, from e = e^-mc e^-ms (the product of the two exponentials):
// s = 1 / (1 + e) = sigmoid(mc + ms); y = v + v s.
DYNATTN_ALWAYS_INLINE detail::vec16::Vec bam_factor_output(detail::vec16::Vec v,
                                                           detail::vec16::Vec e) {
  const detail::vec16::Vec s = 1.0f / (1.0f + e);
  return v + v * s;
}

// Its backward for the output gradient d at input v: dx = d + d s, returned, and the logit's
// gradient t = d v s (1 - s).
DYNATTN_ALWAYS_INLINE detail::vec16::Vec bam_factor_backward(detail::vec16::Vec d,
                                                             detail::vec16::Vec v,
                                                             detail::vec16::Vec e,
                                                             detail::vec16::Vec* t) {
  const detail::vec16::Vec s = 1.0f / (1.0f + e);
  *t = d * v * (s * (1.0f - s));
  return d + d * s;
}

// bam_combine_cl in the factor form for c a multiple of 16, on 16-float vectors: the division per
// element bounds it, and the AVX-512 clone divides 16 at a time (the AVX2 clone's loop over a
// 16-channel pixel also spent as much on its gate scratch as on the arithmetic). The same
// operations per element as bam_combine_cl. Called from outside the AVX2 clones (see
// channel_stats_cl16).
DYNATTN_KERNEL_CLONES
void bam_combine_factor_cl16(const float* x, float* y, int64_t c, int64_t p0, int64_t p1,
                             const float* ec, const float* es) {
  namespace v16 = detail::vec16;
  for (int64_t p = p0; p < p1; ++p) {
    const float e = es[p];
    for (int64_t ch = 0; ch < c; ch += v16::kLanes) {
      v16::store(y + p * c + ch,
                 bam_factor_output(v16::load(x + p * c + ch, v16::kLanes),
                                   v16::load(ec + ch, v16::kLanes) * e),
                 v16::kLanes);
    }
  }
}
#endif

// The backward of y = x + x * s over pixels [p0, p1) of an NCHW image: dx = dy (1 + s), and with
// t = dy x s (1 - s) (the gradient of the logit): dmc[ch] += sum_p t (times ms[p] in the product
// form), dms[p] = sum_ch t (times mc[ch]). dmc is this task's partial sum; scratch: 2 (p1 - p0)
// floats.
DYNATTN_VECTOR_CLONES
void bam_combine_backward_nchw(const float* x, const float* dy, float* dx, int64_t c, int64_t hw,
                               int64_t p0, int64_t p1, const BamCombine& k, float* dmc, float* dms,
                               float* scratch) {
  const int64_t len = p1 - p0;
  float* __restrict__ s = scratch;
  float* __restrict__ t = scratch + len;
  float* __restrict__ out_ms = dms + p0;
  std::fill(out_ms, out_ms + len, 0.0f);
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* __restrict__ xr = x + ch * hw + p0;
    const float* __restrict__ dyr = dy + ch * hw + p0;
    float* __restrict__ dxr = dx + ch * hw + p0;
    bam_gate_row(k, ch, p0, len, s);
    for (int64_t j = 0; j < len; ++j) {
      const float d = dyr[j];
      dxr[j] = d + d * s[j];
      t[j] = d * xr[j] * (s[j] * (1.0f - s[j]));
    }
    if (k.product) {
      const float a = k.mc[ch];
      dmc[ch] += dot(t, k.ms + p0, len);
      for (int64_t j = 0; j < len; ++j) out_ms[j] += t[j] * a;
    } else {
      dmc[ch] += sum_of(t, len);
      for (int64_t j = 0; j < len; ++j) out_ms[j] += t[j];
    }
  }
}

// The same for pixels [p0, p1) of a channels-last image; scratch: 2 c floats.
DYNATTN_VECTOR_CLONES
void bam_combine_backward_cl(const float* x, const float* dy, float* dx, int64_t c, int64_t p0,
                             int64_t p1, const BamCombine& k, float* dmc, float* dms,
                             float* scratch) {
  float* __restrict__ s = scratch;
  float* __restrict__ t = scratch + c;
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ xr = x + p * c;
    const float* __restrict__ dyr = dy + p * c;
    float* __restrict__ dxr = dx + p * c;
    bam_gate_pixel(k, p, c, s);
    for (int64_t ch = 0; ch < c; ++ch) {
      const float d = dyr[ch];
      dxr[ch] = d + d * s[ch];
      t[ch] = d * xr[ch] * (s[ch] * (1.0f - s[ch]));
    }
    if (k.product) {
      const float b = k.ms[p];
      dms[p] = dot(t, k.mc, c);
      for (int64_t ch = 0; ch < c; ++ch) dmc[ch] += t[ch] * b;
    } else {
      dms[p] = sum_of(t, c);
      for (int64_t ch = 0; ch < c; ++ch) dmc[ch] += t[ch];
    }
  }
}

#ifdef DYNATTN_HAVE_VEC16
// bam_combine_nchw in the factor form on 16-float vectors (division-bound, as
// bam_combine_factor_cl16), channels [c0, c1).
DYNATTN_KERNEL_CLONES
void bam_combine_factor_nchw16(const float* x, float* y, int64_t hw, int64_t c0, int64_t c1,
                               const float* ec, const float* es) {
  namespace v16 = detail::vec16;
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float e = ec[ch];
    for (int64_t p = 0; p < hw; p += v16::kLanes) {
      const int64_t lanes = std::min(v16::kLanes, hw - p);
      v16::store(y + ch * hw + p,
                 bam_factor_output(v16::load(x + ch * hw + p, lanes), e * v16::load(es + p, lanes)),
                 lanes);
    }
  }
}

// bam_combine_backward_nchw in the factor form on 16-float vectors, pixels [p0, p1): dms's
// partial sums stay in memory across the channels, dmc's in a vector per channel.
DYNATTN_KERNEL_CLONES
void bam_combine_factor_backward_nchw16(const float* x, const float* dy, float* dx, int64_t c,
                                        int64_t hw, int64_t p0, int64_t p1, const float* ec,
                                        const float* es, float* dmc, float* dms) {
  namespace v16 = detail::vec16;
  std::fill(dms + p0, dms + p1, 0.0f);
  for (int64_t ch = 0; ch < c; ++ch) {
    const float e = ec[ch];
    v16::Vec tsum{};
    for (int64_t p = p0; p < p1; p += v16::kLanes) {
      const int64_t lanes = std::min(v16::kLanes, p1 - p);
      v16::Vec t;
      v16::store(
          dx + ch * hw + p,
          bam_factor_backward(v16::load(dy + ch * hw + p, lanes), v16::load(x + ch * hw + p, lanes),
                              e * v16::load(es + p, lanes), &t),
          lanes);
      tsum += t;
      v16::store(dms + p, v16::load(dms + p, lanes) + t, lanes);
    }
    dmc[ch] += v16::lanes_sum(tsum);
  }
}

// bam_combine_backward_cl in the factor form for c a multiple of 16, on 16-float vectors (the
// division per element bounds it, as in bam_combine_factor_cl16): each pixel's t to one vector
// of partial sums, and 16 pixels' vectors folded into their dms together.
DYNATTN_KERNEL_CLONES
void bam_combine_factor_backward_cl16(const float* x, const float* dy, float* dx, int64_t c,
                                      int64_t p0, int64_t p1, const float* ec, const float* es,
                                      float* dmc, float* dms) {
  namespace v16 = detail::vec16;
  constexpr int64_t L = v16::kLanes;
  // Pixel p's t, its partial sums over the channels returned.
  const auto pixel = [&](int64_t p) {
    const float e = es[p];
    v16::Vec tsum{};
    for (int64_t ch = 0; ch < c; ch += L) {
      v16::Vec t;
      v16::store(dx + p * c + ch,
                 bam_factor_backward(v16::load(dy + p * c + ch, L), v16::load(x + p * c + ch, L),
                                     v16::load(ec + ch, L) * e, &t),
                 L);
      v16::store(dmc + ch, v16::load(dmc + ch, L) + t, L);
      tsum += t;
    }
    return tsum;
  };
  int64_t p = p0;
  for (; p + L <= p1; p += L) {
    v16::Vec sums[L];
    for (int64_t j = 0; j < L; ++j) sums[j] = pixel(p + j);
    v16::store(dms + p, v16::sum_lanes_of_16(sums), L);
  }
  for (; p < p1; ++p) dms[p] = v16::lanes_sum(pixel(p));
}
#endif

// The per-image terms of BAM's combine. Sum form: s = sigmoid(mc + ms) = 1 / (1 + e^-mc e^-ms),
// exact while both exponentials stay finite and non-zero; otherwise (and for the product form)
// one exponential per element.
struct BamCombineTerms {
  std::vector<float> ec, es;
  BamCombine k;
  BamCombineTerms(const float* mc, const float* ms, int64_t c, int64_t hw, bool product) {
    const auto finite = [](const float* v, int64_t n) {
      return std::all_of(v, v + n, [](float t) { return std::abs(t) <= 80.0f; });
    };
    const bool factor = !product && finite(mc, c) && finite(ms, hw);
    if (factor) {
      ec.resize(c);
      es.resize(hw);
      exp_neg(mc, ec.data(), c);
      exp_neg(ms, es.data(), hw);
    }
    k = BamCombine{mc, ms, ec.data(), es.data(), factor, product};
  }
  BamCombineTerms(const BamCombineTerms&) = delete;
};

// ---- Weights ----

// The values of a small tensor (weights, statistics) in row-major order: its own storage when
// contiguous, else a copy (a channels-last conv weight). Undefined tensors give nullptr.
class Values {
 public:
  explicit Values(const torch::Tensor& t) {
    if (!t.defined()) return;
    numel_ = t.numel();
    if (t.is_contiguous()) {
      ptr_ = t.data_ptr<float>();
      return;
    }
    copy_.resize(numel_);
    const float* base = t.data_ptr<float>();
    std::vector<int64_t> index(t.dim(), 0);
    for (int64_t i = 0; i < numel_; ++i) {
      int64_t offset = 0;
      for (int64_t d = 0; d < t.dim(); ++d) offset += index[d] * t.stride(d);
      copy_[i] = base[offset];
      for (int64_t d = t.dim() - 1; d >= 0 && ++index[d] == t.size(d); --d) index[d] = 0;
    }
    ptr_ = copy_.data();
  }
  Values(const Values&) = delete;
  Values& operator=(const Values&) = delete;

  const float* data() const { return ptr_; }
  int64_t numel() const { return numel_; }
  float operator[](int64_t i) const { return ptr_[i]; }

 private:
  const float* ptr_ = nullptr;
  int64_t numel_ = 0;
  std::vector<float> copy_;
};

// Per channel v * scale + shift == bn(v + bias), bias and bn optional.
struct Affine {
  std::vector<float> scale, shift;
  float operator()(int64_t i, float v) const { return v * scale[i] + shift[i]; }
};

Affine affine_of(const torch::Tensor& bias, const BatchNormEval* bn, int64_t channels,
                 const char* what) {
  Affine a{std::vector<float>(channels, 1.0f), std::vector<float>(channels, 0.0f)};
  const Values b(bias);
  TORCH_CHECK(b.data() == nullptr || b.numel() == channels, "fused gates: ", what, " bias has ",
              b.numel(), " values, expected ", channels);
  if (b.data() != nullptr) std::copy(b.data(), b.data() + channels, a.shift.begin());
  if (bn == nullptr) return a;
  const Values w(bn->weight), beta(bn->bias), mean(bn->running_mean), var(bn->running_var);
  TORCH_CHECK(mean.numel() == channels && var.numel() == channels, "fused gates: ", what,
              " BatchNorm statistics have ", mean.numel(), " values, expected ", channels);
  for (int64_t i = 0; i < channels; ++i) {
    const float inv_std = 1.0f / std::sqrt(var[i] + static_cast<float>(bn->eps));
    const float s = w.data() != nullptr ? w[i] * inv_std : inv_std;
    const float t = beta.data() != nullptr ? beta[i] : 0.0f;
    a.shift[i] = (a.shift[i] - mean[i]) * s + t;
    a.scale[i] = s;
  }
  return a;
}

// The channel MLP with its weights read once per call (fc2 transposed to [rd,C], so that its
// product is rd axpys over the channels).
class Mlp {
 public:
  Mlp(const ChannelMlp& m, int64_t channels)
      : c_(channels),
        rd_(m.fc1_weight.size(0)),
        w1_(m.fc1_weight),
        b2_(m.fc2_bias),
        hidden_(affine_of(m.fc1_bias, m.bn, rd_, "MLP hidden layer")) {
    const Values w2(m.fc2_weight);
    TORCH_CHECK(w1_.numel() == rd_ * c_ && w2.numel() == c_ * rd_, "fused gates: MLP weights of ",
                w1_.numel(), " and ", w2.numel(), " values do not match ", c_,
                " channels and width ", rd_);
    TORCH_CHECK(b2_.data() == nullptr || b2_.numel() == c_, "fused gates: MLP output bias has ",
                b2_.numel(), " values, expected ", c_);
    w2t_.resize(rd_ * c_);
    for (int64_t ch = 0; ch < c_; ++ch)
      for (int64_t r = 0; r < rd_; ++r) w2t_[r * c_ + ch] = w2[ch * rd_ + r];
  }
  int64_t width() const { return rd_; }
  int64_t macs() const { return 2 * c_ * rd_; }

  // out[c] = fc2(relu(bn(fc1(v)))); hidden: rd floats of scratch.
  void operator()(const float* v, float* hidden, float* out) const {
    for (int64_t r = 0; r < rd_; ++r) {
      const float h = hidden_(r, dot(w1_.data() + r * c_, v, c_));
      hidden[r] = h < 0.0f ? 0.0f : h;  // ReLU; NaN stays NaN, as in ATen's
    }
    if (b2_.data() != nullptr) {
      std::copy(b2_.data(), b2_.data() + c_, out);
    } else {
      std::fill(out, out + c_, 0.0f);
    }
    for (int64_t r = 0; r < rd_; ++r) axpy(hidden[r], w2t_.data() + r * c_, out, c_);
  }

 private:
  int64_t c_, rd_;
  Values w1_, b2_;
  Affine hidden_;
  std::vector<float> w2t_;
};

// Zero-padded planes for "same" convolutions: `planes` maps of h x w with `pad` zeros around,
// and the slack conv_same_ext() reads past the last plane.
struct PaddedPlanes {
  PaddedPlanes(int64_t planes, int64_t h, int64_t w, int64_t pad)
      : h(h),
        w(w),
        pad(pad),
        hp(h + 2 * pad),
        wp(w + 2 * pad),
        data(planes * hp * wp + 2 * pad, 0.0f) {}
  int64_t plane_size() const { return hp * wp; }
  float* interior(int64_t i, int64_t y) { return data.data() + i * hp * wp + (y + pad) * wp + pad; }

  int64_t h, w, pad, hp, wp;
  std::vector<float> data;
};

// ---- Per-image driver ----

// One image of a [N,C,H,W] float input and of the output, in either layout: element (c, pixel)
// at c * hw + pixel (NCHW) or pixel * c + c (channels-last).
struct Image {
  int64_t index;  // in the batch
  const float* x;
  float* y;
  int64_t c, h, w, hw;
  bool channels_last;
};

// Runs fn(image) for every image of x, in parallel across images; with a single image, fn's own
// parallel loops use the threads (at::parallel_for runs inline inside a parallel region).
template <class F>
torch::Tensor for_each_image(const torch::Tensor& x, F&& fn) {
  auto y = torch::empty_like(x);  // same strides as x: contiguous or channels-last
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t image = c * h * w;
  const bool channels_last = !x.is_contiguous();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      fn(Image{i, xp + i * image, yp + i * image, c, h, w, h * w, channels_last});
  });
  ++g_calls;
  return y;
}

// mean[c] = mean over the pixels of channel c; max[c] likewise when max is not null.
void pool_pixels(const Image& im, float* mean, float* max) {
  if (!im.channels_last) {
    at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
#ifdef DYNATTN_HAVE_VEC16
      if (max != nullptr && im.hw >= detail::vec16::kLanes && sixteen_lane_kernels_pay()) {
        pool_max_nchw16(im.x, im.hw, begin, end, mean, max);
        return;
      }
#endif
      pool_nchw(im.x, im.hw, begin, end, mean, max);
    });
  } else {
    // Each task walks every pixel for its block of channels.
    at::parallel_for(
        0, im.c, std::max<int64_t>(16, grain_for(im.hw)),
        [&](int64_t begin, int64_t end) { pool_cl(im.x, im.c, im.hw, begin, end, mean, max); });
  }
}

// y = x * gate[c] * (pixel_gate ? pixel_gate[p] : 1).
void apply_gates(const Image& im, const float* gate, const float* pixel_gate) {
  if (!im.channels_last) {
    at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
      gate_nchw(im.x, im.y, im.hw, begin, end, gate, pixel_gate);
    });
  } else {
    at::parallel_for(0, im.hw, grain_for(im.c), [&](int64_t begin, int64_t end) {
      gate_cl(im.x, im.y, im.c, begin, end, gate, pixel_gate);
    });
  }
}

// y = x + x * s of BAM over one image.
void apply_bam_combine(const Image& im, const BamCombine& k) {
  if (!im.channels_last) {
    at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
#ifdef DYNATTN_HAVE_VEC16
      if (k.factor && sixteen_lane_kernels_pay())
        return bam_combine_factor_nchw16(im.x, im.y, im.hw, begin, end, k.ec, k.es);
#endif
      bam_combine_nchw(im.x, im.y, im.hw, begin, end, k);
    });
  } else {
    at::parallel_for(0, im.hw, grain_for(im.c), [&](int64_t begin, int64_t end) {
#ifdef DYNATTN_HAVE_VEC16
      if (k.factor && im.c % detail::vec16::kLanes == 0 && sixteen_lane_kernels_pay()) {
        bam_combine_factor_cl16(im.x, im.y, im.c, begin, end, k.ec, k.es);
        return;
      }
#endif
      bam_combine_cl(im.x, im.y, im.c, begin, end, k);
    });
  }
}
}  // namespace

bool fused_gates_apply(const torch::Tensor& x, std::initializer_list<torch::Tensor> params) {
  return !torch::GradMode::is_enabled() && fused_gates_train_apply(x, params);
}

bool fused_gates_train_apply(const torch::Tensor& x, std::initializer_list<torch::Tensor> params) {
  if (!dynattn_kernels_enabled()) return false;
  if (!x.defined() || x.layout() != torch::kStrided || !x.is_cpu() ||
      x.scalar_type() != torch::kFloat || x.dim() != 4 || x.numel() == 0)
    return false;
  if (!x.is_contiguous() && !x.is_contiguous(torch::MemoryFormat::ChannelsLast)) return false;
  for (const auto& p : params) {
    if (p.defined() &&
        (p.layout() != torch::kStrided || !p.is_cpu() || p.scalar_type() != torch::kFloat))
      return false;
  }
  return true;
}

int64_t fused_gates_calls() {
  return g_calls.load();
}

bool bam_spatial_in_kernel(int64_t batch, int64_t rd) {
  return !bam_spatial_branch_pays_off(batch, rd) && (rd <= 4 || (batch <= 2 && rd <= 16));
}

torch::Tensor fused_squeeze_excitation(const torch::Tensor& x, const ChannelMlp& mlp,
                                       GateFunction gate) {
  const Mlp fc(mlp, x.size(1));
  record_macs("dynattn::fused_squeeze_excitation", x.size(0) * fc.macs());
  return for_each_image(x, [&](const Image& im) {
    std::vector<float> pooled(im.c), logits(im.c), hidden(fc.width());
    pool_pixels(im, pooled.data(), nullptr);
    fc(pooled.data(), hidden.data(), logits.data());
    if (gate == GateFunction::Sigmoid) {
      sigmoid_inplace(logits.data(), im.c);
    } else {
      hard_sigmoid_inplace(logits.data(), im.c);
    }
    apply_gates(im, logits.data(), nullptr);
  });
}

torch::Tensor fused_efficient_channel_attention(const torch::Tensor& x, const torch::Tensor& weight,
                                                const torch::Tensor& bias) {
  const Values w(weight), b(bias);
  const int64_t k = w.numel(), pad = (k - 1) / 2;
  TORCH_CHECK(k % 2 == 1 && (b.data() == nullptr || b.numel() == 1),
              "fused gates: ECA needs an odd kernel and at most one bias, got ", weight.sizes());
  const float b0 = b.data() != nullptr ? b[0] : 0.0f;
  record_macs("dynattn::fused_efficient_channel_attention", x.size(0) * x.size(1) * k);
  return for_each_image(x, [&](const Image& im) {
    std::vector<float> pooled(im.c), gate(im.c);
    pool_pixels(im, pooled.data(), nullptr);
    for (int64_t ch = 0; ch < im.c; ++ch) {
      float v = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t src = ch + j - pad;
        if (src >= 0 && src < im.c) v += w[j] * pooled[src];
      }
      gate[ch] = v + b0;
    }
    sigmoid_inplace(gate.data(), im.c);
    apply_gates(im, gate.data(), nullptr);
  });
}

torch::Tensor fused_cbam(const torch::Tensor& x, const ChannelMlp& mlp,
                         const CbamSpatialWeights& spatial) {
  const Mlp fc(mlp, x.size(1));
  const Values conv_w(spatial.weight);
  const int64_t k = spatial.weight.size(-1);
  TORCH_CHECK(k % 2 == 1 && conv_w.numel() == 2 * k * k,
              "fused gates: CBAM's spatial conv must be [1,2,k,k] with odd k, got ",
              spatial.weight.sizes());
  const Affine epilogue = affine_of(spatial.bias, spatial.bn, 1, "CBAM spatial conv");
  const int64_t hw = x.size(2) * x.size(3);
  record_macs("dynattn::fused_cbam", x.size(0) * (2 * fc.macs() + hw * 2 * k * k));
  return for_each_image(x, [&](const Image& im) {
    // Channel gate: both descriptors from one pass, the shared MLP on each, logits summed.
    std::vector<float> avg(im.c), top(im.c), gate(im.c), logits(im.c), hidden(fc.width());
    pool_pixels(im, avg.data(), top.data());
    fc(avg.data(), hidden.data(), gate.data());
    fc(top.data(), hidden.data(), logits.data());
    for (int64_t ch = 0; ch < im.c; ++ch) gate[ch] += logits[ch];
    sigmoid_inplace(gate.data(), im.c);

    // Spatial gate: the channel max and mean of x * M_c per pixel, straight into the padded
    // input planes of the conv, which runs on the padded row width.
    PaddedPlanes maps(2, im.h, im.w, k / 2);
    const int64_t max_plane = spatial.max_first ? 0 : 1, mean_plane = 1 - max_plane;
    const float inv_c = 1.0f / static_cast<float>(im.c);
    at::parallel_for(0, im.h, grain_for(im.w * im.c), [&](int64_t y0, int64_t y1) {
      const int64_t p0 = y0 * im.w, p1 = y1 * im.w;
      std::vector<float> sum(p1 - p0), max(p1 - p0);
      if (!im.channels_last) {
        channel_stats_nchw(im.x, im.c, im.hw, gate.data(), p0, p1, sum.data(), max.data());
      } else {
        int64_t done = 0;
#ifdef DYNATTN_HAVE_VEC16
        // Called from here, not from channel_stats_cl's clones: GCC binds a call between
        // multi-versioned functions to the caller's own ISA, and those have no AVX-512 clone.
        if (im.c % detail::vec16::kLanes == 0 && sixteen_lane_kernels_pay()) {
          done = (p1 - p0) / detail::vec16::kLanes * detail::vec16::kLanes;
          channel_stats_cl16(im.x, im.c, gate.data(), p0, p0 + done, sum.data(), max.data());
        }
#endif
        std::vector<float> scratch(im.c);
        channel_stats_cl(im.x, im.c, gate.data(), p0 + done, p1, sum.data() + done,
                         max.data() + done, scratch.data());
      }
      for (int64_t y = y0; y < y1; ++y) {
        float* mean_row = maps.interior(mean_plane, y);
        float* max_row = maps.interior(max_plane, y);
        for (int64_t j = 0; j < im.w; ++j) {
          mean_row[j] = sum[(y - y0) * im.w + j] * inv_c;
          max_row[j] = max[(y - y0) * im.w + j];
        }
      }
    });
    std::vector<float> ext(im.h * maps.wp), pixel_gate(im.hw);
    at::parallel_for(0, im.h, grain_for(maps.wp * 2 * k * k), [&](int64_t y0, int64_t y1) {
      same_conv_rows(maps.data.data(), 2, maps.plane_size(), maps.wp, conv_w.data(), 1, k, 1, y0,
                     y1, ext.data(), 0);
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t j = 0; j < im.w; ++j)
          pixel_gate[y * im.w + j] = epilogue(0, ext[y * maps.wp + j]);
      }
      sigmoid_inplace(pixel_gate.data() + y0 * im.w, (y1 - y0) * im.w);
    });
    apply_gates(im, gate.data(), pixel_gate.data());
  });
}

torch::Tensor fused_bam(const torch::Tensor& x, const ChannelMlp& mlp,
                        const BamSpatialWeights* spatial, const torch::Tensor& spatial_logits,
                        bool product) {
  const Mlp fc(mlp, x.size(1));
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  int64_t macs = n * fc.macs();

  // The spatial branch's weights, when it runs here.
  const int64_t rd = spatial != nullptr ? spatial->reduce_weight.size(0) : 0;
  const int64_t dil = spatial != nullptr ? spatial->dilation : 1;
  std::vector<Affine> epilogues;
  const Values reduce_w(spatial != nullptr ? spatial->reduce_weight : torch::Tensor());
  const Values di0_w(spatial != nullptr ? spatial->dilated_weight[0] : torch::Tensor());
  const Values di1_w(spatial != nullptr ? spatial->dilated_weight[1] : torch::Tensor());
  const Values final_w(spatial != nullptr ? spatial->final_weight : torch::Tensor());
  float final_b = 0.0f;
  if (spatial != nullptr) {
    TORCH_CHECK(reduce_w.numel() == rd * c && di0_w.numel() == rd * rd * 9 &&
                    di1_w.numel() == rd * rd * 9 && final_w.numel() == rd && dil > 0,
                "fused gates: BAM's spatial branch weights do not match ", c,
                " channels and width ", rd);
    epilogues.push_back(affine_of(spatial->reduce_bias, spatial->reduce_bn, rd, "BAM reduce"));
    for (int i = 0; i < 2; ++i)
      epilogues.push_back(
          affine_of(spatial->dilated_bias[i], spatial->dilated_bn[i], rd, "BAM dilated conv"));
    const Values fb(spatial->final_bias);
    if (fb.data() != nullptr) final_b = fb[0];
    macs += n * hw * (c * rd + 2 * rd * rd * 9 + rd);
  } else {
    TORCH_CHECK(spatial_logits.defined() && spatial_logits.numel() == n * hw &&
                    spatial_logits.scalar_type() == torch::kFloat,
                "fused gates: BAM needs the spatial logits [N,1,H,W], got ",
                spatial_logits.defined() ? spatial_logits.sizes() : torch::IntArrayRef{});
  }
  const auto given_logits = spatial != nullptr ? torch::Tensor() : spatial_logits.contiguous();
  record_macs("dynattn::fused_bam", macs);

  const float* given = given_logits.defined() ? given_logits.data_ptr<float>() : nullptr;
  return for_each_image(x, [&](const Image& im) {
    std::vector<float> pooled(im.c), mc(im.c), hidden(fc.width()), ms(im.hw);
    pool_pixels(im, pooled.data(), nullptr);
    fc(pooled.data(), hidden.data(), mc.data());
    if (spatial == nullptr) {
      std::copy(given + im.index * im.hw, given + (im.index + 1) * im.hw, ms.begin());
    } else {
      // reduce (1x1, C -> rd) + BN + ReLU into padded planes, two dilated 3x3 convs + BN + ReLU
      // on the padded row width, the final 1x1 (rd -> 1).
      PaddedPlanes a(rd, im.h, im.w, dil), b(rd, im.h, im.w, dil);
      std::vector<float> reduced(rd * im.hw), ext(rd * im.h * a.wp);
      at::parallel_for(0, im.h, grain_for(im.w * im.c * rd), [&](int64_t y0, int64_t y1) {
        if (!im.channels_last) {
          reduce_nchw(im.x, im.c, im.hw, reduce_w.data(), rd, y0 * im.w, y1 * im.w, reduced.data());
        } else {
          reduce_cl(im.x, im.c, im.hw, reduce_w.data(), rd, y0 * im.w, y1 * im.w, reduced.data());
        }
        for (int64_t r = 0; r < rd; ++r) {
          affine_relu_rows(reduced.data() + r * im.hw + y0 * im.w, im.w, a.interior(r, y0), a.wp,
                           y1 - y0, im.w, epilogues[0].scale[r], epilogues[0].shift[r]);
        }
      });
      PaddedPlanes* src = &a;
      PaddedPlanes* dst = &b;
      const float* dilated[2] = {di0_w.data(), di1_w.data()};
      for (int i = 0; i < 2; ++i) {
        at::parallel_for(0, im.h, grain_for(a.wp * rd * rd * 9), [&](int64_t y0, int64_t y1) {
          same_conv_rows(src->data.data(), rd, src->plane_size(), src->wp, dilated[i], rd, 3, dil,
                         y0, y1, ext.data(), im.h * src->wp);
          for (int64_t r = 0; r < rd; ++r) {
            affine_relu_rows(ext.data() + r * im.h * src->wp + y0 * src->wp, src->wp,
                             dst->interior(r, y0), dst->wp, y1 - y0, im.w,
                             epilogues[1 + i].scale[r], epilogues[1 + i].shift[r]);
          }
        });
        std::swap(src, dst);
      }
      for (int64_t y = 0; y < im.h; ++y) {
        float* out = ms.data() + y * im.w;
        std::fill(out, out + im.w, final_b);
        for (int64_t r = 0; r < rd; ++r) axpy(final_w[r], src->interior(r, y), out, im.w);
      }
    }

    apply_bam_combine(im, BamCombineTerms(mc.data(), ms.data(), im.c, im.hw, product).k);
  });
}

// ---- Training forms (SE, ECA) ----
namespace detail {

torch::Tensor bam_combine_forward(const torch::Tensor& x, const torch::Tensor& mc,
                                  const torch::Tensor& ms, bool product) {
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  const float *mcp = mc.data_ptr<float>(), *msp = ms.data_ptr<float>();
  return for_each_image(x, [&](const Image& im) {
    apply_bam_combine(im,
                      BamCombineTerms(mcp + im.index * c, msp + im.index * hw, c, hw, product).k);
  });
}

void bam_combine_backward(const torch::Tensor& x, const torch::Tensor& grad,
                          const torch::Tensor& mc, const torch::Tensor& ms, bool product,
                          torch::Tensor& dx, torch::Tensor& dmc, torch::Tensor& dms) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = !x.is_contiguous();
  const auto dy = grad.contiguous(channels_last ? torch::MemoryFormat::ChannelsLast
                                                : torch::MemoryFormat::Contiguous);
  dx = torch::empty_like(x);
  dmc = torch::zeros({n, c});
  dms = torch::empty({n, hw});
  const float *xp = x.data_ptr<float>(), *dyp = dy.data_ptr<float>(), *mcp = mc.data_ptr<float>(),
              *msp = ms.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dmcp = dmc.data_ptr<float>(), *dmsp = dms.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const BamCombineTerms terms(mcp + i * c, msp + i * hw, c, hw, product);
      const int64_t offset = i * c * hw;
      std::mutex merge;
      // Pixel ranges in parallel (a single image's threads); each sums its own share of dmc.
      at::parallel_for(0, hw, grain_for(c), [&](int64_t p0, int64_t p1) {
        std::vector<float> partial(c, 0.0f), scratch(2 * (channels_last ? c : p1 - p0));
        const auto run = [&] {
#ifdef DYNATTN_HAVE_VEC16
          if (terms.k.factor && sixteen_lane_kernels_pay()) {
            if (!channels_last)
              return bam_combine_factor_backward_nchw16(xp + offset, dyp + offset, dxp + offset, c,
                                                        hw, p0, p1, terms.k.ec, terms.k.es,
                                                        partial.data(), dmsp + i * hw);
            if (c % detail::vec16::kLanes == 0)
              return bam_combine_factor_backward_cl16(xp + offset, dyp + offset, dxp + offset, c,
                                                      p0, p1, terms.k.ec, terms.k.es,
                                                      partial.data(), dmsp + i * hw);
          }
#endif
          if (!channels_last)
            return bam_combine_backward_nchw(xp + offset, dyp + offset, dxp + offset, c, hw, p0, p1,
                                             terms.k, partial.data(), dmsp + i * hw,
                                             scratch.data());
          bam_combine_backward_cl(xp + offset, dyp + offset, dxp + offset, c, p0, p1, terms.k,
                                  partial.data(), dmsp + i * hw, scratch.data());
        };
        run();
        std::lock_guard<std::mutex> lock(merge);
        for (int64_t ch = 0; ch < c; ++ch) dmcp[i * c + ch] += partial[ch];
      });
    }
  });
}

}  // namespace detail

namespace {

// gs[ch] = sum_p dy * x over channels [c0, c1) of an NCHW image.
DYNATTN_VECTOR_CLONES
void gate_grad_nchw(const float* dy, const float* x, int64_t hw, int64_t c0, int64_t c1,
                    float* gs) {
  for (int64_t ch = c0; ch < c1; ++ch) gs[ch] = dot(dy + ch * hw, x + ch * hw, hw);
}

// The same over pixels [p0, p1) of a channels-last image, added into gs (c floats).
DYNATTN_VECTOR_CLONES
void gate_grad_cl(const float* dy, const float* x, int64_t c, int64_t p0, int64_t p1, float* gs) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ a = dy + p * c;
    const float* __restrict__ b = x + p * c;
    for (int64_t ch = 0; ch < c; ++ch) gs[ch] += a[ch] * b[ch];
  }
}

// dx = dy * s[ch] + add[ch], channels [c0, c1) of an NCHW image.
DYNATTN_VECTOR_CLONES
void input_grad_nchw(const float* dy, float* dx, int64_t hw, int64_t c0, int64_t c1, const float* s,
                     const float* add) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* __restrict__ src = dy + ch * hw;
    float* __restrict__ dst = dx + ch * hw;
    const float a = s[ch], b = add[ch];
    for (int64_t p = 0; p < hw; ++p) dst[p] = src[p] * a + b;
  }
}

// The same for pixels [p0, p1) of a channels-last image.
DYNATTN_VECTOR_CLONES
void input_grad_cl(const float* dy, float* dx, int64_t c, int64_t p0, int64_t p1, const float* s,
                   const float* add) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ src = dy + p * c;
    float* __restrict__ dst = dx + p * c;
    for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch] * s[ch] + add[ch];
  }
}

// The gradient of the gate with respect to x's pixels: gs[n, c] = sum_p dy * x (dy in x's layout).
torch::Tensor gate_gradient(const torch::Tensor& dy, const torch::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = !x.is_contiguous();
  auto gs = torch::zeros({n, c});
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* g = gs.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *a = dyp + i * c * hw, *b = xp + i * c * hw;
      float* out = g + i * c;
      if (!channels_last) {
        at::parallel_for(0, c, grain_for(hw),
                         [&](int64_t c0, int64_t c1) { gate_grad_nchw(a, b, hw, c0, c1, out); });
      } else {
        gate_grad_cl(a, b, c, 0, hw, out);
      }
    }
  });
  return gs;
}

// dx = dy * s + d_mean / HW per channel, in x's layout.
torch::Tensor input_gradient(const torch::Tensor& dy, const torch::Tensor& x, const float* s,
                             const float* d_mean) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = !x.is_contiguous();
  auto dx = torch::empty_like(x);
  const float* dyp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> add(c);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t ch = 0; ch < c; ++ch) add[ch] = d_mean[i * c + ch] / static_cast<float>(hw);
      const float* a = dyp + i * c * hw;
      float* out = dxp + i * c * hw;
      const float* si = s + i * c;
      if (!channels_last) {
        at::parallel_for(0, c, grain_for(hw), [&](int64_t c0, int64_t c1) {
          input_grad_nchw(a, out, hw, c0, c1, si, add.data());
        });
      } else {
        at::parallel_for(0, hw, grain_for(c), [&](int64_t p0, int64_t p1) {
          input_grad_cl(a, out, c, p0, p1, si, add.data());
        });
      }
    }
  });
  return dx;
}

// d logits = gs * gate'(logits), from the saved logits.
void gate_backward(float* gs, const float* logits, const float* s, int64_t count,
                   GateFunction gate) {
  for (int64_t i = 0; i < count; ++i) {
    if (gate == GateFunction::Sigmoid) {
      gs[i] *= s[i] * (1.0f - s[i]);
    } else {  // ATen's hardsigmoid_backward: 1/6 strictly inside (-3, 3)
      gs[i] = (logits[i] > -3.0f && logits[i] < 3.0f) ? gs[i] / 6.0f : 0.0f;
    }
  }
}

// Custom autograd functions take no undefined tensors: absent weights travel as empty ones.
torch::Tensor or_empty(const torch::Tensor& t) {
  return t.defined() ? t : torch::empty({0});
}
torch::Tensor or_undefined(const torch::Tensor& t) {
  return t.numel() == 0 ? torch::Tensor() : t;
}

torch::Tensor grad_like(const torch::Tensor& t) {
  return t.defined() && t.numel() > 0 ? torch::zeros(t.sizes(), t.options()) : torch::Tensor();
}

// Backward of one row through the channel MLP logits = w2 relu(w1 v + b1) + b2 (w1 [rd,C],
// w2 [C,rd] row-major): adds into the weight gradients (gb1/gb2 may be null) and into dv.
void mlp_backward(const float* dlogits, const float* hidden, const float* v, const Values& w1,
                  const Values& w2, int64_t c, int64_t rd, float* gw1, float* gb1, float* gw2,
                  float* gb2, float* dv) {
  for (int64_t r = 0; r < rd; ++r) {
    double a = 0.0;  // d hidden[r] = sum_c dlogits[c] w2[c, r]; double: it may cancel
    for (int64_t ch = 0; ch < c; ++ch) {
      a += static_cast<double>(dlogits[ch]) * w2[ch * rd + r];
      gw2[ch * rd + r] += dlogits[ch] * hidden[r];
    }
    const float dz = hidden[r] > 0.0f ? static_cast<float>(a) : 0.0f;  // ReLU
    if (gb1 != nullptr) gb1[r] += dz;
    for (int64_t ch = 0; ch < c; ++ch) {
      gw1[r * c + ch] += dz * v[ch];
      dv[ch] += dz * w1[r * c + ch];
    }
  }
  if (gb2 != nullptr)
    for (int64_t ch = 0; ch < c; ++ch) gb2[ch] += dlogits[ch];
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Pooled channel gate, one node: SE (w1, b1, w2, b2: the MLP) or ECA (w1 = conv weight, b1).
class PooledChannelGate : public torch::autograd::Function<PooledChannelGate> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w1_in, const torch::Tensor& b1_in,
                               const torch::Tensor& w2_in, const torch::Tensor& b2_in, bool eca,
                               int64_t gate) {
    const auto w1 = or_undefined(w1_in), b1 = or_undefined(b1_in), w2 = or_undefined(w2_in),
               b2 = or_undefined(b2_in);
    const int64_t n = x.size(0), c = x.size(1);
    const auto fn = static_cast<GateFunction>(gate);
    auto pooled = torch::empty({n, c}), logits = torch::empty({n, c}), s = torch::empty({n, c});
    const int64_t rd = eca ? 0 : w1.size(0);
    auto hidden = torch::empty({n, std::max<int64_t>(rd, 1)});
    float *pp = pooled.data_ptr<float>(), *lp = logits.data_ptr<float>(), *sp = s.data_ptr<float>(),
          *hp = hidden.data_ptr<float>();
    std::unique_ptr<Mlp> mlp;
    std::unique_ptr<Values> w, b;
    if (eca) {
      w = std::make_unique<Values>(w1);
      b = std::make_unique<Values>(b1);
      TORCH_CHECK(w->numel() % 2 == 1 && (b->data() == nullptr || b->numel() == 1),
                  "fused gates: ECA needs an odd kernel and at most one bias, got ", w1.sizes());
      record_macs("dynattn::fused_efficient_channel_attention", n * c * w->numel());
    } else {
      mlp = std::make_unique<Mlp>(ChannelMlp{w1, b1, w2, b2}, c);
      record_macs("dynattn::fused_squeeze_excitation", n * mlp->macs());
    }
    auto y = for_each_image(x, [&](const Image& im) {
      float *pool = pp + im.index * c, *logit = lp + im.index * c, *gate_s = sp + im.index * c;
      pool_pixels(im, pool, nullptr);
      if (eca) {
        const int64_t k = w->numel(), pad = (k - 1) / 2;
        for (int64_t ch = 0; ch < c; ++ch) {
          float v = b->data() != nullptr ? (*b)[0] : 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t src = ch + j - pad;
            if (src >= 0 && src < c) v += (*w)[j] * pool[src];
          }
          logit[ch] = v;
        }
      } else {
        (*mlp)(pool, hp + im.index * rd, logit);
      }
      std::copy(logit, logit + c, gate_s);
      if (fn == GateFunction::Sigmoid) {
        sigmoid_inplace(gate_s, c);
      } else {
        hard_sigmoid_inplace(gate_s, c);
      }
      apply_gates(im, gate_s, nullptr);
    });
    ctx->save_for_backward({x, w1_in, b1_in, w2_in, b2_in});
    ctx->saved_data["pooled"] = pooled;
    ctx->saved_data["logits"] = logits;
    ctx->saved_data["s"] = s;
    ctx->saved_data["hidden"] = hidden;
    ctx->saved_data["eca"] = eca;
    ctx->saved_data["gate"] = gate;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto w1 = or_undefined(saved[1]), b1 = or_undefined(saved[2]),
               w2 = or_undefined(saved[3]), b2 = or_undefined(saved[4]);
    const auto pooled = ctx->saved_data["pooled"].toTensor();
    const auto logits = ctx->saved_data["logits"].toTensor();
    const auto s = ctx->saved_data["s"].toTensor();
    const auto hidden = ctx->saved_data["hidden"].toTensor();
    const bool eca = ctx->saved_data["eca"].toBool();
    const auto fn = static_cast<GateFunction>(ctx->saved_data["gate"].toInt());
    const int64_t n = x.size(0), c = x.size(1);
    const auto dy = grads[0].contiguous(x.is_contiguous() ? torch::MemoryFormat::Contiguous
                                                          : torch::MemoryFormat::ChannelsLast);
    // d logits, then back through the MLP or the 1-D conv to the pooled means.
    auto dl = gate_gradient(dy, x);
    float* dlp = dl.data_ptr<float>();
    gate_backward(dlp, logits.data_ptr<float>(), s.data_ptr<float>(), n * c, fn);
    auto d_mean = torch::zeros({n, c});
    float* dm = d_mean.data_ptr<float>();
    const float* pp = pooled.data_ptr<float>();
    auto g_w1 = grad_like(w1), g_b1 = grad_like(b1), g_w2 = grad_like(w2), g_b2 = grad_like(b2);
    if (eca) {
      const Values w(w1);
      const int64_t k = w.numel(), pad = (k - 1) / 2;
      float* gw = g_w1.data_ptr<float>();
      float gb = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const float *d = dlp + i * c, *p = pp + i * c;
        float* m = dm + i * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          gb += d[ch];
          for (int64_t j = 0; j < k; ++j) {
            const int64_t src = ch + j - pad;
            if (src < 0 || src >= c) continue;
            gw[j] += d[ch] * p[src];
            m[src] += w[j] * d[ch];
          }
        }
      }
      if (g_b1.defined()) g_b1.fill_(gb);
    } else {
      const Values v1(w1), v2(w2);
      const int64_t rd = w1.size(0);
      const float* hp = hidden.data_ptr<float>();
      float *gw1 = g_w1.data_ptr<float>(), *gw2 = g_w2.data_ptr<float>();
      float* gb1 = g_b1.defined() ? g_b1.data_ptr<float>() : nullptr;
      float* gb2 = g_b2.defined() ? g_b2.data_ptr<float>() : nullptr;
      for (int64_t i = 0; i < n; ++i)
        mlp_backward(dlp + i * c, hp + i * rd, pp + i * c, v1, v2, c, rd, gw1, gb1, gw2, gb2,
                     dm + i * c);
    }
    auto dx = input_gradient(dy, x, s.data_ptr<float>(), dm);
    return {dx, g_w1, g_b1, g_w2, g_b2, torch::Tensor(), torch::Tensor()};
  }
};

// ---- CBAM's training form ----

// The first position of the maximum `best` of p[0..n) whose sum is `sum` (a NaN sum means a NaN
// in the row, or inf - inf): the first NaN after element 0 wins (then *best becomes it), else
// element 0, as in a scan that keeps the first maximum and stops at a NaN.
DYNATTN_ALWAYS_INLINE int32_t first_position_of_max(const float* p, int64_t n, float sum,
                                                    float* best) {
  int64_t where = -1;
  if (std::isnan(sum)) {
    for (int64_t i = 1; i < n && where < 0; ++i)
      if (std::isnan(p[i])) where = i;
    if (where < 0 && std::isnan(p[0])) where = 0;
    if (where >= 0) *best = p[where];
  }
  if (where < 0) {
    where = 0;
    while (where + 1 < n && !(p[where] == *best)) ++where;
  }
  return static_cast<int32_t>(where);
}

// Per channel of [c0, c1): mean, max and the first pixel holding the max, the sum and maximum
// from sum_max(p, n, &sum, &max) (an inlined functor, so that it is built for the caller's ISA).
template <typename SumMax>
DYNATTN_ALWAYS_INLINE void pool_argmax_channels(SumMax sum_max, const float* x, int64_t hw,
                                                int64_t c0, int64_t c1, float* mean, float* max,
                                                int32_t* at) {
  // Vectorised sum and maximum, then one scan to the maximum's first position (a scan that
  // compares and branches per element mispredicts on real data). A NaN sum means a NaN in the
  // channel (or inf - inf): the first NaN after element 0 wins, else element 0, as in a scan
  // that keeps the first maximum and stops at a NaN.
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* p = x + ch * hw;
    float sum, best;
    sum_max(p, hw, &sum, &best);
    at[ch] = first_position_of_max(p, hw, sum, &best);
    mean[ch] = sum / static_cast<float>(hw);
    max[ch] = best;
  }
}

struct SumMaxOf {
  DYNATTN_ALWAYS_INLINE void operator()(const float* p, int64_t n, float* sum, float* max) const {
    sum_max_of(p, n, sum, max);
  }
};

DYNATTN_VECTOR_CLONES
void pool_argmax_nchw(const float* x, int64_t hw, int64_t c0, int64_t c1, float* mean, float* max,
                      int32_t* at) {
  pool_argmax_channels(SumMaxOf{}, x, hw, c0, c1, mean, max, at);
}

// Per pixel of [p0, p1): max (and its channel) and mean over channels of x * gate.
DYNATTN_VECTOR_CLONES
void channel_argmax_nchw(const float* x, int64_t c, int64_t hw, const float* gate, int64_t p0,
                         int64_t p1, float* mean, float* max, int32_t* at) {
  const int64_t len = p1 - p0;
  for (int64_t p = 0; p < len; ++p) {
    mean[p] = max[p] = x[p0 + p] * gate[0];
    at[p] = 0;
  }
  for (int64_t ch = 1; ch < c; ++ch) {
    const float* src = x + ch * hw + p0;
    const float g = gate[ch];
    for (int64_t p = 0; p < len; ++p) {
      const float v = src[p] * g;
      mean[p] += v;
      const bool better = v > max[p];
      max[p] = better ? v : max[p];
      at[p] = better ? static_cast<int32_t>(ch) : at[p];
    }
  }
  const float inv_c = 1.0f / static_cast<float>(c);
  for (int64_t p = 0; p < len; ++p) mean[p] *= inv_c;
}

// d x1 = dy * ms + dmean / C + [ch == at] dmax, where x1 = x * M_c; one image, channel ch.
struct CbamPixelGrads {
  const float *ms, *dmean, *dmax;
  const int32_t* at;
  float inv_c;
};

// dmc[ch] = sum_p d x1 * x over channels [c0, c1).
DYNATTN_VECTOR_CLONES
void cbam_channel_grad_nchw(const float* dy, const float* x, int64_t hw, int64_t c0, int64_t c1,
                            const CbamPixelGrads& g, float* dmc) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* a = dy + ch * hw;
    const float* b = x + ch * hw;
    float acc = 0.0f;
    for (int64_t p = 0; p < hw; ++p) {
      const float d = a[p] * g.ms[p] + g.dmean[p] * g.inv_c + (g.at[p] == ch ? g.dmax[p] : 0.0f);
      acc += d * b[p];
    }
    dmc[ch] = acc;
  }
}

// dx = d x1 * M_c + d_avg / HW + [p == at_c] d_max_c over channels [c0, c1).
DYNATTN_VECTOR_CLONES
void cbam_input_grad_nchw(const float* dy, float* dx, int64_t hw, int64_t c0, int64_t c1,
                          const CbamPixelGrads& g, const float* mc, const float* davg,
                          const float* dmaxpool, const int32_t* pool_at) {
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float* a = dy + ch * hw;
    float* out = dx + ch * hw;
    const float m = mc[ch], add = davg[ch] / static_cast<float>(hw);
    for (int64_t p = 0; p < hw; ++p) {
      const float d = a[p] * g.ms[p] + g.dmean[p] * g.inv_c + (g.at[p] == ch ? g.dmax[p] : 0.0f);
      out[p] = d * m + add;
    }
    out[pool_at[ch]] += dmaxpool[ch];
  }
}

// dms[p] = sum_c dy * x * M_c[c], pixels [p0, p1) of one NCHW image.
DYNATTN_VECTOR_CLONES
void cbam_pixel_grad_nchw(const float* dy, const float* x, int64_t c, int64_t hw, const float* mc,
                          int64_t p0, int64_t p1, float* dms) {
  const int64_t len = p1 - p0;
  std::fill(dms, dms + len, 0.0f);
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* a = dy + ch * hw + p0;
    const float* b = x + ch * hw + p0;
    const float m = mc[ch];
    for (int64_t p = 0; p < len; ++p) dms[p] += a[p] * b[p] * m;
  }
}

#ifdef DYNATTN_HAVE_VEC16
// The NCHW training kernels above on 16-float vectors, for AVX-512 (see channel_stats_cl16):
// GCC left cbam_channel_grad_nchw and cbam_input_grad_nchw scalar (the per-pixel argmax test, and
// a sequential sum), channel_argmax_nchw's running maxima in memory, and pool_argmax_nchw's sum
// and maximum scalar: together about 60% of CBAM's NCHW training step at batch 64. The same
// operations per element; the sums over pixels (and the mean pooling's) add in another order.

DYNATTN_ALWAYS_INLINE detail::vec16::IVec load_ints(const int32_t* p, int64_t lanes) {
  detail::vec16::IVec v{};
  if (lanes == detail::vec16::kLanes) {
    std::memcpy(&v, p, sizeof v);
  } else {
#pragma GCC unroll 16
    for (int64_t l = 0; l < detail::vec16::kLanes; ++l)
      if (l < lanes) v[l] = p[l];
  }
  return v;
}

// d x1 (see CbamPixelGrads) at channel ch, pixels [p, p + lanes) of one image.
DYNATTN_ALWAYS_INLINE detail::vec16::Vec cbam_pixel_grads16(const CbamPixelGrads& g,
                                                            const float* dy_row, int64_t ch,
                                                            int64_t p, int64_t lanes) {
  namespace v16 = detail::vec16;
  // All ones where at == ch, from integer arithmetic: GCC 12's AVX-512 expansion of a lane
  // compare failed here (an internal compiler error).
  const v16::IVec diff = load_ints(g.at + p, lanes) - static_cast<int32_t>(ch);
  const v16::IVec here = ~((diff | -diff) >> 31);
  const v16::Vec dmax = (v16::Vec)((v16::IVec)v16::load(g.dmax + p, lanes) & here);
  return v16::load(dy_row + p, lanes) * v16::load(g.ms + p, lanes) +
         v16::load(g.dmean + p, lanes) * g.inv_c + dmax;
}

DYNATTN_KERNEL_CLONES
void cbam_channel_grad_nchw16(const float* dy, const float* x, int64_t hw, int64_t c0, int64_t c1,
                              const CbamPixelGrads& g, float* dmc) {
  namespace v16 = detail::vec16;
  for (int64_t ch = c0; ch < c1; ++ch) {
    v16::Vec acc{};
    for (int64_t p = 0; p < hw; p += v16::kLanes) {
      const int64_t lanes = std::min(v16::kLanes, hw - p);
      acc += cbam_pixel_grads16(g, dy + ch * hw, ch, p, lanes) * v16::load(x + ch * hw + p, lanes);
    }
    dmc[ch] = v16::lanes_sum(acc);
  }
}

DYNATTN_KERNEL_CLONES
void cbam_input_grad_nchw16(const float* dy, float* dx, int64_t hw, int64_t c0, int64_t c1,
                            const CbamPixelGrads& g, const float* mc, const float* davg,
                            const float* dmaxpool, const int32_t* pool_at) {
  namespace v16 = detail::vec16;
  for (int64_t ch = c0; ch < c1; ++ch) {
    float* out = dx + ch * hw;
    const float m = mc[ch], add = davg[ch] / static_cast<float>(hw);
    for (int64_t p = 0; p < hw; p += v16::kLanes) {
      const int64_t lanes = std::min(v16::kLanes, hw - p);
      v16::store(out + p, cbam_pixel_grads16(g, dy + ch * hw, ch, p, lanes) * m + add, lanes);
    }
    out[pool_at[ch]] += dmaxpool[ch];
  }
}

// Sixteen pixels' maxima, argmaxima and sums stay in registers across the channels.
DYNATTN_KERNEL_CLONES
void channel_argmax_nchw16(const float* x, int64_t c, int64_t hw, const float* gate, int64_t p0,
                           int64_t p1, float* mean, float* max, int32_t* at) {
  namespace v16 = detail::vec16;
  const float inv_c = 1.0f / static_cast<float>(c);
  for (int64_t p = p0; p < p1; p += v16::kLanes) {
    const int64_t lanes = std::min(v16::kLanes, p1 - p);
    v16::Vec sum = v16::load(x + p, lanes) * gate[0], best = sum;
    v16::IVec where{};
    for (int64_t ch = 1; ch < c; ++ch) {
      const v16::Vec v = v16::load(x + ch * hw + p, lanes) * gate[ch];
      sum += v;
      const v16::IVec better = v > best;
      best = better ? v : best;
      where = better ? static_cast<int32_t>(ch) : where;
    }
    v16::store(mean + (p - p0), sum * inv_c, lanes);
    v16::store(max + (p - p0), best, lanes);
    if (lanes == v16::kLanes) {
      std::memcpy(at + (p - p0), &where, sizeof where);
    } else {
      for (int64_t l = 0; l < lanes; ++l) at[p - p0 + l] = where[l];
    }
  }
}

struct VectorSumMaxOf {
  DYNATTN_ALWAYS_INLINE void operator()(const float* p, int64_t n, float* sum, float* max) const {
    vector_sum_max_of(p, n, sum, max);
  }
};

// pool_argmax_nchw with the sum and maximum on 16-float vectors, for hw >= 16.
DYNATTN_KERNEL_CLONES
void pool_argmax_nchw16(const float* x, int64_t hw, int64_t c0, int64_t c1, float* mean, float* max,
                        int32_t* at) {
  pool_argmax_channels(VectorSumMaxOf{}, x, hw, c0, c1, mean, max, at);
}
#endif

// ---- CBAM's training form, channels-last twins (element (p, ch) at p * c + ch) ----

// Per channel: mean, max and the first pixel holding the max (the first NaN if any), over the
// pixels of one image.
DYNATTN_VECTOR_CLONES
void pool_argmax_cl(const float* x, int64_t c, int64_t hw, float* mean, float* max, int32_t* at) {
  std::copy(x, x + c, max);
  std::copy(x, x + c, mean);
  std::fill(at, at + c, 0);
  for (int64_t p = 1; p < hw; ++p) {
    const float* src = x + p * c;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float v = src[ch];
      mean[ch] += v;
      const bool better = v > max[ch] || (std::isnan(v) && !std::isnan(max[ch]));
      max[ch] = better ? v : max[ch];
      at[ch] = better ? static_cast<int32_t>(p) : at[ch];
    }
  }
  const float inv_hw = 1.0f / static_cast<float>(hw);
  for (int64_t ch = 0; ch < c; ++ch) mean[ch] *= inv_hw;
}

// Per pixel of [p0, p1): max (and its channel) and mean over channels of x * gate.
DYNATTN_VECTOR_CLONES
void channel_argmax_cl(const float* x, int64_t c, const float* gate, int64_t p0, int64_t p1,
                       float* mean, float* max, int32_t* at) {
  const float inv_c = 1.0f / static_cast<float>(c);
  for (int64_t p = p0; p < p1; ++p) {
    const float* src = x + p * c;
    float sum = src[0] * gate[0], best = sum;
    int32_t where = 0;
    for (int64_t ch = 1; ch < c; ++ch) {
      const float v = src[ch] * gate[ch];
      sum += v;
      if (v > best) {
        best = v;
        where = static_cast<int32_t>(ch);
      }
    }
    mean[p - p0] = sum * inv_c;
    max[p - p0] = best;
    at[p - p0] = where;
  }
}

// dms[p] = sum_c dy * x * M_c[c], pixels [p0, p1).
DYNATTN_VECTOR_CLONES
void cbam_pixel_grad_cl(const float* dy, const float* x, int64_t c, const float* mc, int64_t p0,
                        int64_t p1, float* dms) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ a = dy + p * c;
    const float* __restrict__ b = x + p * c;
    float acc = 0.0f;
    for (int64_t ch = 0; ch < c; ++ch) acc += a[ch] * b[ch] * mc[ch];
    dms[p - p0] = acc;
  }
}

// dmc[ch] += sum_p d x1 * x over pixels [p0, p1) (see cbam_channel_grad_nchw).
DYNATTN_VECTOR_CLONES
void cbam_channel_grad_cl(const float* dy, const float* x, int64_t c, int64_t p0, int64_t p1,
                          const CbamPixelGrads& g, float* dmc) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ a = dy + p * c;
    const float* __restrict__ b = x + p * c;
    const float s = g.ms[p], base = g.dmean[p] * g.inv_c;
    for (int64_t ch = 0; ch < c; ++ch) dmc[ch] += (a[ch] * s + base) * b[ch];
    dmc[g.at[p]] += g.dmax[p] * b[g.at[p]];
  }
}

// dx = d x1 * M_c + d_avg / HW over pixels [p0, p1); the max-pool term is added by the caller.
DYNATTN_VECTOR_CLONES
void cbam_input_grad_cl(const float* dy, float* dx, int64_t c, int64_t hw, int64_t p0, int64_t p1,
                        const CbamPixelGrads& g, const float* mc, const float* davg) {
  const float inv_hw = 1.0f / static_cast<float>(hw);
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ a = dy + p * c;
    float* __restrict__ out = dx + p * c;
    const float s = g.ms[p], base = g.dmean[p] * g.inv_c;
    for (int64_t ch = 0; ch < c; ++ch) out[ch] = (a[ch] * s + base) * mc[ch] + davg[ch] * inv_hw;
    out[g.at[p]] += g.dmax[p] * mc[g.at[p]];
  }
}

// CBAM as one autograd node (NCHW or channels-last float input): both gates, the product, and a
// hand-written backward of three passes over the map; the spatial conv and its BatchNorm (batch
// statistics in training, running statistics updated as ATen's) run as ATen operators on the small
// [N,2,H,W] and [N,1,H,W] maps.
class CbamGate : public torch::autograd::Function<CbamGate> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w1_in, const torch::Tensor& b1_in,
                               const torch::Tensor& w2_in, const torch::Tensor& b2_in,
                               const torch::Tensor& conv_w, const torch::Tensor& conv_b_in,
                               const torch::Tensor& bn_w_in, const torch::Tensor& bn_b_in,
                               const torch::Tensor& running_mean, const torch::Tensor& running_var,
                               bool max_first, bool bn_training, double momentum, double eps) {
    const auto w1 = or_undefined(w1_in), b1 = or_undefined(b1_in), w2 = or_undefined(w2_in),
               b2 = or_undefined(b2_in), conv_b = or_undefined(conv_b_in),
               bn_w = or_undefined(bn_w_in), bn_b = or_undefined(bn_b_in),
               rm = or_undefined(running_mean), rv = or_undefined(running_var);
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
    const Mlp fc(ChannelMlp{w1, b1, w2, b2}, c);
    const int64_t rd = fc.width(), k = conv_w.size(-1);
    record_macs("dynattn::fused_cbam", n * (2 * fc.macs() + hw * 2 * k * k));
    auto avg = torch::empty({n, c}), mx = torch::empty({n, c}), mc = torch::empty({n, c});
    auto hidden = torch::empty({n, 2, rd});
    auto pool_at = torch::empty({n, c}, torch::kInt);
    auto stats = torch::empty({n, 2, h, w});
    auto chan_at = torch::empty({n, hw}, torch::kInt);
    const float* xp = x.data_ptr<float>();
    float *ap = avg.data_ptr<float>(), *mp = mx.data_ptr<float>(), *mcp = mc.data_ptr<float>(),
          *hp = hidden.data_ptr<float>(), *sp = stats.data_ptr<float>();
    int32_t *pap = pool_at.data_ptr<int32_t>(), *cap = chan_at.data_ptr<int32_t>();
    const int64_t max_plane = max_first ? 0 : 1;
    const bool cl = !x.is_contiguous();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> logits(c);
      for (int64_t i = begin; i < end; ++i) {
        const float* xi = xp + i * c * hw;
        float *a = ap + i * c, *m = mp + i * c, *g = mcp + i * c;
        if (cl) {
          pool_argmax_cl(xi, c, hw, a, m, pap + i * c);
        } else {
          at::parallel_for(0, c, grain_for(hw), [&](int64_t c0, int64_t c1) {
#ifdef DYNATTN_HAVE_VEC16
            if (hw >= detail::vec16::kLanes && sixteen_lane_kernels_pay())
              return pool_argmax_nchw16(xi, hw, c0, c1, a, m, pap + i * c);
#endif
            pool_argmax_nchw(xi, hw, c0, c1, a, m, pap + i * c);
          });
        }
        fc(a, hp + (i * 2) * rd, g);
        fc(m, hp + (i * 2 + 1) * rd, logits.data());
        for (int64_t ch = 0; ch < c; ++ch) g[ch] += logits[ch];
        sigmoid_inplace(g, c);
        float* st = sp + i * 2 * hw;
        at::parallel_for(0, hw, grain_for(c), [&](int64_t p0, int64_t p1) {
          if (cl) {
            channel_argmax_cl(xi, c, g, p0, p1, st + (1 - max_plane) * hw + p0,
                              st + max_plane * hw + p0, cap + i * hw + p0);
          } else {
#ifdef DYNATTN_HAVE_VEC16
            if (sixteen_lane_kernels_pay())
              return channel_argmax_nchw16(xi, c, hw, g, p0, p1, st + (1 - max_plane) * hw + p0,
                                           st + max_plane * hw + p0, cap + i * hw + p0);
#endif
            channel_argmax_nchw(xi, c, hw, g, p0, p1, st + (1 - max_plane) * hw + p0,
                                st + max_plane * hw + p0, cap + i * hw + p0);
          }
        });
      }
    });
    // The spatial gate on the small maps: conv, BN (train: batch statistics), sigmoid.
    auto pre = same_conv2d_forward(stats, conv_w.contiguous(), conv_b);
    torch::Tensor bn_out = pre, save_mean, save_invstd;
    const bool has_bn = rm.defined();
    if (has_bn) {
      std::tie(bn_out, save_mean, save_invstd) =
          torch::native_batch_norm(pre, bn_w, bn_b, rm, rv, bn_training, momentum, eps);
    }
    auto ms = torch::sigmoid(bn_out);
    auto y = torch::empty_like(x);
    const float* msp = ms.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Image im{i, xp + i * c * hw, yp + i * c * hw, c, h, w, hw, cl};
        apply_gates(im, mcp + i * c, msp + i * hw);
      }
    });
    ++g_calls;
    ctx->save_for_backward({x, w1_in, b1_in, w2_in, b2_in, conv_w, conv_b_in, bn_w_in, bn_b_in});
    for (const auto& kv :
         std::initializer_list<std::pair<const char*, torch::Tensor>>{{"avg", avg},
                                                                      {"mx", mx},
                                                                      {"mc", mc},
                                                                      {"hidden", hidden},
                                                                      {"pool_at", pool_at},
                                                                      {"stats", stats},
                                                                      {"chan_at", chan_at},
                                                                      {"pre", pre},
                                                                      {"ms", ms}})
      ctx->saved_data[kv.first] = kv.second;
    if (has_bn) {
      ctx->saved_data["save_mean"] = save_mean;
      ctx->saved_data["save_invstd"] = save_invstd;
      ctx->saved_data["rm"] = rm;
      ctx->saved_data["rv"] = rv;
    }
    ctx->saved_data["has_bn"] = has_bn;
    ctx->saved_data["max_first"] = max_first;
    ctx->saved_data["bn_training"] = bn_training;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto w1 = or_undefined(saved[1]), b1 = or_undefined(saved[2]),
               w2 = or_undefined(saved[3]), b2 = or_undefined(saved[4]), conv_w = saved[5],
               conv_b = or_undefined(saved[6]), bn_w = or_undefined(saved[7]),
               bn_b = or_undefined(saved[8]);
    auto get = [&](const char* key) { return ctx->saved_data[key].toTensor(); };
    const auto avg = get("avg"), mx = get("mx"), mc = get("mc"), hidden = get("hidden"),
               pool_at = get("pool_at"), stats = get("stats"), chan_at = get("chan_at"),
               pre = get("pre"), ms = get("ms");
    const bool has_bn = ctx->saved_data["has_bn"].toBool();
    const bool max_first = ctx->saved_data["max_first"].toBool();
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
    const bool cl = !x.is_contiguous();
    const auto dy = grads[0].contiguous(cl ? torch::MemoryFormat::ChannelsLast
                                           : torch::MemoryFormat::Contiguous);
    const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *mcp = mc.data_ptr<float>();
    // Pass 1: d M_s, then back through sigmoid, BN and the conv to the pooled maps.
    auto dms = torch::empty({n, 1, h, w});
    float* dmsp = dms.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        at::parallel_for(0, hw, grain_for(c), [&](int64_t p0, int64_t p1) {
          if (cl) {
            cbam_pixel_grad_cl(dyp + i * c * hw, xp + i * c * hw, c, mcp + i * c, p0, p1,
                               dmsp + i * hw + p0);
          } else {
            cbam_pixel_grad_nchw(dyp + i * c * hw, xp + i * c * hw, c, hw, mcp + i * c, p0, p1,
                                 dmsp + i * hw + p0);
          }
        });
      }
    });
    auto d_bn_out = dms * ms * (1 - ms);
    torch::Tensor d_pre = d_bn_out, g_bn_w, g_bn_b;
    if (has_bn) {
      std::tie(d_pre, g_bn_w, g_bn_b) = torch::native_batch_norm_backward(
          d_bn_out, pre, bn_w, get("rm"), get("rv"), get("save_mean"), get("save_invstd"),
          ctx->saved_data["bn_training"].toBool(), ctx->saved_data["eps"].toDouble(),
          {true, bn_w.defined(), bn_b.defined()});
    }
    const auto conv_grads = same_conv2d_backward(stats, conv_w.contiguous(), d_pre, 1);
    const auto d_stats = conv_grads.input.contiguous();
    auto g_conv_w = conv_grads.weight.reshape(conv_w.sizes());
    torch::Tensor g_conv_b;
    if (conv_b.defined()) g_conv_b = d_pre.sum().reshape(conv_b.sizes());
    // Pass 2: d M_c; the channel MLP backward; pass 3: dx.
    const float *dsp = d_stats.data_ptr<float>(), *msp = ms.data_ptr<float>();
    const int32_t *cap = chan_at.data_ptr<int32_t>(), *pap = pool_at.data_ptr<int32_t>();
    const int64_t max_plane = max_first ? 0 : 1;
    auto dmc = torch::empty({n, c});
    float* dmcp = dmc.data_ptr<float>();
    auto grads_of = [&](int64_t i) {
      const float* ds = dsp + i * 2 * hw;
      return CbamPixelGrads{msp + i * hw, ds + (1 - max_plane) * hw, ds + max_plane * hw,
                            cap + i * hw, 1.0f / static_cast<float>(c)};
    };
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto g = grads_of(i);
        if (cl) {
          std::fill(dmcp + i * c, dmcp + (i + 1) * c, 0.0f);
          cbam_channel_grad_cl(dyp + i * c * hw, xp + i * c * hw, c, 0, hw, g, dmcp + i * c);
          continue;
        }
        at::parallel_for(0, c, grain_for(hw), [&](int64_t c0, int64_t c1) {
#ifdef DYNATTN_HAVE_VEC16
          if (sixteen_lane_kernels_pay())
            return cbam_channel_grad_nchw16(dyp + i * c * hw, xp + i * c * hw, hw, c0, c1, g,
                                            dmcp + i * c);
#endif
          cbam_channel_grad_nchw(dyp + i * c * hw, xp + i * c * hw, hw, c0, c1, g, dmcp + i * c);
        });
      }
    });
    const Values v1(w1), v2(w2);
    const int64_t rd = w1.size(0);
    auto g_w1 = grad_like(w1), g_b1 = grad_like(b1), g_w2 = grad_like(w2), g_b2 = grad_like(b2);
    float *gw1 = g_w1.data_ptr<float>(), *gw2 = g_w2.data_ptr<float>();
    float* gb1 = g_b1.defined() ? g_b1.data_ptr<float>() : nullptr;
    float* gb2 = g_b2.defined() ? g_b2.data_ptr<float>() : nullptr;
    auto davg = torch::zeros({n, c}), dmaxpool = torch::zeros({n, c});
    float *dap = davg.data_ptr<float>(), *dmp = dmaxpool.data_ptr<float>();
    const float *ap = avg.data_ptr<float>(), *mp = mx.data_ptr<float>(),
                *hp = hidden.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float* dl = dmcp + i * c;  // d logits = d M_c * M_c (1 - M_c), for both descriptors
      for (int64_t ch = 0; ch < c; ++ch) dl[ch] *= mcp[i * c + ch] * (1.0f - mcp[i * c + ch]);
      mlp_backward(dl, hp + (i * 2) * rd, ap + i * c, v1, v2, c, rd, gw1, gb1, gw2, gb2,
                   dap + i * c);
      mlp_backward(dl, hp + (i * 2 + 1) * rd, mp + i * c, v1, v2, c, rd, gw1, gb1, gw2, gb2,
                   dmp + i * c);
    }
    auto dx = torch::empty_like(x);
    float* dxp = dx.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto g = grads_of(i);
        if (cl) {
          float* out = dxp + i * c * hw;
          at::parallel_for(0, hw, grain_for(c), [&](int64_t p0, int64_t p1) {
            cbam_input_grad_cl(dyp + i * c * hw, out, c, hw, p0, p1, g, mcp + i * c, dap + i * c);
          });
          for (int64_t ch = 0; ch < c; ++ch) out[pap[i * c + ch] * c + ch] += dmp[i * c + ch];
          continue;
        }
        at::parallel_for(0, c, grain_for(hw), [&](int64_t c0, int64_t c1) {
#ifdef DYNATTN_HAVE_VEC16
          if (sixteen_lane_kernels_pay())
            return cbam_input_grad_nchw16(dyp + i * c * hw, dxp + i * c * hw, hw, c0, c1, g,
                                          mcp + i * c, dap + i * c, dmp + i * c, pap + i * c);
#endif
          cbam_input_grad_nchw(dyp + i * c * hw, dxp + i * c * hw, hw, c0, c1, g, mcp + i * c,
                               dap + i * c, dmp + i * c, pap + i * c);
        });
      }
    });
    return {dx,
            g_w1,
            g_b1,
            g_w2,
            g_b2,
            g_conv_w,
            g_conv_b,
            g_bn_w,
            g_bn_b,
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

// BAM's combine y = x + x * s, s = sigmoid(mc + ms) or sigmoid(mc * ms), as one node: the ATen
// form materialises the broadcast logits, the gate and dy * x, and reduces them again to mc's and
// ms's shapes (some ten passes over the map with its backward); here one pass forward and one
// backward, s recomputed from mc and ms.
class BamCombineGate : public torch::autograd::Function<BamCombineGate> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& mc, const torch::Tensor& ms, bool product) {
    const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
    const auto mcv = mc.reshape({n, c}).contiguous(), msv = ms.reshape({n, hw}).contiguous();
    auto y = detail::bam_combine_forward(x, mcv, msv, product);
    ctx->save_for_backward({x, mcv, msv});
    ctx->saved_data["product"] = product;
    ctx->saved_data["mc_sizes"] = mc.sizes().vec();
    ctx->saved_data["ms_sizes"] = ms.sizes().vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor dx, dmc, dms;
    detail::bam_combine_backward(saved[0], grads[0], saved[1], saved[2],
                                 ctx->saved_data["product"].toBool(), dx, dmc, dms);
    return {dx, dmc.view(ctx->saved_data["mc_sizes"].toIntVector()),
            dms.view(ctx->saved_data["ms_sizes"].toIntVector()), torch::Tensor()};
  }
};

// The mean over H and W with a broadcast (not materialised) gradient.
class MeanOverPixels : public torch::autograd::Function<MeanOverPixels> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x) {
    ctx->saved_data["sizes"] = x.sizes().vec();
    return x.mean({2, 3});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto g = grads[0].div(static_cast<double>(sizes[2] * sizes[3]));
    return {g.view({sizes[0], sizes[1], 1, 1}).expand(sizes)};
  }
};
}  // namespace

torch::Tensor fused_squeeze_excitation_train(const torch::Tensor& x,
                                             const torch::Tensor& fc1_weight,
                                             const torch::Tensor& fc1_bias,
                                             const torch::Tensor& fc2_weight,
                                             const torch::Tensor& fc2_bias, GateFunction gate) {
  return PooledChannelGate::apply(x, fc1_weight, or_empty(fc1_bias), fc2_weight, or_empty(fc2_bias),
                                  false, static_cast<int64_t>(gate));
}

torch::Tensor fused_efficient_channel_attention_train(const torch::Tensor& x,
                                                      const torch::Tensor& weight,
                                                      const torch::Tensor& bias) {
  return PooledChannelGate::apply(x, weight, or_empty(bias), or_empty({}), or_empty({}), true,
                                  static_cast<int64_t>(GateFunction::Sigmoid));
}

torch::Tensor fused_cbam_train(const torch::Tensor& x, const ChannelMlp& mlp,
                               const torch::Tensor& conv_weight, const torch::Tensor& conv_bias,
                               torch::nn::BatchNorm2dImpl* bn, bool max_first) {
  const bool bn_training = bn != nullptr && bn->is_training();
  TORCH_CHECK(bn == nullptr || bn->options.track_running_stats(),
              "fused_cbam_train: the spatial BatchNorm must track running statistics");
  torch::Tensor rm, rv;
  double momentum = 0.0;
  if (bn != nullptr) {
    rm = bn->running_mean;
    rv = bn->running_var;
    if (bn->is_training()) {
      torch::NoGradGuard no_grad;
      bn->num_batches_tracked += 1;
    }
    // As BatchNorm2d: no momentum means a cumulative average over the batches seen.
    momentum = bn->options.momentum().has_value()
                   ? *bn->options.momentum()
                   : 1.0 / static_cast<double>(bn->num_batches_tracked.item<int64_t>());
  }
  return CbamGate::apply(x, mlp.fc1_weight, or_empty(mlp.fc1_bias), mlp.fc2_weight,
                         or_empty(mlp.fc2_bias), conv_weight, or_empty(conv_bias),
                         or_empty(bn ? bn->weight : torch::Tensor()),
                         or_empty(bn ? bn->bias : torch::Tensor()), or_empty(rm), or_empty(rv),
                         max_first, bn_training, momentum, bn ? bn->options.eps() : 1e-5);
}

torch::Tensor fused_bam_combine_train(const torch::Tensor& x, const torch::Tensor& mc,
                                      const torch::Tensor& ms, bool product) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(mc.numel() == n * c && ms.numel() == n * hw, "fused_bam_combine_train: expected M_c ",
              "with ", n * c, " and M_s with ", n * hw, " elements for input ", x.sizes(), ", got ",
              mc.sizes(), " and ", ms.sizes());
  return BamCombineGate::apply(x, mc, ms, product);
}

torch::Tensor mean_over_pixels(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "mean_over_pixels: expected [N,C,H,W], got ", x.sizes());
  return MeanOverPixels::apply(x);
}

}  // namespace dynattn
