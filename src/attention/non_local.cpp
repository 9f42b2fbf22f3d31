#include "dynattn/attention/non_local.h"

#include "../ops/attention_kernel.h"
#include "../ops/batch_norm_add_kernels.h"
#include "../ops/strided_matmul.h"
#include "../ops/vec16.h"
#include "dynattn/ops/batch_norm_add.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/pointwise_conv.h"
#include "dynattn/ops/softmax_attention.h"
#include "dynattn/profile/mac_counter.h"

#include <algorithm>
#include <cmath>
#include <mutex>

namespace dynattn {
namespace {

constexpr const char* kModule = "NonLocalBlock";

torch::nn::AnyModule make_conv(int64_t dims, int64_t in, int64_t out) {
  switch (dims) {
    case 1:
      return torch::nn::AnyModule(torch::nn::Conv1d(torch::nn::Conv1dOptions(in, out, 1)));
    case 2:
      return torch::nn::AnyModule(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 1)));
    default:
      return torch::nn::AnyModule(torch::nn::Conv3d(torch::nn::Conv3dOptions(in, out, 1)));
  }
}

torch::nn::AnyModule make_batch_norm(int64_t dims, int64_t channels) {
  switch (dims) {
    case 1:
      return torch::nn::AnyModule(torch::nn::BatchNorm1d(channels));
    case 2:
      return torch::nn::AnyModule(torch::nn::BatchNorm2d(channels));
    default:
      return torch::nn::AnyModule(torch::nn::BatchNorm3d(channels));
  }
}

// The larger of two floats, NaN if either is (as torch::maximum).
inline float nan_max(float a, float b) {
  const float larger = a > b ? a : b;  // b when either is NaN
  return a != a ? a : larger;
}

#ifdef DYNATTN_HAVE_VEC16
using detail::vec16::IVec;
using detail::vec16::kLanes;
using detail::vec16::Vec;

// nan_max lane-wise: the max pattern (b's NaN kept), then a's NaN through a mask. GCC lowers
// other forms (a select on a compound condition, or of a != a) lane by lane.
DYNATTN_ALWAYS_INLINE Vec nan_max(Vec a, Vec b) {
  const Vec larger = a > b ? a : b;
  const IVec ordered = a == a;
  return (Vec)(((IVec)larger & ordered) | ((IVec)a & ~ordered));
}

// 2x2 max pooling of the h x w planes [p0, p1) of src into dst. Over the planes' flat run, two
// whole-vector passes: v[k] = max(x[k], x[k + w]) (the window's two rows), then in place
// u[k] = max(v[k], v[k + 1]) (its two columns); then each window's maximum is picked at its
// top-left element. Positions that pair a plane's last row with the next plane's first are
// computed too and never picked. scratch: (p1 - p0) * h * w floats.
DYNATTN_KERNEL_CLONES
void halve_planes(const float* src, int64_t h, int64_t w, int64_t p0, int64_t p1, float* scratch,
                  float* dst) {
  const int64_t hw = h * w, oh = h / 2, ow = w / 2;
  const float* x = src + p0 * hw;
  const int64_t rows = (p1 - p0) * hw - w, cols = rows - 1;
  int64_t k = 0;
  for (; k + kLanes <= rows; k += kLanes)
    detail::vec16::store(
        scratch + k,
        nan_max(detail::vec16::load(x + k, kLanes), detail::vec16::load(x + k + w, kLanes)),
        kLanes);
  for (; k < rows; ++k) scratch[k] = nan_max(x[k], x[k + w]);
  for (k = 0; k + kLanes <= cols; k += kLanes)
    detail::vec16::store(scratch + k,
                         nan_max(detail::vec16::load(scratch + k, kLanes),
                                 detail::vec16::load(scratch + k + 1, kLanes)),
                         kLanes);
  for (; k < cols; ++k) scratch[k] = nan_max(scratch[k], scratch[k + 1]);
  for (int64_t p = p0; p < p1; ++p) {
    const float* u = scratch + (p - p0) * hw;
    float* o = dst + p * oh * ow;
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j) o[i * ow + j] = u[2 * i * w + 2 * j];
  }
}

// Small planes (the 7x7 maps of a ResNet's last stage): when a plane's pooled rows span at most
// four vectors and its windows fit one, each window element is picked straight from the loaded
// plane by an index permutation, instead of the two passes over every position of the flat
// run above (at 7x7, 49 positions computed for 9 windows).
struct SmallPlanePooling {
  static constexpr int64_t kMaxVectors = 4;
  static bool applies(int64_t h, int64_t w) {
    return h >= 2 && w >= 2 && (h / 2) * (w / 2) <= kLanes &&
           2 * (h / 2) * w <= kMaxVectors * kLanes;
  }
  SmallPlanePooling(int64_t h, int64_t w) : hw(h * w), windows((h / 2) * (w / 2)) {
    const int64_t ow = w / 2;
    vectors = (2 * (h / 2) * w + kLanes - 1) / kLanes;
    whole_vectors = std::min(vectors, hw / kLanes);
    for (int e = 0; e < 4; ++e) element[e] = IVec{};
    for (int64_t b = 0; b < kMaxVectors; ++b) source[b] = IVec{} - 1;
    for (int64_t t = 0; t < windows; ++t) {
      const int64_t top_left = 2 * (t / ow) * w + 2 * (t % ow);
      for (int e = 0; e < 4; ++e) {
        const int64_t at = top_left + (e >> 1) * w + (e & 1);
        element[e][t] = static_cast<int32_t>(at);
        source[at / kLanes][at % kLanes] = static_cast<int32_t>(e * kLanes + t);
      }
    }
  }
  // Floats of vector b that lie in the plane (reads and writes never cross into the next one).
  int64_t lanes(int64_t b) const { return std::min<int64_t>(kLanes, hw - b * kLanes); }

  int64_t hw, windows, vectors, whole_vectors;  // vectors read; those wholly inside the plane
  IVec element[4];           // lane t: plane index of window t's element e (row-major)
  IVec source[kMaxVectors];  // lane l of vector b: e * 16 + t of the window element there, or -1
};

// v[idx[l]] for 16 lanes, v four vectors (indices 0..63).
DYNATTN_ALWAYS_INLINE Vec permute64(const Vec* v, IVec idx) {
#if defined(__clang__)
  Vec out;
  for (int l = 0; l < kLanes; ++l) out[l] = v[(idx[l] >> 4) & 3][idx[l] & 15];
  return out;
#else
  const Vec low = __builtin_shuffle(v[0], v[1], idx), high = __builtin_shuffle(v[2], v[3], idx);
  return (idx & 32) == 0 ? low : high;
#endif
}

// The plane at x as sp.vectors vectors (zeros after the plane's end), and its windows'
// elements v[0..3] with their maximum, as halve_planes computes it.
DYNATTN_ALWAYS_INLINE Vec small_plane_windows(const SmallPlanePooling& sp, const float* x, Vec* v) {
  Vec plane[SmallPlanePooling::kMaxVectors];
#pragma GCC unroll 4
  for (int64_t b = 0; b < SmallPlanePooling::kMaxVectors; ++b) {
    if (b < sp.whole_vectors) {
      std::memcpy(&plane[b], x + b * kLanes, sizeof(Vec));  // one unaligned vector load
    } else {
      plane[b] = b < sp.vectors ? detail::vec16::load(x + b * kLanes, sp.lanes(b)) : Vec{};
    }
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) v[e] = permute64(plane, sp.element[e]);
  return nan_max(nan_max(v[0], v[2]), nan_max(v[1], v[3]));
}

DYNATTN_KERNEL_CLONES
void halve_small_planes(const SmallPlanePooling& sp, const float* src, int64_t p0, int64_t p1,
                        float* dst) {
  Vec v[4];
  for (int64_t p = p0; p < p1; ++p) {
    // A whole vector while it ends inside this range: the lanes past the plane's windows are
    // overwritten by the planes after it. (A partial store is a branch per lane.)
    const bool whole = (p1 - p) * sp.windows >= kLanes;
    detail::vec16::store(dst + p * sp.windows, small_plane_windows(sp, src + p * sp.hw, v),
                         whole ? kLanes : sp.windows);
  }
}
#endif

// halve_by_max on a contiguous float CPU tensor. 2-D: halve_planes; 1-D (and without the vector
// kernels): one pass, the two rows of a window first, then the pairs of columns. Maxima of
// strided slices took ~1 ns per element here (two passes, not vectorised).
torch::Tensor halve_by_max_direct(const torch::Tensor& t, int64_t count) {
  const int64_t w = t.size(-1), h = count == 2 ? t.size(-2) : 1;
  const int64_t ow = w / 2, oh = count == 2 ? h / 2 : 1, rows_per_window = count == 2 ? 2 : 1;
  auto sizes = t.sizes().vec();
  sizes.back() = ow;
  if (count == 2) sizes[sizes.size() - 2] = oh;
  auto out = torch::empty(sizes, t.options());
  const int64_t planes = t.numel() / (h * w);
  const float* src = t.data_ptr<float>();
  float* dst = out.data_ptr<float>();
#ifdef DYNATTN_HAVE_VEC16
  if (count == 2 && SmallPlanePooling::applies(h, w)) {
    const SmallPlanePooling sp(h, w);
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (h * w)),
                     [&](int64_t p0, int64_t p1) { halve_small_planes(sp, src, p0, p1, dst); });
    return out;
  }
  if (count == 2 && h >= 2 && w >= 2) {
    // Chunks of planes whose scratch stays in the L1 cache.
    const int64_t per_chunk = std::max<int64_t>(1, 4096 / (h * w));
    at::parallel_for(0, (planes + per_chunk - 1) / per_chunk, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> scratch(static_cast<size_t>(per_chunk * h * w));
      for (int64_t chunk = c0; chunk < c1; ++chunk)
        halve_planes(src, h, w, chunk * per_chunk, std::min(planes, (chunk + 1) * per_chunk),
                     scratch.data(), dst);
    });
    return out;
  }
#endif
  at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (h * w)), [&](int64_t p0, int64_t p1) {
    std::vector<float> rows(static_cast<size_t>(2 * ow));
    float* m = rows.data();
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t i = 0; i < oh; ++i) {
        const float* r0 = src + (p * h + i * rows_per_window) * w;
        const float* r1 = r0 + (rows_per_window - 1) * w;
        float* o = dst + (p * oh + i) * ow;
        for (int64_t j = 0; j < 2 * ow; ++j) m[j] = nan_max(r0[j], r1[j]);
        for (int64_t j = 0; j < ow; ++j) o[j] = nan_max(m[2 * j], m[2 * j + 1]);
      }
    }
  });
  return out;
}

// Which element of a pooling window of four (row-major) gets its gradient: the first maximum
// m, or the last NaN when m is NaN (max_pool's scan, in double). Integer arithmetic on the
// comparisons instead of branches: which element is largest is a coin toss on real data.
inline int window_argmax(float m, float v0, float v1, float v2, float v3) {
  const int e0 = v0 == m, e1 = v1 == m, e2 = v2 == m;
  const int first = (1 - e0) * (1 + (1 - e1) * (1 + (1 - e2)));
  const int n1 = v1 != v1, n2 = v2 != v2, n3 = v3 != v3, nan = m != m;
  const int last_nan = n3 * 3 + (1 - n3) * (n2 * 2 + (1 - n2) * n1);
  return nan * last_nan + (1 - nan) * first;
}

#ifdef DYNATTN_HAVE_VEC16
// The first of v0..v3 equal to m, for 16 windows at once, as masks (GCC keeps these
// vectorised; with the NaN case added it lowers the whole function lane by lane).
DYNATTN_ALWAYS_INLINE IVec first_equal(Vec m, Vec v0, Vec v1, Vec v2) {
  const auto pick = [](IVec mask, int32_t v, IVec other) { return (mask & v) | (~mask & other); };
  IVec e = IVec{} + 3;
  e = pick(v2 == m, 2, e);
  e = pick(v1 == m, 1, e);
  return pick(v0 == m, 0, e);
}

// add_halve_by_max_gradient's 2-D case for the planes [p0, p1): at every position of their flat
// run, the maximum of the window whose top-left it would be (as halve_planes computes it) and
// which of its four elements window_argmax picks, as whole vectors into `picks`; then each
// window's gradient to its pick. picks: (p1 - p0) * h * w ints.
DYNATTN_KERNEL_CLONES
void halve_gradient_planes(const float* x, const float* g, int64_t h, int64_t w, int64_t p0,
                           int64_t p1, int32_t* picks, float* dx) {
  const int64_t hw = h * w, oh = h / 2, ow = w / 2;
  const float* xs = x + p0 * hw;
  const int64_t count = (p1 - p0) * hw - w - 1;  // positions whose window lies in the run
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) {
    const Vec v0 = detail::vec16::load(xs + k, kLanes),
              v1 = detail::vec16::load(xs + k + 1, kLanes),
              v2 = detail::vec16::load(xs + k + w, kLanes),
              v3 = detail::vec16::load(xs + k + w + 1, kLanes);
    const Vec m = nan_max(nan_max(v0, v2), nan_max(v1, v3));
    const IVec e = first_equal(m, v0, v1, v2);
    std::memcpy(picks + k, &e, sizeof e);
    const float total = detail::vec16::lanes_sum(m);
    if (total != total) {  // a NaN among the maxima (or inf - inf): window_argmax lane by lane
      for (int64_t l = 0; l < kLanes; ++l)
        picks[k + l] = window_argmax(m[l], v0[l], v1[l], v2[l], v3[l]);
    }
  }
  for (; k < count; ++k) {
    const float v0 = xs[k], v1 = xs[k + 1], v2 = xs[k + w], v3 = xs[k + w + 1];
    picks[k] = window_argmax(nan_max(nan_max(v0, v2), nan_max(v1, v3)), v0, v1, v2, v3);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int32_t* e = picks + (p - p0) * hw;
    const float* gp = g + p * oh * ow;
    float* out = dx + p * hw;
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j) {
        const int64_t at = 2 * i * w + 2 * j;
        out[at + (e[at] >> 1) * w + (e[at] & 1)] += gp[i * ow + j];
      }
  }
}

// add_halve_by_max_gradient for small planes [p0, p1): each window's element picks as in
// first_equal (window_argmax lane by lane when a maximum is NaN), the gradient put into the
// picked element's slot, and the slots permuted back to plane positions and added to dx.
DYNATTN_KERNEL_CLONES
void halve_gradient_small_planes(const SmallPlanePooling& sp, const float* x, const float* g,
                                 int64_t p0, int64_t p1, float* dx) {
  Vec v[4];
  for (int64_t p = p0; p < p1; ++p) {
    const Vec m = small_plane_windows(sp, x + p * sp.hw, v);
    // The picks through memory: patching lanes of a vector value in the NaN case makes GCC
    // lower the whole loop lane by lane.
    alignas(64) int32_t picks[kLanes];
    const IVec first = first_equal(m, v[0], v[1], v[2]);
    std::memcpy(picks, &first, sizeof first);
    const float total = detail::vec16::lanes_sum(m);
    if (total != total) {  // a NaN among the maxima (or inf - inf): window_argmax lane by lane
      for (int64_t t = 0; t < sp.windows; ++t)
        picks[t] = window_argmax(m[t], v[0][t], v[1][t], v[2][t], v[3][t]);
    }
    IVec e;
    std::memcpy(&e, picks, sizeof e);
    // Lanes past the plane's windows (the next planes' gradients, read while inside this range)
    // are never permuted back.
    const bool whole = (p1 - p) * sp.windows >= kLanes;
    const Vec gradient = detail::vec16::load(g + p * sp.windows, whole ? kLanes : sp.windows);
    Vec slots[4];
    for (int32_t k = 0; k < 4; ++k) slots[k] = (Vec)((IVec)gradient & (e == k));
    float* out = dx + p * sp.hw;
    for (int64_t b = 0; b < sp.vectors; ++b) {
      const IVec from = sp.source[b];
      const Vec add = (Vec)((IVec)permute64(slots, from) & (from >= 0));
      const int64_t lanes = sp.lanes(b);
      detail::vec16::store(out + b * kLanes, detail::vec16::load(out + b * kLanes, lanes) + add,
                           lanes);
    }
  }
}
#endif

// dx += the input gradient of halve_by_max_direct(t, count) = pooled for the output gradient
// dy (all contiguous): each window's gradient to the element window_argmax picks.
void add_halve_by_max_gradient(const torch::Tensor& t, const torch::Tensor& pooled,
                               const torch::Tensor& dy, int64_t count, torch::Tensor& dx) {
  const int64_t w = t.size(-1), h = count == 2 ? t.size(-2) : 1;
  const int64_t ow = w / 2, oh = count == 2 ? h / 2 : 1;
  const int64_t planes = t.numel() / (h * w);
  const float *x = t.data_ptr<float>(), *m = pooled.data_ptr<float>(), *g = dy.data_ptr<float>();
  float* out = dx.data_ptr<float>();
#ifdef DYNATTN_HAVE_VEC16
  if (count == 2 && SmallPlanePooling::applies(h, w)) {
    const SmallPlanePooling sp(h, w);
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (h * w)), [&](int64_t p0, int64_t p1) {
      halve_gradient_small_planes(sp, x, g, p0, p1, out);
    });
    return;
  }
  if (count == 2 && h >= 2 && w >= 2) {
    const int64_t per_chunk = std::max<int64_t>(1, 4096 / (h * w));
    at::parallel_for(0, (planes + per_chunk - 1) / per_chunk, 1, [&](int64_t c0, int64_t c1) {
      std::vector<int32_t> picks(static_cast<size_t>(per_chunk * h * w));
      for (int64_t chunk = c0; chunk < c1; ++chunk)
        halve_gradient_planes(x, g, h, w, chunk * per_chunk,
                              std::min(planes, (chunk + 1) * per_chunk), picks.data(), out);
    });
    return;
  }
#endif
  at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / (h * w)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t i = 0; i < oh; ++i) {
        const int64_t row = (p * h + i * (count == 2 ? 2 : 1)) * w, o = (p * oh + i) * ow;
        const float* r0 = x + row;
        if (count == 2) {
          const float* r1 = r0 + w;
          for (int64_t j = 0; j < ow; ++j) {
            const int e =
                window_argmax(m[o + j], r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]);
            out[row + (e >> 1) * w + 2 * j + (e & 1)] += g[o + j];
          }
        } else {
          for (int64_t j = 0; j < ow; ++j) {
            const float v0 = r0[2 * j], v1 = r0[2 * j + 1], top = m[o + j];
            // Two elements: as a window of four whose second row repeats nothing larger.
            const int e = top != top ? (v1 != v1) : (v0 != top);
            out[row + 2 * j + e] += g[o + j];
          }
        }
      }
    }
  });
}

// halve_by_max under autograd on a contiguous float CPU tensor: the direct forward, and a
// backward that finds each window's maximum again from the saved input and output, in place of
// LibTorch 1.13's CPU max_pool2d and its backward, which are slow at these shapes.
struct HalveByMaxFunction : torch::autograd::Function<HalveByMaxFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& t,
                               int64_t count) {
    auto out = halve_by_max_direct(t, count);
    ctx->save_for_backward({t, out});
    ctx->saved_data["count"] = count;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto dx = torch::zeros_like(saved[0]);
    add_halve_by_max_gradient(saved[0], saved[1], grads[0].contiguous(),
                              ctx->saved_data["count"].toInt(), dx);
    return {dx, torch::Tensor()};
  }
};

// Max-pooling by 2 over the last `count` dimensions (the paper's video models pool space only,
// 1x2x2), floor for odd sizes. Contiguous float CPU tensors take a direct pass (with the dynattn
// kernel policy, also under autograd): a tenth of the time of LibTorch 1.13's CPU
// max_pool kernel at these shapes. Otherwise max_pool under autograd (its backward is cheaper
// than maximum's), maxima of strided slices without.
torch::Tensor halve_by_max(torch::Tensor t, int64_t count) {
  const bool direct =
      t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() > 0;
  if (torch::GradMode::is_enabled() && t.requires_grad()) {
    if (direct && dynattn_kernels_enabled()) return HalveByMaxFunction::apply(t, count);
    switch (count) {
      case 1:
        return torch::max_pool1d(t, {2}, {2});
      case 2:
        if (t.dim() == 4) return torch::max_pool2d(t, {2, 2}, {2, 2});
        return torch::max_pool3d(t, {1, 2, 2}, {1, 2, 2});
    }
  }
  if (direct) return halve_by_max_direct(t, count);
  for (int64_t d = t.dim() - count; d < t.dim(); ++d) {
    const int64_t half = t.size(d) / 2;
    t = torch::maximum(t.slice(d, 0, 2 * half, 2), t.slice(d, 1, 2 * half, 2));
  }
  return t;
}

// LibTorch 1.13's CPU softmax is fast over long contiguous rows and over the outer dimension of
// short ones: measured at N=64, Q=196, forward + backward, 3.8 vs 2.7 ms for 49 keys, 14.8 vs
// 17.8 ms for 196. The affinity is laid out [N, q, K] from this many keys on, else [N, K, q].
constexpr int64_t kKeysLastFrom = 128;

// timm's make_divisible(v, divisor): round to the nearest multiple, at least `divisor`, and
// never more than 10% below v.
int64_t make_divisible(double v, int64_t divisor) {
  int64_t rounded = std::max(divisor, static_cast<int64_t>(v + divisor / 2.0) / divisor * divisor);
  if (rounded < 0.9 * v) rounded += divisor;
  return rounded;
}

}  // namespace

NonLocalOptions timm_non_local_options(int64_t channels) {
  return NonLocalOptions(channels)
      .inter_channels(make_divisible(channels / 8.0, 8))
      .dims(2)
      .mode("embedded")
      .subsample(false)
      .scale("channels");
}

// What forward needs once per input: the query side (theta, scaled) and the key side (phi, g).
struct NonLocalBlockImpl::Projections {
  torch::Tensor theta;           // [N, D, Q], not yet scaled
  double theta_factor = 1.0;     // the logit scale (1/keys for dot), for theta
  torch::Tensor phi;             // [N, D, K]
  torch::Tensor g;               // [N, inter, K]
  torch::Tensor concat_queries;  // concat: w_theta^T theta_i / K, [N, 1, Q]
  torch::Tensor concat_keys;     // concat: w_phi^T phi_j / K, [N, K, 1]
};

// The weights of the inference path, folded from the modules' parameters, and the products'
// primitives. Rebuilt when a parameter or buffer is replaced or written to (its version).
struct NonLocalBlockImpl::InferencePlan {
  std::mutex mutex;
  std::vector<std::pair<const void*, int64_t>> versions;
  torch::Tensor w_theta, b_theta;  // [inter, C], [inter] (embedded)
  torch::Tensor w_keys;            // [phi; g] [2 inter, C] (embedded), g [inter, C] (gaussian)
  torch::Tensor w_z;               // [C, inter + 1]: z with BN and g's bias folded; bias column
  // For z applied to g first: [phi; W_z' g] [inter + C, C] (embedded), W_z' g [C, C]
  // (gaussian), W_z' being w_z's first inter columns; the output's shift, w_z's last column.
  torch::Tensor w_keys_z, shift;
};

namespace {

// The keys of input x (its positions, halved in the sub-sampled dimensions); 0 when one of
// those has fewer than 2 positions.
int64_t key_count(const NonLocalOptions& options, const torch::Tensor& x) {
  const int64_t pooled_dims = std::min<int64_t>(options.dims(), 2);
  int64_t keys = 1;
  for (int64_t d = x.dim() - options.dims(); d < x.dim(); ++d) {
    const bool pooled = options.subsample() && d >= x.dim() - pooled_dims;
    if (pooled && x.size(d) < 2) return 0;
    keys *= pooled ? x.size(d) / 2 : x.size(d);
  }
  return keys;
}

// Multiply-adds per image of g, the product P g^T and z (inter C K + Q K inter + C inter Q)
// against those of z applied to g first (C C K + Q K C, and W_z W_g once per batch).
bool z_on_keys_takes_fewer_macs(int64_t n, int64_t c, int64_t inter, int64_t q, int64_t k) {
  const double as_defined = static_cast<double>(inter) * c * k +
                            static_cast<double>(q) * k * inter + static_cast<double>(c) * inter * q;
  const double z_first = static_cast<double>(c) * c * k + static_cast<double>(q) * k * c +
                         static_cast<double>(c) * inter * c / static_cast<double>(n);
  return z_first < as_defined;
}

const torch::nn::BatchNormOptions& batch_norm_options(const torch::nn::AnyModule& bn) {
  if (const auto* b = bn.ptr()->as<torch::nn::BatchNorm1d>()) return b->options;
  if (const auto* b = bn.ptr()->as<torch::nn::BatchNorm2d>()) return b->options;
  return bn.ptr()->as<torch::nn::BatchNorm3d>()->options;
}

// Each parameter's and buffer's storage and version; empty when one is an inference tensor
// (made under InferenceMode: it keeps no version, so nothing derived from it can be cached).
std::vector<std::pair<const void*, int64_t>> tensor_versions(const torch::nn::Module& m) {
  std::vector<std::pair<const void*, int64_t>> out;
  for (const auto& list : {m.parameters(), m.buffers()}) {
    for (const auto& t : list) {
      if (t.is_inference()) return {};
      out.emplace_back(t.data_ptr(), t._version());
    }
  }
  return out;
}

}  // namespace

NonLocalBlockImpl::NonLocalBlockImpl(NonLocalOptions options_) : options(std::move(options_)) {
  reset();
}

void NonLocalBlockImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.channels() > 0, kModule, ": channels must be positive, got ", o.channels());
  TORCH_CHECK(o.dims() >= 1 && o.dims() <= 3, kModule, ": dims must be 1, 2 or 3, got ", o.dims());
  const std::string& m = o.mode();
  if (m == "embedded" || m == "embedded_gaussian") {
    mode_ = Mode::Embedded;
  } else if (m == "gaussian") {
    mode_ = Mode::Gaussian;
  } else if (m == "dot" || m == "dot_product") {
    mode_ = Mode::Dot;
  } else if (m == "concat" || m == "concatenation") {
    mode_ = Mode::Concat;
  } else {
    TORCH_CHECK(false, kModule, ": mode must be embedded, gaussian, dot or concat, got '", m, "'");
  }
  if (o.inter_channels().has_value()) {
    inter_ = *o.inter_channels();
    TORCH_CHECK(inter_ > 0, kModule, ": inter_channels must be positive, got ", inter_);
  } else {
    TORCH_CHECK(o.inter_ratio() > 0, kModule, ": inter_ratio must be positive, got ",
                o.inter_ratio());
    inter_ = static_cast<int64_t>(std::floor(o.channels() * o.inter_ratio()));
    TORCH_CHECK(inter_ > 0, kModule, ": inter channels must be positive, got ", inter_, " = floor(",
                o.channels(), " * ", o.inter_ratio(), ")");
  }
  TORCH_CHECK(o.max_affinity_elements() > 0, kModule,
              ": max_affinity_elements must be positive, got ", o.max_affinity_elements());

  const bool softmax = mode_ == Mode::Embedded || mode_ == Mode::Gaussian;
  const std::string& s = o.scale();
  if (s == "auto") {
    logit_scale_ = mode_ == Mode::Embedded ? 1.0 / std::sqrt(static_cast<double>(inter_)) : 1.0;
  } else if (s == "none") {
    logit_scale_ = 1.0;
  } else if (s == "inter" || s == "channels") {
    TORCH_CHECK(softmax, kModule, ": scale '", s,
                "' applies to the softmax modes (embedded, gaussian) only, got mode '", m, "'");
    logit_scale_ = 1.0 / std::sqrt(static_cast<double>(s == "inter" ? inter_ : o.channels()));
  } else {
    TORCH_CHECK(false, kModule, ": scale must be auto, none, inter or channels, got '", s, "'");
  }

  const int64_t c = o.channels();
  theta = phi = torch::nn::AnyModule();
  if (mode_ != Mode::Gaussian) {
    theta = make_conv(o.dims(), c, inter_);
    phi = make_conv(o.dims(), c, inter_);
    register_module("theta", theta.ptr());
    register_module("phi", phi.ptr());
  }
  g = make_conv(o.dims(), c, inter_);
  register_module("g", g.ptr());
  z = make_conv(o.dims(), inter_, c);
  register_module("z", z.ptr());
  bn = make_batch_norm(o.dims(), c);
  register_module("bn", bn.ptr());
  concat_project = nullptr;
  if (mode_ == Mode::Concat) {
    concat_project =
        register_module("concat_project",
                        torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * inter_, 1, 1).bias(false)));
  }

  inference_ = std::make_shared<InferencePlan>();

  // The official code's init: convs N(0, 0.01) with zero bias; BN gamma 0 makes the block the
  // identity at the start, so it can be inserted into a pretrained network.
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    const std::string& name = p.key();
    if (name.rfind("bn.", 0) == 0) {
      p.value().zero_();
    } else if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      p.value().zero_();
    } else {
      p.value().normal_(0.0, 0.01);
    }
  }
}

namespace {

// One of the block's 1x1 convolutions: as ops/pointwise_conv.h where it applies (float CPU,
// oneDNN), else the module's own forward.
torch::Tensor pointwise(torch::nn::AnyModule& conv, const torch::Tensor& x) {
  const auto params = conv.ptr()->named_parameters(/*recurse=*/false);
  const auto& weight = params["weight"];
  if (!pointwise_conv_applicable(x, weight)) return conv.forward(x);
  return pointwise_conv(x, weight, params.contains("bias") ? params["bias"] : torch::Tensor());
}

}  // namespace

NonLocalBlockImpl::Projections NonLocalBlockImpl::project(const torch::Tensor& x) {
  const bool subsample = options.subsample();
  const int64_t pooled_dims = std::min<int64_t>(options.dims(), 2);
  if (subsample) {
    for (int64_t d = x.dim() - pooled_dims; d < x.dim(); ++d) {
      TORCH_CHECK(x.size(d) >= 2, kModule, ": sub-sampling halves the last ", pooled_dims,
                  " dimension(s); expected each of them >= 2, got input ", x.sizes());
    }
  }
  Projections p;
  const auto keys_in = subsample && options.pool_first() ? halve_by_max(x, pooled_dims) : x;
  auto key_projection = [&](torch::nn::AnyModule& conv) {
    auto out = pointwise(conv, keys_in);
    if (subsample && !options.pool_first()) out = halve_by_max(out, pooled_dims);
    return out.flatten(2);
  };
  p.g = key_projection(g);
  const int64_t keys = p.g.size(2);
  switch (mode_) {
    case Mode::Gaussian:
      // f = exp(x_i^T x_j) on the input itself; max-pooling commutes with the identity.
      p.theta = x.flatten(2);
      p.phi = (subsample ? halve_by_max(x, pooled_dims) : x).flatten(2);
      break;
    case Mode::Embedded:
    case Mode::Dot:
      p.theta = pointwise(theta, x).flatten(2);
      p.phi = key_projection(phi);
      break;
    case Mode::Concat: {
      // w^T [theta_i; phi_j] = w_t^T theta_i + w_p^T phi_j: two projections and a broadcast sum
      // instead of materialising the [2*inter, Q, K] concatenation.
      const auto w = concat_project->weight.view({2, inter_});
      const double inv_keys = 1.0 / static_cast<double>(keys);
      p.theta = pointwise(theta, x).flatten(2);
      p.phi = key_projection(phi);
      p.concat_queries = torch::matmul(w[0], p.theta).unsqueeze(1).mul(inv_keys);
      p.concat_keys = torch::matmul(w[1], p.phi).unsqueeze(2).mul(inv_keys);
      return p;
    }
  }
  // Applied to theta (N*D*Q multiplications instead of N*Q*K), or inside softmax_attention.
  p.theta_factor = mode_ == Mode::Dot ? 1.0 / static_cast<double>(keys) : logit_scale_;
  return p;
}

// The affinity f(x_i, x_j)/C(x) of the queries given as theta columns [N, D, q] (concat:
// [N, 1, q]): [N, q, K] when keys_last, else [N, K, q].
torch::Tensor NonLocalBlockImpl::affinity(const Projections& p, const torch::Tensor& theta_columns,
                                          const torch::Tensor& concat_columns,
                                          bool keys_last) const {
  switch (mode_) {
    case Mode::Gaussian:
    case Mode::Embedded:
      return keys_last ? torch::softmax(torch::bmm(theta_columns.transpose(1, 2), p.phi), 2)
                       : torch::softmax(torch::bmm(p.phi.transpose(1, 2), theta_columns), 1);
    case Mode::Dot:
      return keys_last ? torch::bmm(theta_columns.transpose(1, 2), p.phi)
                       : torch::bmm(p.phi.transpose(1, 2), theta_columns);
    case Mode::Concat:
    default:
      return keys_last ? torch::relu(concat_columns.transpose(1, 2) + p.concat_keys.transpose(1, 2))
                       : torch::relu(p.concat_keys + concat_columns);
  }
}

#ifdef DYNATTN_HAVE_ONEDNN
namespace {

// data[j] += data[i * size + j] for i = 1 .. count - 1, in that order per element: a batch of
// per-sample products summed into the first. Cloned per ISA: the baseline build of this loop
// (SSE2) was about 3% of the block's training step at 64@7x7, batch 64.
#ifdef DYNATTN_HAVE_VEC16
DYNATTN_KERNEL_CLONES
#endif
void sum_slices_into_first(float* data, int64_t count, int64_t size) {
  for (int64_t i = 1; i < count; ++i) {
    float* __restrict__ total = data;
    const float* __restrict__ part = data + i * size;
    for (int64_t j = 0; j < size; ++j) total[j] += part[j];
  }
}

// Sum over the batch of out[n] = a[n] b[n]^T, a [N, r, m] and b [N, c, m] contiguous: a weight's
// gradient [r, c] from its output gradient and input.
torch::Tensor weight_gradient(const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t n = a.size(0), r = a.size(1), m = a.size(2), c = b.size(1);
  auto per_sample = torch::empty({n, r, c}, a.options());
  detail::strided_matmul(detail::row_major(n, r, m), a.data_ptr<float>(),
                         detail::transposed(n, m, c), b.data_ptr<float>(),
                         detail::row_major(n, r, c), per_sample.data_ptr<float>());
  // The sum over the batch in place into the first sample (a plain loop: at batch 1 and at these
  // sizes a reduction operator's set-up costs more than the additions).
  sum_slices_into_first(per_sample.data_ptr<float>(), n, r * c);
  return per_sample[0];
}

// sum over the batch and the positions of a [N, r, m] contiguous tensor: [r].
torch::Tensor row_sums(const torch::Tensor& a) {
  const int64_t n = a.size(0), r = a.size(1), m = a.size(2);
  auto out = torch::empty({r}, a.options());
  const float* src = a.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < r; ++i) {
    double total = 0.0;
    for (int64_t s = 0; s < n; ++s) {
      const float* row = src + (s * r + i) * m;
      float part[8] = {};  // independent partial sums: a vectorisable reduction
      int64_t j = 0;
      for (; j + 8 <= m; j += 8)
        for (int l = 0; l < 8; ++l) part[l] += row[j + l];
      for (; j < m; ++j) total += row[j];
      for (float v : part) total += v;
    }
    dst[i] = static_cast<float>(total);
  }
  return out;
}

// The embedded-gaussian block in training mode as one autograd node: the projections as
// shared-weight products, the attention kernel, BN with batch statistics and the residual add,
// and the backward of all of them by hand. Inputs: x, then the convs' weights w_theta, w_phi,
// w_g [inter, C, 1...], w_z [C, inter, 1...] (contiguous: read as matrices), theta's bias, BN's
// weight and bias, then the biases that cannot change the output in training mode: phi's (the
// softmax cancels theta_i^T b for every key of query i), g's and z's (a constant per channel, which
// BN's batch mean removes). Their gradients are exactly 0; their only effect, on BN's running mean,
// is added here.
struct NonLocalTrainingFunction : torch::autograd::Function<NonLocalTrainingFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w_theta, const torch::Tensor& w_phi,
                               const torch::Tensor& w_g, const torch::Tensor& w_z,
                               const torch::Tensor& b_theta, const torch::Tensor& gamma,
                               const torch::Tensor& beta, const torch::Tensor& b_phi,
                               const torch::Tensor& b_g, const torch::Tensor& b_z,
                               torch::Tensor running_mean, torch::Tensor running_var, double factor,
                               double eps, double scale, int64_t pooled_dims, bool z_first) {
    const int64_t n = x.size(0), c = x.size(1), q = x.numel() / (n * c), inter = w_theta.size(0);
    auto theta = torch::empty({n, inter, q}, x.options());
    detail::strided_matmul(detail::row_major(1, inter, c), w_theta.data_ptr<float>(),
                           detail::row_major(n, c, q), x.data_ptr<float>(),
                           detail::row_major(n, inter, q), theta.data_ptr<float>());
    const auto pooled = pooled_dims > 0 ? halve_by_max_direct(x, pooled_dims) : x;
    const int64_t k = pooled.numel() / (n * c);
    // The key side per image: phi, then g, or with z applied to g first, W_z W_g pooled.
    const auto w_phi_g = w_phi.reshape({inter, c}), w_g_m = w_g.reshape({inter, c});
    const auto w_keys =
        torch::cat({w_phi_g, z_first ? torch::mm(w_z.reshape({c, inter}), w_g_m) : w_g_m}, 0);
    const int64_t key_rows = w_keys.size(0), dv = z_first ? c : inter;
    auto keys = torch::empty({n, key_rows, k}, x.options());
    detail::strided_matmul(detail::row_major(1, key_rows, c), w_keys.data_ptr<float>(),
                           detail::row_major(n, c, k), pooled.data_ptr<float>(),
                           detail::row_major(n, key_rows, k), keys.data_ptr<float>());
    auto y = torch::empty({n, dv, q}, x.options());  // z itself when z_first
    auto probs = torch::empty({n, detail::attention_kernel_probs_size(q, k)}, x.options());
    auto args = kernel_args(theta, b_theta, keys, probs, n, inter, dv, q, k, scale);
    args.y = y.data_ptr<float>();
    args.y_stride = dv * q;
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      detail::attention_kernel_forward(detail::attention_kernel_images(args, n0, n1));
    });
    auto z = y;
    if (!z_first) {
      z = torch::empty({n, c, q}, x.options());
      detail::strided_matmul(detail::row_major(1, c, inter), w_z.data_ptr<float>(),
                             detail::row_major(n, inter, q), y.data_ptr<float>(),
                             detail::row_major(n, c, q), z.data_ptr<float>());
    }
    torch::Tensor out, mean, inv_std;
    detail::batch_norm_add_forward(z, x.view({n, c, q}), gamma, beta, running_mean, running_var,
                                   factor, eps, out, mean, inv_std);
    if (running_mean.numel() > 0) {
      // The batch mean BN saw was of W_z y; the block's z also adds W_z b_g + b_z
      // (bookkeeping, not a MAC of the block's forward).
      float* rm = running_mean.data_ptr<float>();
      const float *wz = w_z.data_ptr<float>(), *bg = b_g.data_ptr<float>(),
                  *bz = b_z.data_ptr<float>();
      for (int64_t ch = 0; ch < c; ++ch) {
        double shift = bz[ch];
        for (int64_t i = 0; i < inter; ++i)
          shift += static_cast<double>(wz[ch * inter + i]) * bg[i];
        rm[ch] += static_cast<float>(factor * shift);
      }
    }
    // The MACs of the block as defined, whichever way round z goes (see projects_z_on_keys).
    record_macs("dynattn::pointwise_conv", n * inter * c * (2 * q + 2 * k));
    record_macs("dynattn::softmax_attention", n * q * k * 2 * inter);
    ctx->save_for_backward({x, pooled, theta, keys, probs, z_first ? torch::Tensor() : y, z, mean,
                            inv_std, w_theta, w_keys, w_z, b_theta, gamma, w_g});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["pooled_dims"] = pooled_dims;
    ctx->saved_data["z_first"] = z_first;
    return out.view(x.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto &x = s[0], &pooled = s[1], &theta = s[2], &keys = s[3], &probs = s[4], &y = s[5],
               &z = s[6], &mean = s[7], &inv_std = s[8], &w_theta = s[9], &w_keys = s[10],
               &w_z = s[11], &b_theta = s[12], &gamma = s[13], &w_g = s[14];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t pooled_dims = ctx->saved_data["pooled_dims"].toInt();
    const bool z_first = ctx->saved_data["z_first"].toBool();
    const auto d_out = grads[0].contiguous();
    const int64_t n = x.size(0), c = x.size(1), q = x.numel() / (n * c), inter = w_theta.size(0),
                  k = keys.size(2), key_rows = keys.size(1), dv = z_first ? c : inter;

    torch::Tensor dz, d_gamma, d_beta;
    detail::batch_norm_add_backward(z, gamma, mean, inv_std, d_out.view({n, c, q}), dz, d_gamma,
                                    d_beta);
    // The attention output's gradient: z's own when z was applied to g first.
    torch::Tensor d_wz, dy = dz;
    if (!z_first) {
      d_wz = weight_gradient(dz, y);
      dy = torch::empty({n, inter, q}, x.options());
      detail::strided_matmul(detail::transposed(1, inter, c), w_z.data_ptr<float>(),
                             detail::row_major(n, c, q), dz.data_ptr<float>(),
                             detail::row_major(n, inter, q), dy.data_ptr<float>());
    }

    auto d_theta = torch::empty({n, inter, q}, x.options());
    auto d_keys = torch::empty({n, key_rows, k}, x.options());
    const auto args = kernel_args(theta, b_theta, keys, probs, n, inter, dv, q, k, scale);
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      detail::AttentionKernelGrads g;
      g.dy = dy.data_ptr<float>() + n0 * dv * q;
      g.dy_stride = dv * q;
      g.d_theta = d_theta.data_ptr<float>() + n0 * inter * q;
      g.d_theta_stride = inter * q;
      g.d_phi = d_keys.data_ptr<float>() + n0 * key_rows * k;
      g.d_phi_stride = key_rows * k;
      g.d_g = g.d_phi + inter * k;
      g.d_g_stride = key_rows * k;
      detail::attention_kernel_backward(detail::attention_kernel_images(args, n0, n1), g);
    });

    const auto x3 = x.view({n, c, q});
    const auto d_w_theta = weight_gradient(d_theta, x3);
    const auto d_b_theta = row_sums(d_theta);
    const auto d_w_keys = weight_gradient(d_keys, pooled.view({n, c, k}));
    auto d_wg = d_w_keys.narrow(0, inter, key_rows - inter);
    if (z_first) {  // d(W_z W_g) to its factors
      const auto w_z_m = w_z.reshape({c, inter});
      d_wz = torch::mm(d_wg, w_g.reshape({inter, c}).t());
      d_wg = torch::mm(w_z_m.t(), d_wg);
    }
    // dx = w_theta^T d_theta + d_out (the residual), then the key side's share.
    auto dx = torch::empty_like(x);
    detail::strided_matmul(detail::transposed(1, c, inter), w_theta.data_ptr<float>(),
                           detail::row_major(n, inter, q), d_theta.data_ptr<float>(),
                           detail::row_major(n, c, q), dx.data_ptr<float>(),
                           d_out.data_ptr<float>());
    auto d_pooled = torch::empty_like(pooled);
    detail::strided_matmul(detail::transposed(1, c, key_rows), w_keys.data_ptr<float>(),
                           detail::row_major(n, key_rows, k), d_keys.data_ptr<float>(),
                           detail::row_major(n, c, k), d_pooled.data_ptr<float>());
    if (pooled_dims > 0) {
      add_halve_by_max_gradient(x, pooled, d_pooled, pooled_dims, dx);
    } else {
      dx.add_(d_pooled);
    }
    return {dx,
            d_w_theta.view(w_theta.sizes()),
            d_w_keys.narrow(0, 0, inter).view(w_theta.sizes()),
            d_wg.reshape(w_theta.sizes()),
            d_wz.reshape(w_z.sizes()),
            d_b_theta,
            d_gamma,
            d_beta,
            torch::zeros({inter}, x.options()),  // b_phi, b_g, b_z: exactly 0 (see above)
            torch::zeros({inter}, x.options()),
            torch::zeros({c}, x.options()),
            {},
            {},
            {},
            {},
            {},
            {},
            {}};
  }

  static detail::AttentionKernelArgs kernel_args(const torch::Tensor& theta,
                                                 const torch::Tensor& b_theta,
                                                 const torch::Tensor& keys,
                                                 const torch::Tensor& probs, int64_t n,
                                                 int64_t inter, int64_t dv, int64_t q, int64_t k,
                                                 double scale) {
    const int64_t key_rows = keys.size(1);
    detail::AttentionKernelArgs a;
    a.theta = theta.data_ptr<float>();
    a.theta_stride = inter * q;
    a.theta_bias = b_theta.data_ptr<float>();
    a.phi = keys.data_ptr<float>();
    a.phi_stride = key_rows * k;
    a.g = a.phi + inter * k;
    a.g_stride = key_rows * k;
    a.probs = const_cast<float*>(probs.data_ptr<float>());
    a.count = n;
    a.d = inter;
    a.dv = dv;
    a.q = q;
    a.k = k;
    a.scale = static_cast<float>(scale);
    return a;
  }
};

}  // namespace
#endif

bool NonLocalBlockImpl::training_path_applies(const torch::Tensor& x) const {
#ifdef DYNATTN_HAVE_ONEDNN
  if (!is_training() || mode_ != Mode::Embedded || (options.subsample() && !options.pool_first()) ||
      !dynattn_kernels_enabled() || !x.is_cpu() || x.scalar_type() != torch::kFloat ||
      !x.is_contiguous() || x.numel() == 0 || !batch_norm_options(bn).affine())
    return false;
  const int64_t keys = key_count(options, x);
  if (keys == 0) return false;  // run() reports it
  return detail::attention_kernel_suits(inter_, inter_, keys);
#else
  return false;
#endif
}

bool NonLocalBlockImpl::z_on_keys_pays(const torch::Tensor& x) const {
  if (options.subsample() && !options.pool_first()) return false;  // W_z and max do not commute
  const int64_t n = x.size(0), c = options.channels(), q = x.numel() / (n * c);
  const int64_t k = key_count(options, x), d = mode_ == Mode::Gaussian ? c : inter_;
  return k > 0 && detail::attention_kernel_suits(d, c, k) &&
         z_on_keys_takes_fewer_macs(n, c, inter_, q, k);
}

bool NonLocalBlockImpl::projects_z_on_keys(const torch::Tensor& x) const {
  check_attention_input(kModule, x, options.channels(), options.dims());
  return (inference_path_applies(x) || training_path_applies(x)) && z_on_keys_pays(x);
}

torch::Tensor NonLocalBlockImpl::run_training(const torch::Tensor& x) {
#ifndef DYNATTN_HAVE_ONEDNN
  TORCH_CHECK(false, kModule, ": built without the oneDNN library");
#else
  // One lookup per module (each builds a dictionary), and the weights in their own shapes: a
  // view here would be one more autograd node per weight.
  const auto tp = theta.ptr()->named_parameters(false), pp = phi.ptr()->named_parameters(false),
             gp = g.ptr()->named_parameters(false), zp = z.ptr()->named_parameters(false),
             bp = bn.ptr()->named_parameters(false);
  const auto& bn_options = batch_norm_options(bn);
  const auto buffers = bn.ptr()->named_buffers();
  double factor = bn_options.momentum().has_value() ? *bn_options.momentum() : 0.0;
  torch::Tensor running_mean = torch::empty({0}, x.options()), running_var = running_mean;
  if (bn_options.track_running_stats()) {
    auto count = buffers["num_batches_tracked"];
    {
      torch::NoGradGuard no_grad;
      count.add_(1);
    }
    if (!bn_options.momentum().has_value()) factor = 1.0 / count.item<double>();
    running_mean = buffers["running_mean"];
    running_var = buffers["running_var"];
  }
  const int64_t pooled_dims = options.subsample() ? std::min<int64_t>(options.dims(), 2) : 0;
  return NonLocalTrainingFunction::apply(
      x, tp["weight"], pp["weight"], gp["weight"], zp["weight"], tp["bias"], bp["weight"],
      bp["bias"], pp["bias"], gp["bias"], zp["bias"], running_mean, running_var, factor,
      bn_options.eps(), logit_scale_, pooled_dims, z_on_keys_pays(x));
#endif
}

torch::Tensor NonLocalBlockImpl::run(const torch::Tensor& x, AttentionMaps* maps) {
  check_attention_input(kModule, x, options.channels(), options.dims());
  if (maps == nullptr && inference_path_applies(x)) return run_inference(x);
  if (maps == nullptr && training_path_applies(x)) return run_training(x);
  Projections p = project(x);
  const int64_t batch = x.size(0);
  const int64_t queries = p.theta.size(2);
  const int64_t keys = p.g.size(2);
  const bool concat = mode_ == Mode::Concat;

  const bool keys_last = keys >= kKeysLastFrom;
  // y = g a^T: [N, inter, K] x [N, K, q] gives the [N, inter, Q] layout of z's input directly.
  auto attend = [&](const torch::Tensor& a) {
    return torch::bmm(p.g, keys_last ? a.transpose(1, 2) : a);
  };
  const int64_t per_chunk =
      std::max<int64_t>(1, options.max_affinity_elements() / std::max<int64_t>(1, batch * keys));
  torch::Tensor y;
  const bool softmax_mode = mode_ == Mode::Embedded || mode_ == Mode::Gaussian;
  const bool fused =
      per_chunk >= queries && softmax_mode && softmax_attention_applicable(p.theta, p.phi, p.g);
  if (fused) y = softmax_attention(p.theta, p.phi, p.g, p.theta_factor);
  if (p.theta_factor != 1.0 && (!fused || maps != nullptr)) p.theta = p.theta * p.theta_factor;
  if (fused) {
    // done
  } else if (per_chunk >= queries) {
    y = attend(affinity(p, p.theta, p.concat_queries, keys_last));
  } else {
    std::vector<torch::Tensor> parts;
    for (int64_t start = 0; start < queries; start += per_chunk) {
      const int64_t count = std::min(per_chunk, queries - start);
      parts.push_back(attend(affinity(
          p, p.theta.narrow(2, start, count),
          concat ? p.concat_queries.narrow(2, start, count) : torch::Tensor(), keys_last)));
    }
    y = torch::cat(parts, 2);
  }
  auto shape = x.sizes().vec();
  shape[1] = inter_;
  const auto projected = pointwise(z, y.view(shape));
  torch::Tensor out;
  const auto& bn_options = batch_norm_options(bn);
  if (is_training() && bn_options.affine() && batch_norm_add_applicable(projected, x)) {
    // BN with batch statistics and the residual add in one op; the running statistics and
    // their count as torch::nn::BatchNorm keeps them.
    const auto buffers = bn.ptr()->named_buffers();
    const auto params = bn.ptr()->named_parameters();
    double factor = bn_options.momentum().has_value() ? *bn_options.momentum() : 0.0;
    torch::Tensor running_mean, running_var;
    if (bn_options.track_running_stats()) {
      auto count = buffers["num_batches_tracked"];
      {
        torch::NoGradGuard no_grad;
        count.add_(1);
      }
      if (!bn_options.momentum().has_value()) factor = 1.0 / count.item<double>();
      running_mean = buffers["running_mean"];
      running_var = buffers["running_var"];
    }
    out = batch_norm_add(projected, x, params["weight"], params["bias"], running_mean, running_var,
                         factor, bn_options.eps());
  } else {
    out = bn.forward(projected);
    out.add_(x);  // in place is safe: BN's backward does not need its output
  }

  if (maps != nullptr) {
    std::vector<int64_t> selected = options.map_queries();
    if (selected.empty()) {
      int64_t centre = 0;
      for (int64_t d = 2; d < x.dim(); ++d) centre = centre * x.size(d) + x.size(d) / 2;
      selected.push_back(centre);
    }
    for (int64_t q : selected) {
      TORCH_CHECK(q >= 0 && q < queries, kModule, ": map query ", q, " is outside [0, ", queries,
                  ") for input ", x.sizes());
    }
    const auto index =
        torch::tensor(selected, torch::TensorOptions().dtype(torch::kLong)).to(x.device());
    const auto rows =
        affinity(p, p.theta.index_select(2, index),
                 concat ? p.concat_queries.index_select(2, index) : torch::Tensor(), keys_last);
    (*maps)["affinity"] = keys_last ? rows : rows.transpose(1, 2).contiguous();
  }
  return out;
}

bool NonLocalBlockImpl::inference_path_applies(const torch::Tensor& x) const {
#ifdef DYNATTN_HAVE_ONEDNN
  if (is_training() || !(mode_ == Mode::Embedded || mode_ == Mode::Gaussian) ||
      !dynattn_kernels_enabled() || !x.is_cpu() || x.scalar_type() != torch::kFloat ||
      !x.is_contiguous() || x.numel() == 0)
    return false;
  if (torch::GradMode::is_enabled()) {
    if (x.requires_grad()) return false;
    for (const auto& p : parameters())
      if (p.requires_grad()) return false;
  }
  const int64_t keys = key_count(options, x);
  if (keys == 0) return false;  // run() reports it
  const int64_t d = mode_ == Mode::Gaussian ? options.channels() : inter_;
  const auto bn_buffers = bn.ptr()->named_buffers();
  return detail::attention_kernel_suits(d, inter_, keys) && bn_buffers.contains("running_mean") &&
         bn_buffers["running_mean"].defined();
#else
  return false;
#endif
}

torch::Tensor NonLocalBlockImpl::run_inference(const torch::Tensor& x) {
#ifndef DYNATTN_HAVE_ONEDNN
  TORCH_CHECK(false, kModule, ": built without the oneDNN library");
#else
  torch::NoGradGuard no_grad;
  InferencePlan& plan = *inference_;
  std::lock_guard<std::mutex> lock(plan.mutex);
  const bool gaussian = mode_ == Mode::Gaussian;
  const int64_t c = options.channels(), inter = inter_;
  auto versions = tensor_versions(*this);
  if (versions.empty() || versions != plan.versions) {
    auto matrix = [&](torch::nn::AnyModule& conv, int64_t rows, int64_t cols) {
      return conv.ptr()->named_parameters()["weight"].reshape({rows, cols});
    };
    auto bias = [](torch::nn::AnyModule& m) { return m.ptr()->named_parameters()["bias"]; };
    // phi's bias adds theta_i^T b to every logit of query i: the softmax cancels it. g's bias
    // adds b to every y_i (the probabilities sum to 1), which z maps to W_z b: folded into z's
    // bias, with BN's affine map of the running statistics.
    const auto bn_params = bn.ptr()->named_parameters();
    const auto bn_buffers = bn.ptr()->named_buffers();
    const auto inv_std =
        bn_params["weight"] / torch::sqrt(bn_buffers["running_var"] + batch_norm_options(bn).eps());
    const auto w_z = matrix(z, c, inter);
    const auto z_bias = bias(z) + torch::mv(w_z, bias(g));
    const auto shift = (z_bias - bn_buffers["running_mean"]) * inv_std + bn_params["bias"];
    const auto w_z_folded = w_z * inv_std.unsqueeze(1);
    plan.w_z = torch::cat({w_z_folded, shift.unsqueeze(1)}, 1).contiguous();
    plan.shift = shift.contiguous();
    const auto w_z_g = torch::mm(w_z_folded, matrix(g, inter, c));
    if (gaussian) {
      plan.w_keys = matrix(g, inter, c).contiguous();
      plan.w_keys_z = w_z_g.contiguous();
    } else {
      plan.w_theta = matrix(theta, inter, c).contiguous();
      plan.b_theta = bias(theta).contiguous();
      plan.w_keys = torch::cat({matrix(phi, inter, c), matrix(g, inter, c)}, 0).contiguous();
      plan.w_keys_z = torch::cat({matrix(phi, inter, c), w_z_g}, 0).contiguous();
    }
    plan.versions = std::move(versions);
  }

  const int64_t n = x.size(0), q = x.numel() / (n * c);
  const int64_t pooled_dims = std::min<int64_t>(options.dims(), 2);
  const bool subsample = options.subsample(), pool_first = options.pool_first();
  const bool z_first = z_on_keys_pays(x);
  // Key side: [phi; g] (embedded) or g (gaussian) of the (pooled) input, pooled after if asked;
  // with z applied to g first, z's folded weights times g's.
  const auto& w_keys = z_first ? plan.w_keys_z : plan.w_keys;
  const auto keys_in = subsample && pool_first ? halve_by_max(x, pooled_dims) : x;
  const int64_t keys_in_count = keys_in.numel() / (n * c), key_rows = w_keys.size(0);
  auto key_shape = keys_in.sizes().vec();
  key_shape[1] = key_rows;
  auto keys = torch::empty(key_shape, x.options());
  detail::strided_matmul(detail::row_major(1, key_rows, c), w_keys.data_ptr<float>(),
                         detail::row_major(n, c, keys_in_count), keys_in.data_ptr<float>(),
                         detail::row_major(n, key_rows, keys_in_count), keys.data_ptr<float>());
  // The MACs of the block as defined, whichever way round z goes (as a Winograd convolution
  // counts its direct form's).
  const int64_t g_row = gaussian ? 0 : inter;
  record_macs("dynattn::pointwise_conv", n * (g_row + inter) * c * keys_in_count);
  if (subsample && !pool_first) keys = halve_by_max(keys, pooled_dims);
  const int64_t k = keys.numel() / (n * key_rows);

  detail::AttentionKernelArgs a;
  torch::Tensor theta_out, phi_in;
  if (gaussian) {
    phi_in = !subsample ? x : pool_first ? keys_in : halve_by_max(x, pooled_dims);
    a.theta = x.data_ptr<float>();
    a.theta_stride = c * q;
    a.phi = phi_in.data_ptr<float>();
    a.phi_stride = c * k;
    a.g = keys.data_ptr<float>();
    a.d = c;
  } else {
    theta_out = torch::empty({n, inter, q}, x.options());
    detail::strided_matmul(detail::row_major(1, inter, c), plan.w_theta.data_ptr<float>(),
                           detail::row_major(n, c, q), x.data_ptr<float>(),
                           detail::row_major(n, inter, q), theta_out.data_ptr<float>());
    record_macs("dynattn::pointwise_conv", n * inter * c * q);
    a.theta = theta_out.data_ptr<float>();
    a.theta_stride = inter * q;
    a.theta_bias = plan.b_theta.data_ptr<float>();
    a.phi = keys.data_ptr<float>();
    a.phi_stride = key_rows * k;
    a.g = a.phi + inter * k;
    a.d = inter;
  }
  a.g_stride = key_rows * k;
  a.q = q;
  a.k = k;
  a.scale = static_cast<float>(logit_scale_);
  auto out = torch::empty_like(x);
  torch::Tensor y;
  if (z_first) {
    // The kernel's output is the block's: (W_z' g) P^T + shift + x.
    a.y = out.data_ptr<float>();
    a.y_stride = c * q;
    a.y_bias = plan.shift.data_ptr<float>();
    a.y_residual = x.data_ptr<float>();
    a.dv = c;
  } else {
    // y with a row of ones under it: z's bias column multiplies it.
    y = torch::empty({n, inter + 1, q}, x.options());
    a.y = y.data_ptr<float>();
    a.y_stride = (inter + 1) * q;
    a.y_ones_row = true;
    a.dv = inter;
  }
  at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
    detail::attention_kernel_forward(detail::attention_kernel_images(a, n0, n1));
  });
  record_macs("dynattn::softmax_attention", n * q * k * (a.d + inter));
  if (!z_first) {
    detail::strided_matmul(detail::row_major(1, c, inter + 1), plan.w_z.data_ptr<float>(),
                           detail::row_major(n, inter + 1, q), y.data_ptr<float>(),
                           detail::row_major(n, c, q), out.data_ptr<float>(), x.data_ptr<float>());
  }
  record_macs("dynattn::pointwise_conv", n * c * inter * q);  // z's, as defined
  return out;
#endif
}

torch::Tensor NonLocalBlockImpl::forward(const torch::Tensor& x) {
  return run(x, nullptr);
}

AttentionOutput NonLocalBlockImpl::forward_with_maps(const torch::Tensor& x) {
  AttentionOutput result;
  result.output = run(x, &result.maps);
  return result;
}

void NonLocalBlockImpl::pretty_print(std::ostream& stream) const {
  static const char* const kModes[] = {"gaussian", "embedded", "dot", "concat"};
  stream << "dynattn::NonLocalBlock(channels=" << options.channels() << ", inter=" << inter_
         << ", dims=" << options.dims() << ", mode=" << kModes[static_cast<int>(mode_)]
         << ", subsample=" << (options.subsample() ? "true" : "false")
         << ", pool_first=" << (options.pool_first() ? "true" : "false")
         << ", logit_scale=" << logit_scale_ << ")";
}

AttentionInfo non_local_attention_info() {
  return {"nl",
          "non-local block (Wang et al., CVPR 2018); options mode=embedded|gaussian|dot|concat, "
          "inter (default C/2) or ratio, subsample=1, pool_first=1, "
          "scale=auto|none|inter|channels, dims=2, max_affinity=16777216",
          [](int64_t channels, const OptionMap& o) {
            o.check_known({"mode", "inter", "ratio", "subsample", "pool_first", "scale", "dims",
                           "max_affinity"});
            TORCH_CHECK(!(o.has("inter") && o.has("ratio")), "attention nl: give inter or ratio, ",
                        "not both");
            NonLocalOptions n(channels);
            if (o.has("inter")) n.inter_channels(o.get_int("inter", 0));
            n.inter_ratio(o.get_double("ratio", n.inter_ratio()))
                .mode(o.get_string("mode", n.mode()))
                .subsample(o.get_bool("subsample", n.subsample()))
                .pool_first(o.get_bool("pool_first", n.pool_first()))
                .scale(o.get_string("scale", n.scale()))
                .dims(o.get_int("dims", n.dims()))
                .max_affinity_elements(o.get_int("max_affinity", n.max_affinity_elements()));
            return torch::nn::AnyModule(NonLocalBlock(std::move(n)));
          }};
}

}  // namespace dynattn
