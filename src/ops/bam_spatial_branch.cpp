#include "dynattn/ops/bam_spatial_branch.h"
#include "dynattn/ops/dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "bam_combine.h"
#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "lane_conv.h"
#include "vec16.h"

#ifdef DYNATTN_HAVE_VEC16
namespace dynattn {
namespace {
using namespace detail::vec16;

// Output channels per register block of the reduce conv.
constexpr int64_t kOutBlock = 4;

using Lanes = detail::LaneShape;
using detail::lane_buffer;

DYNATTN_ALWAYS_INLINE double lanes_total(Vec v) {
  double total = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

// relu(v), a NaN kept (as ATen's relu): a mask, not a select (see vec16.h).
DYNATTN_ALWAYS_INLINE Vec relu(Vec v) {
  return (Vec)((IVec)v & ~(v < 0.0f));
}

// ---- Reductions over a contiguous run of m floats (two vector accumulators, a scalar tail) ----

DYNATTN_KERNEL_CLONES
double sum_of_run(const float* p, int64_t m) {
  Vec s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= m; i += 2 * kLanes) {
    s0 += load(p + i, kLanes);
    s1 += load(p + i + kLanes, kLanes);
  }
  double total = 0.0;
  for (; i < m; ++i) total += p[i];
  return total + lanes_total(s0 + s1);
}

DYNATTN_KERNEL_CLONES
double centred_squares_of_run(const float* p, int64_t m, float mu) {
  Vec s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= m; i += 2 * kLanes) {
    const Vec a = load(p + i, kLanes) - mu, b = load(p + i + kLanes, kLanes) - mu;
    s0 += a * a;
    s1 += b * b;
  }
  double total = 0.0;
  for (; i < m; ++i) total += static_cast<double>(p[i] - mu) * (p[i] - mu);
  return total + lanes_total(s0 + s1);
}

// ---- BN + ReLU over lanes ----

// A BN layer's per-channel form for one call: a = relu(z * scale + shift), with mean and
// inv_std the statistics it normalised with (batch or running).
struct NormState {
  std::vector<float> mean, inv_std, scale, shift;
  bool batch_statistics = false;
};

DYNATTN_KERNEL_CLONES
void affine_relu_run(const float* z, int64_t m, float scale, float shift, float* a) {
  for (int64_t i = 0; i < m; i += kLanes) {
    const int64_t lanes = std::min(kLanes, m - i);
    store(a + i, relu(load(z + i, lanes) * scale + shift), lanes);
  }
}

// g' = coef * da where a > 0, else 0 (ReLU's gradient from its output, as ATen's
// threshold_backward).
DYNATTN_ALWAYS_INLINE Vec relu_grad(const float* da, float coef, const float* a, int64_t lanes) {
  return (Vec)((IVec)(load(da, lanes) * coef) & (load(a, lanes) > 0.0f));
}

// dz = k * (g' - mean_g - (z - mu) * c2); mean_g = c2 = 0 for running statistics.
DYNATTN_KERNEL_CLONES
void relu_norm_grad_run(const float* da, float coef, const float* a, const float* z, int64_t m,
                        float k, float mean_g, float mu, float c2, float* dz) {
  for (int64_t i = 0; i < m; i += kLanes) {
    const int64_t lanes = std::min(kLanes, m - i);
    const Vec gi = relu_grad(da + i, coef, a + i, lanes);
    store(dz + i, k * (gi - mean_g - (load(z + i, lanes) - mu) * c2), lanes);
  }
}

// Sums of g' and of g' * (z - mu) over a run (the tail's lanes past m load as zeros: g' = 0).
DYNATTN_KERNEL_CLONES
void relu_grad_sums(const float* da, float coef, const float* a, const float* z, int64_t m,
                    float mu, double* sum_g, double* sum_gz) {
  Vec s1{}, s2{};
  for (int64_t i = 0; i < m; i += kLanes) {
    const int64_t lanes = std::min(kLanes, m - i);
    const Vec gi = relu_grad(da + i, coef, a + i, lanes);
    s1 += gi;
    s2 += gi * (load(z + i, lanes) - mu);
  }
  *sum_g = lanes_total(s1);
  *sum_gz = lanes_total(s2);
}

// ---- The 1x1 convolutions at the ends ----

// OB reduce outputs from o0 for pixels [p0, p0 + lanes) of an NCHW image, into the lanes.
template <int64_t OB>
DYNATTN_ALWAYS_INLINE void reduce_block(const float* x, int64_t c, int64_t pixels, const float* w,
                                        const float* bias, int64_t o0, int64_t p0, const Lanes& g,
                                        int64_t n, float* z, int64_t lanes = kLanes) {
  Vec acc[OB];
  for (int64_t o = 0; o < OB; ++o) acc[o] = splat(bias != nullptr ? bias[o0 + o] : 0.0f);
  for (int64_t ch = 0; ch < c; ++ch) {
    const Vec v = load(x + ch * pixels + p0, lanes);
    for (int64_t o = 0; o < OB; ++o) acc[o] += v * w[(o0 + o) * c + ch];
  }
  for (int64_t o = 0; o < OB; ++o)
    for (int64_t l = 0; l < lanes; ++l) z[((o0 + o) * pixels + p0 + l) * g.n + n] = acc[o][l];
}

// reduce_block over the outputs [0, rd) for pixels [p0, p0 + lanes).
DYNATTN_ALWAYS_INLINE void reduce_blocks(const float* x, int64_t c, int64_t pixels, const float* w,
                                         const float* bias, int64_t rd, int64_t p0, const Lanes& g,
                                         int64_t n, float* z, int64_t lanes) {
  int64_t o0 = 0;
  for (; o0 + kOutBlock <= rd; o0 += kOutBlock)
    reduce_block<kOutBlock>(x, c, pixels, w, bias, o0, p0, g, n, z, lanes);
  switch (rd - o0) {
    case 3:
      reduce_block<3>(x, c, pixels, w, bias, o0, p0, g, n, z, lanes);
      break;
    case 2:
      reduce_block<2>(x, c, pixels, w, bias, o0, p0, g, n, z, lanes);
      break;
    case 1:
      reduce_block<1>(x, c, pixels, w, bias, o0, p0, g, n, z, lanes);
      break;
    default:
      break;
  }
}

// The same for OB outputs at one pixel of a channels-last image (x: the pixel's c values).
template <int64_t OB>
DYNATTN_ALWAYS_INLINE void reduce_pixel(const float* x, int64_t c, const float* w,
                                        const float* bias, int64_t o0, float* out) {
  Vec acc[OB] = {};
  for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
    const int64_t lanes = std::min(kLanes, c - c0);
    const Vec v = load(x + c0, lanes);
    for (int64_t o = 0; o < OB; ++o) acc[o] += v * load(w + (o0 + o) * c + c0, lanes);
  }
  for (int64_t o = 0; o < OB; ++o)
    out[o] = lanes_sum(acc[o]) + (bias != nullptr ? bias[o0 + o] : 0.0f);
}

// All rd outputs for the 16 pixels from p0 of a channels-last image: each pixel's products to one
// vector, then the 16 vectors folded together. A horizontal sum per pixel and output (as in
// reduce_pixel) was most of the forward at C=16; the fold gives the same sums, bit for bit (its
// steps are lanes_sum's half-folds).
// kWhole: c is a multiple of 16, and every load a whole vector (no mask set-up per pixel).
template <bool kWhole>
DYNATTN_ALWAYS_INLINE void reduce_pixels_cl16(const float* x, int64_t c, const float* w,
                                              const float* bias, int64_t rd, const Lanes& g,
                                              int64_t n, int64_t p0, float* z) {
  const int64_t pixels = g.pixels();
  Vec v[kLanes];
  for (int64_t o = 0; o < rd; ++o) {
    const float* wo = w + o * c;
    for (int64_t q = 0; q < kLanes; ++q) {
      const float* xq = x + (p0 + q) * c;
      Vec acc{};
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const int64_t lanes = kWhole ? kLanes : std::min(kLanes, c - c0);
        acc += load(xq + c0, lanes) * load(wo + c0, lanes);
      }
      v[q] = acc;
    }
    const Vec r = sum_lanes_of_16(v) + (bias != nullptr ? bias[o] : 0.0f);
    float* zo = z + (o * pixels + p0) * g.n + n;
    for (int64_t q = 0; q < kLanes; ++q) zo[q * g.n] = r[q];
  }
}

// Image `n` of x into the lanes: z[o][p][n] = bias[o] + sum_c w[o][c] x[c][p] (x[p][c] when
// channels-last).
DYNATTN_KERNEL_CLONES
void reduce_image(const float* x, bool channels_last, int64_t c, const float* w, const float* bias,
                  int64_t rd, const Lanes& g, int64_t n, float* z) {
  const int64_t pixels = g.pixels();
  if (!channels_last) {
    // Whole vectors of pixels, then the last pixels as a partial vector (one by one, each
    // output at a pixel was a chain of c dependent FMAs: at 7x7 about as long as the 48 pixels
    // before it). A lane's sum is the same either way: bias, then the channels in order.
    const int64_t full = pixels / kLanes * kLanes;
    for (int64_t p0 = 0; p0 < full; p0 += kLanes)
      reduce_blocks(x, c, pixels, w, bias, rd, p0, g, n, z, kLanes);
    if (full < pixels) reduce_blocks(x, c, pixels, w, bias, rd, full, g, n, z, pixels - full);
    return;
  }
  const int64_t full = pixels / kLanes * kLanes;
  for (int64_t p0 = 0; p0 < full; p0 += kLanes) {
    if (c % kLanes == 0) {
      reduce_pixels_cl16<true>(x, c, w, bias, rd, g, n, p0, z);
    } else {
      reduce_pixels_cl16<false>(x, c, w, bias, rd, g, n, p0, z);
    }
  }
  float out[kOutBlock];
  for (int64_t p = full; p < pixels; ++p) {
    for (int64_t o0 = 0; o0 < rd; o0 += kOutBlock) {
      const int64_t ob = std::min(kOutBlock, rd - o0);
      switch (ob) {
        case 4:
          reduce_pixel<4>(x + p * c, c, w, bias, o0, out);
          break;
        case 3:
          reduce_pixel<3>(x + p * c, c, w, bias, o0, out);
          break;
        case 2:
          reduce_pixel<2>(x + p * c, c, w, bias, o0, out);
          break;
        default:
          reduce_pixel<1>(x + p * c, c, w, bias, o0, out);
          break;
      }
      for (int64_t o = 0; o < ob; ++o) z[((o0 + o) * pixels + p) * g.n + n] = out[o];
    }
  }
}

// Outputs [o0, o0 + OB) of the reduce's backward at channel ch of an NCHW image, whole vectors
// of pixels [0, full): dxc += sum_o w[o][ch] g[o] (written when o0 = 0), and partial[o][ch] +=
// g[o] * xc lane-wise, held in registers across the pixels. `accumulate`: dxc already holds a
// gradient to add to.
template <int64_t OB>
DYNATTN_ALWAYS_INLINE void reduce_backward_block(const float* xc, const float* w, int64_t c,
                                                 int64_t ch, int64_t o0, const float* gathered,
                                                 int64_t pixels, int64_t full, bool accumulate,
                                                 Vec* partial, float* dxc) {
  Vec pd[OB] = {};
  for (int64_t p0 = 0; p0 < full; p0 += kLanes) {
    const Vec xv = load(xc + p0, kLanes);
    Vec acc = o0 == 0 && !accumulate ? Vec{} : load(dxc + p0, kLanes);
    for (int64_t o = 0; o < OB; ++o) {
      const Vec gv = load(gathered + (o0 + o) * pixels + p0, kLanes);
      acc += gv * w[(o0 + o) * c + ch];
      pd[o] += gv * xv;
    }
    store(dxc + p0, acc, kLanes);
  }
  for (int64_t o = 0; o < OB; ++o) partial[(o0 + o) * c + ch] += pd[o];
}

// Outputs [o0, o0 + OB) of the reduce's backward at channels [c0, c0 + lanes) of a
// channels-last image, over every pixel: dx += sum_o w[o] g[o] (written when o0 = 0 unless
// `accumulate`), and dw[o] += sum_p g[o] x, held in registers across the pixels (added to dw in
// memory per pixel, each update waited on the last one's store).
template <int64_t OB, bool kWhole>
DYNATTN_ALWAYS_INLINE void reduce_backward_cl_block(const float* x, const float* w, int64_t c,
                                                    int64_t c0, int64_t some_lanes, int64_t o0,
                                                    const float* gathered, int64_t pixels,
                                                    bool accumulate, float* dx, float* dw) {
  const int64_t lanes = kWhole ? kLanes : some_lanes;  // a constant: no mask set-up per pixel
  Vec wv[OB], dwv[OB] = {};
  for (int64_t o = 0; o < OB; ++o) wv[o] = load(w + (o0 + o) * c + c0, lanes);
  const bool fresh = o0 == 0 && !accumulate;
  for (int64_t p = 0; p < pixels; ++p) {
    const Vec xv = load(x + p * c + c0, lanes);
    Vec acc = fresh ? Vec{} : load(dx + p * c + c0, lanes);
    for (int64_t o = 0; o < OB; ++o) {
      const float gv = gathered[(o0 + o) * pixels + p];
      acc += wv[o] * gv;
      dwv[o] += xv * gv;
    }
    store(dx + p * c + c0, acc, lanes);
  }
  for (int64_t o = 0; o < OB; ++o)
    store(dw + (o0 + o) * c + c0, load(dw + (o0 + o) * c + c0, lanes) + dwv[o], lanes);
}

// reduce_backward_cl_block for outputs [o0, min(o0 + kOutBlock, rd)).
template <bool kWhole>
DYNATTN_ALWAYS_INLINE void reduce_backward_cl_blocks(const float* x, const float* w, int64_t c,
                                                     int64_t c0, int64_t lanes, int64_t o0,
                                                     int64_t rd, const float* gathered,
                                                     int64_t pixels, bool accumulate, float* dx,
                                                     float* dw) {
  switch (std::min(kOutBlock, rd - o0)) {
    case 4:
      return reduce_backward_cl_block<4, kWhole>(x, w, c, c0, lanes, o0, gathered, pixels,
                                                 accumulate, dx, dw);
    case 3:
      return reduce_backward_cl_block<3, kWhole>(x, w, c, c0, lanes, o0, gathered, pixels,
                                                 accumulate, dx, dw);
    case 2:
      return reduce_backward_cl_block<2, kWhole>(x, w, c, c0, lanes, o0, gathered, pixels,
                                                 accumulate, dx, dw);
    default:
      return reduce_backward_cl_block<1, kWhole>(x, w, c, c0, lanes, o0, gathered, pixels,
                                                 accumulate, dx, dw);
  }
}

// The reduce conv's backward for image n: dx = w^T dz (dx += with `accumulate`), and
// dw += dz x^T (dw [rd][c]); for an
// NCHW image dw's terms are added lane-wise into `partial` (rd * c vectors, summed over their
// lanes once per task by the caller) instead. gathered: rd * pixels floats.
DYNATTN_KERNEL_CLONES
void reduce_image_backward(const float* x, bool channels_last, int64_t c, const float* w,
                           int64_t rd, const Lanes& g, int64_t n, const float* dz, float* gathered,
                           bool accumulate, Vec* partial, float* dx, float* dw) {
  const int64_t pixels = g.pixels();
  for (int64_t o = 0; o < rd; ++o)
    for (int64_t p = 0; p < pixels; ++p) gathered[o * pixels + p] = dz[(o * pixels + p) * g.n + n];
  if (!channels_last) {
    // Whole vectors of pixels, then the last pixels one by one (a partial vector would cost a
    // variable-length copy per channel and output).
    const int64_t full = pixels / kLanes * kLanes;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* xc = x + ch * pixels;
      float* dxc = dx + ch * pixels;
      for (int64_t o0 = 0; o0 < rd; o0 += kOutBlock) {
        switch (std::min(kOutBlock, rd - o0)) {
          case 4:
            reduce_backward_block<4>(xc, w, c, ch, o0, gathered, pixels, full, accumulate, partial,
                                     dxc);
            break;
          case 3:
            reduce_backward_block<3>(xc, w, c, ch, o0, gathered, pixels, full, accumulate, partial,
                                     dxc);
            break;
          case 2:
            reduce_backward_block<2>(xc, w, c, ch, o0, gathered, pixels, full, accumulate, partial,
                                     dxc);
            break;
          default:
            reduce_backward_block<1>(xc, w, c, ch, o0, gathered, pixels, full, accumulate, partial,
                                     dxc);
            break;
        }
      }
      for (int64_t p = full; p < pixels; ++p) {
        float acc = accumulate ? dxc[p] : 0.0f;
        for (int64_t o = 0; o < rd; ++o) {
          const float gv = gathered[o * pixels + p];
          acc += gv * w[o * c + ch];
          dw[o * c + ch] += gv * xc[p];
        }
        dxc[p] = acc;
      }
    }
    return;
  }
  for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
    const int64_t lanes = std::min(kLanes, c - c0);
    for (int64_t o0 = 0; o0 < rd; o0 += kOutBlock) {
      if (lanes == kLanes) {
        reduce_backward_cl_blocks<true>(x, w, c, c0, lanes, o0, rd, gathered, pixels, accumulate,
                                        dx, dw);
      } else {
        reduce_backward_cl_blocks<false>(x, w, c, c0, lanes, o0, rd, gathered, pixels, accumulate,
                                         dx, dw);
      }
    }
  }
}

// ms[n][p] = bias + sum_o w[o] a[o][p][n] for pixels [p0, p1).
DYNATTN_KERNEL_CLONES
void final_conv_pixels(const float* a, const float* w, float bias, int64_t rd, const Lanes& g,
                       int64_t p0, int64_t p1, float* ms) {
  const int64_t pixels = g.pixels(), plane = g.plane();
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t n0 = 0; n0 < g.n; n0 += kLanes) {
      const int64_t lanes = std::min(kLanes, g.n - n0);
      Vec acc = splat(bias);
      for (int64_t o = 0; o < rd; ++o) acc += load(a + o * plane + p * g.n + n0, kLanes) * w[o];
      for (int64_t l = 0; l < lanes; ++l) ms[(n0 + l) * pixels + p] = acc[l];
    }
  }
}

// ---- Parameters ----

// A tensor's floats, or null when it is undefined or empty (an absent bias or affine weight).
const float* floats_of(const torch::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr;
}

torch::Tensor or_empty(const torch::Tensor& t, const torch::Tensor& like) {
  // Autograd functions in LibTorch 1.13 reject undefined inputs: absent ones travel as empty.
  return t.defined() ? t.contiguous() : torch::empty({0}, like.options());
}

struct BranchConfig {
  int64_t dilation = 1;
  torch::nn::BatchNorm2dImpl* norms[3] = {nullptr, nullptr, nullptr};
};

// Batch statistics or running ones, and the running update, for channel `o` of a layer.
void normalise_channel(torch::nn::BatchNorm2dImpl& bn, bool batch_statistics, double factor,
                       const float* z, int64_t m, int64_t o, const float* gamma, const float* beta,
                       NormState& s) {
  double mu, inv;
  if (batch_statistics) {
    mu = sum_of_run(z, m) / static_cast<double>(m);
    const double var =
        centred_squares_of_run(z, m, static_cast<float>(mu)) / static_cast<double>(m);
    inv = 1.0 / std::sqrt(var + bn.options.eps());
    if (bn.options.track_running_stats()) {
      float* rm = bn.running_mean.data_ptr<float>();
      float* rv = bn.running_var.data_ptr<float>();
      const double unbiased =
          m > 1 ? var * static_cast<double>(m) / static_cast<double>(m - 1) : var;
      rm[o] = static_cast<float>((1 - factor) * rm[o] + factor * mu);
      rv[o] = static_cast<float>((1 - factor) * rv[o] + factor * unbiased);
    }
  } else {
    mu = bn.running_mean.data_ptr<float>()[o];
    inv = 1.0 /
          std::sqrt(static_cast<double>(bn.running_var.data_ptr<float>()[o]) + bn.options.eps());
  }
  const double g = gamma != nullptr ? gamma[o] : 1.0, b = beta != nullptr ? beta[o] : 0.0;
  s.mean[o] = static_cast<float>(mu);
  s.inv_std[o] = static_cast<float>(inv);
  s.scale[o] = static_cast<float>(g * inv);
  s.shift[o] = static_cast<float>(b - mu * g * inv);
}

// z -> a = relu(bn(z)) over rd channels, statistics in `s`.
NormState normalise(torch::nn::BatchNorm2dImpl& bn, const torch::Tensor& gamma,
                    const torch::Tensor& beta, const float* z, int64_t rd, int64_t m, float* a) {
  NormState s;
  s.mean.resize(rd);
  s.inv_std.resize(rd);
  s.scale.resize(rd);
  s.shift.resize(rd);
  s.batch_statistics = bn.is_training() || !bn.options.track_running_stats();
  double factor = 0.0;
  if (bn.is_training() && bn.options.track_running_stats()) {
    bn.num_batches_tracked += 1;
    // As BatchNorm2d: no momentum means a cumulative average over the batches seen.
    factor = bn.options.momentum().has_value()
                 ? *bn.options.momentum()
                 : 1.0 / static_cast<double>(bn.num_batches_tracked.item<int64_t>());
  }
  const bool update = bn.is_training() && bn.options.track_running_stats();
  const float *gp = floats_of(gamma), *bp = floats_of(beta);
  at::parallel_for(0, rd, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      normalise_channel(bn, s.batch_statistics, update ? factor : 0.0, z + o * m, m, o, gp, bp, s);
      affine_relu_run(z + o * m, m, s.scale[o], s.shift[o], a + o * m);
    }
  });
  if (update) {
    // Written through pointers: bump the versions as an in-place ATen op would.
    for (auto* t : {&bn.running_mean, &bn.running_var})
      if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  }
  return s;
}

// The forward's saved maps: z_k (before BN) and a_k (after ReLU) of the three layers, each
// [rd][H][W][N], and the statistics each BN normalised with ([3][2][rd]: mean, inv_std).
struct Forward {
  torch::Tensor z[3], a[3], stats, ms;
};

Forward run_forward(const torch::Tensor& x, const torch::Tensor& wr, const torch::Tensor& br,
                    const torch::Tensor* gamma, const torch::Tensor* beta, const torch::Tensor* wd,
                    const torch::Tensor* bd, const torch::Tensor& wf, const torch::Tensor& bf,
                    const BranchConfig& cfg) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), rd = wr.size(0);
  const Lanes g{n, h, w};
  const bool channels_last = !x.is_contiguous();
  const auto opts = x.options();
  Forward f;
  for (int k = 0; k < 3; ++k) {
    f.z[k] = lane_buffer(rd, g, opts);
    f.a[k] = lane_buffer(rd, g, opts);
  }
  f.stats = torch::empty({3, 2, rd}, opts);
  const float* xp = x.data_ptr<float>();
  const float *wrp = wr.data_ptr<float>(), *brp = floats_of(br);
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      reduce_image(xp + i * c * h * w, channels_last, c, wrp, brp, rd, g, i,
                   f.z[0].data_ptr<float>());
  });
  for (int k = 0; k < 3; ++k) {
    if (k > 0) {
      detail::lane_conv(f.a[k - 1].data_ptr<float>(), rd, wd[k - 1].data_ptr<float>(),
                        floats_of(bd[k - 1]), rd, 3, cfg.dilation, g, f.z[k].data_ptr<float>());
    }
    const NormState s = normalise(*cfg.norms[k], gamma[k], beta[k], f.z[k].data_ptr<float>(), rd,
                                  g.plane(), f.a[k].data_ptr<float>());
    float* st = f.stats.data_ptr<float>() + k * 2 * rd;
    std::copy(s.mean.begin(), s.mean.end(), st);
    std::copy(s.inv_std.begin(), s.inv_std.end(), st + rd);
  }
  f.ms = torch::empty({n, 1, h, w}, opts);
  const float bias = floats_of(bf) != nullptr ? floats_of(bf)[0] : 0.0f;
  at::parallel_for(0, g.pixels(), std::max<int64_t>(1, 32768 / (rd * n)),
                   [&](int64_t p0, int64_t p1) {
                     final_conv_pixels(f.a[2].data_ptr<float>(), wf.data_ptr<float>(), bias, rd, g,
                                       p0, p1, f.ms.data_ptr<float>());
                   });
  return f;
}

// The branch's parameters as the nodes receive them (absent ones empty).
struct BranchParams {
  torch::Tensor wr, br, gamma[3], beta[3], wd[2], bd[2], wf, bf;
};
constexpr int kBranchParams = 14;

BranchParams params_from(const torch::autograd::variable_list& t) {
  return {t[0],  t[1], {t[2], t[6], t[10]}, {t[3], t[7], t[11]}, {t[4], t[8]}, {t[5], t[9]},
          t[12], t[13]};
}

// The node's inputs in order: reduce w, b; BN0 gamma, beta; dilated0 w, b; BN1 gamma, beta;
// dilated1 w, b; BN2 gamma, beta; final w, b (as params_from reads them).
torch::autograd::variable_list params_of(const BamSpatialLayers& l, const torch::Tensor& x) {
  const auto& n0 = *l.reduce_bn;
  const auto& n1 = *l.dilated_bn[0];
  const auto& n2 = *l.dilated_bn[1];
  return {l.reduce->weight.contiguous(),
          or_empty(l.reduce->bias, x),
          or_empty(n0.weight, x),
          or_empty(n0.bias, x),
          l.dilated[0]->weight.contiguous(),
          or_empty(l.dilated[0]->bias, x),
          or_empty(n1.weight, x),
          or_empty(n1.bias, x),
          l.dilated[1]->weight.contiguous(),
          or_empty(l.dilated[1]->bias, x),
          or_empty(n2.weight, x),
          or_empty(n2.bias, x),
          l.final_conv->weight.contiguous(),
          or_empty(l.final_conv->bias, x)};
}

Forward forward_of(const torch::Tensor& x, const BranchParams& p, const BranchConfig& cfg) {
  return run_forward(x, p.wr, p.br, p.gamma, p.beta, p.wd, p.bd, p.wf, p.bf, cfg);
}

// What the branch's backward needs, saved in `ctx` (its saved variables from index 0).
void save_branch(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                 const BranchParams& p, const Forward& f, const BranchConfig& cfg,
                 std::vector<torch::Tensor> extra) {
  std::vector<torch::Tensor> saved = {x,       p.wr,    p.gamma[0], p.gamma[1], p.gamma[2],
                                      p.wd[0], p.wd[1], p.wf,       f.z[0],     f.z[1],
                                      f.z[2],  f.a[0],  f.a[1],     f.a[2],     f.stats};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["dilation"] = cfg.dilation;
  int64_t flags = 0;  // bits 0-6: which optional biases are present; 8-10: batch statistics
  const torch::Tensor* biases[] = {&p.br,    &p.beta[0], &p.bd[0], &p.beta[1],
                                   &p.bd[1], &p.beta[2], &p.bf};
  for (int j = 0; j < 7; ++j)
    if (biases[j]->numel() > 0) flags |= int64_t{1} << j;
  for (int k = 0; k < 3; ++k)
    if (cfg.norms[k]->is_training() || !cfg.norms[k]->options.track_running_stats())
      flags |= int64_t{1} << (8 + k);
  ctx->saved_data["flags"] = flags;
}

// The branch's backward from d M_s (`dms`, N * H * W floats): the 14 parameter gradients in
// the order of params_of(), and x's gradient written into dx (added to it with `accumulate`).
torch::autograd::variable_list branch_backward(torch::autograd::AutogradContext* ctx,
                                               const torch::autograd::variable_list& saved,
                                               const torch::Tensor& dms, torch::Tensor& dx,
                                               bool accumulate) {
  const auto& x = saved[0];
  const auto& wr = saved[1];
  const torch::Tensor gamma[3] = {saved[2], saved[3], saved[4]};
  const torch::Tensor wd[2] = {saved[5], saved[6]};
  const auto& wf = saved[7];
  const torch::Tensor z[3] = {saved[8], saved[9], saved[10]};
  const torch::Tensor a[3] = {saved[11], saved[12], saved[13]};
  const float* stats = saved[14].data_ptr<float>();
  const int64_t d = ctx->saved_data["dilation"].toInt();
  const int64_t flags = ctx->saved_data["flags"].toInt();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), rd = wr.size(0);
  const Lanes g{n, h, w};
  const int64_t m = g.plane(), pixels = g.pixels();
  const auto opts = x.options();

  // The final 1x1: its gradient into the lanes, and d w_f, d b_f.
  auto top = lane_buffer(1, g, opts);
  {
    const float* src = dms.data_ptr<float>();
    float* dst = top.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t p = 0; p < pixels; ++p) dst[p * n + i] = src[i * pixels + p];
  }
  auto d_wf = torch::empty_like(wf);
  for (int64_t o = 0; o < rd; ++o)
    d_wf.data_ptr<float>()[o] = static_cast<float>(
        detail::lane_run_dot(a[2].data_ptr<float>() + o * m, top.data_ptr<float>(), m));
  const double d_bf = sum_of_run(top.data_ptr<float>(), m);

  torch::Tensor d_gamma[3], d_beta[3], d_wd[2], d_bd[2];
  torch::Tensor upstream = top;  // d a_k: the lanes of a_k's gradient (rd channels, or the top)
  torch::Tensor dz;
  for (int k = 2; k >= 0; --k) {
    const bool batch_stats = (flags >> (8 + k)) & 1;
    const float* mean = stats + k * 2 * rd;
    const float* inv_std = mean + rd;
    const float* gp = floats_of(gamma[k]);
    dz = lane_buffer(rd, g, opts);
    d_gamma[k] = torch::empty({rd}, opts);
    d_beta[k] = torch::empty({rd}, opts);
    at::parallel_for(0, rd, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        // The top layer's d a is w_f[o] times the one-channel gradient.
        const float* da = k == 2 ? upstream.data_ptr<float>() : upstream.data_ptr<float>() + o * m;
        const float coef = k == 2 ? wf.data_ptr<float>()[o] : 1.0f;
        const float* ap = a[k].data_ptr<float>() + o * m;
        const float* zp = z[k].data_ptr<float>() + o * m;
        double sum_g = 0.0, sum_gz = 0.0;
        relu_grad_sums(da, coef, ap, zp, m, mean[o], &sum_g, &sum_gz);
        const double inv = inv_std[o], gam = gp != nullptr ? gp[o] : 1.0;
        d_gamma[k].data_ptr<float>()[o] = static_cast<float>(sum_gz * inv);
        d_beta[k].data_ptr<float>()[o] = static_cast<float>(sum_g);
        const double mean_g = batch_stats ? sum_g / static_cast<double>(m) : 0.0;
        const double c2 = batch_stats ? sum_gz * inv * inv / static_cast<double>(m) : 0.0;
        relu_norm_grad_run(da, coef, ap, zp, m, static_cast<float>(gam * inv),
                           static_cast<float>(mean_g), mean[o], static_cast<float>(c2),
                           dz.data_ptr<float>() + o * m);
      }
    });
    if (k == 0) break;
    // The dilated conv k - 1 (input a[k - 1]): its weight and bias gradients, and d a[k - 1] as
    // the same convolution of dz with the kernel flipped and its channel axes swapped.
    const auto& weight = wd[k - 1];
    d_wd[k - 1] = torch::empty_like(weight);
    detail::lane_conv_weight_grad(dz.data_ptr<float>(), rd, a[k - 1].data_ptr<float>(), rd, 3, d, g,
                                  d_wd[k - 1].data_ptr<float>());
    d_bd[k - 1] = torch::empty({rd}, opts);
    for (int64_t o = 0; o < rd; ++o)
      d_bd[k - 1].data_ptr<float>()[o] =
          static_cast<float>(sum_of_run(dz.data_ptr<float>() + o * m, m));
    auto da = lane_buffer(rd, g, opts);
    detail::lane_conv_input_grad(dz.data_ptr<float>(), rd, weight.data_ptr<float>(), rd, 3, d, g,
                                 da.data_ptr<float>());
    upstream = da;
  }

  // The reduce 1x1: d b_r, and per image dx and its share of d w_r.
  auto d_br = torch::empty({rd}, opts);
  for (int64_t o = 0; o < rd; ++o)
    d_br.data_ptr<float>()[o] = static_cast<float>(sum_of_run(dz.data_ptr<float>() + o * m, m));
  const bool channels_last = !x.is_contiguous();
  auto d_wr = torch::zeros({rd, c}, opts);
  std::mutex merge;
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> gathered(rd * pixels), dw(rd * c, 0.0f);
    VecBuffer partial(rd * c);
    std::fill(partial.data(), partial.data() + rd * c, Vec{});
    for (int64_t i = i0; i < i1; ++i) {
      reduce_image_backward(x.data_ptr<float>() + i * c * pixels, channels_last, c,
                            wr.data_ptr<float>(), rd, g, i, dz.data_ptr<float>(), gathered.data(),
                            accumulate, partial.data(), dx.data_ptr<float>() + i * c * pixels,
                            dw.data());
    }
    for (int64_t j = 0; j < rd * c; ++j)
      dw[j] += static_cast<float>(lanes_total(partial.data()[j]));
    std::lock_guard<std::mutex> lock(merge);
    float* total = d_wr.data_ptr<float>();
    for (int64_t j = 0; j < rd * c; ++j) total[j] += dw[j];
  });

  const auto bias_grad = [&](int index, const torch::Tensor& t) {
    return (flags >> index) & 1 ? t : torch::Tensor();
  };
  const auto affine_grad = [&](int k, const torch::Tensor& t) {
    return gamma[k].numel() > 0 ? t : torch::Tensor();
  };
  return {d_wr.view(wr.sizes()),
          bias_grad(0, d_br),
          affine_grad(0, d_gamma[0]),
          bias_grad(1, d_beta[0]),
          d_wd[0],
          bias_grad(2, d_bd[0]),
          affine_grad(1, d_gamma[1]),
          bias_grad(3, d_beta[1]),
          d_wd[1],
          bias_grad(4, d_bd[1]),
          affine_grad(2, d_gamma[2]),
          bias_grad(5, d_beta[2]),
          d_wf,
          bias_grad(6, torch::full({1}, d_bf, opts))};
}

// M_s = branch(x): inputs x and the 14 parameters (in the order of params_of()).
struct BamSpatialFunction : torch::autograd::Function<BamSpatialFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& p0, const torch::Tensor& p1,
                               const torch::Tensor& p2, const torch::Tensor& p3,
                               const torch::Tensor& p4, const torch::Tensor& p5,
                               const torch::Tensor& p6, const torch::Tensor& p7,
                               const torch::Tensor& p8, const torch::Tensor& p9,
                               const torch::Tensor& p10, const torch::Tensor& p11,
                               const torch::Tensor& p12, const torch::Tensor& p13,
                               BranchConfig cfg) {
    const auto p = params_from({p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13});
    Forward f = forward_of(x, p, cfg);
    save_branch(ctx, x, p, f, cfg, {});
    return f.ms;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto dx = torch::empty_like(saved[0]);
    auto out = branch_backward(ctx, saved, grads[0].contiguous(), dx, false);
    out.insert(out.begin(), dx);
    out.emplace_back();  // cfg
    return out;
  }
};

// y = x + x * sigmoid(M_c + M_s) (M_c * M_s with `product`), M_s = branch(x): inputs x, mc
// [N,C,1,1] and the 14 parameters. One node, so that x's gradient is one map: the combine's
// backward writes it and the branch's reduce adds its share in place.
struct BamSpatialCombineFunction : torch::autograd::Function<BamSpatialCombineFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& mc, const torch::Tensor& p0,
                               const torch::Tensor& p1, const torch::Tensor& p2,
                               const torch::Tensor& p3, const torch::Tensor& p4,
                               const torch::Tensor& p5, const torch::Tensor& p6,
                               const torch::Tensor& p7, const torch::Tensor& p8,
                               const torch::Tensor& p9, const torch::Tensor& p10,
                               const torch::Tensor& p11, const torch::Tensor& p12,
                               const torch::Tensor& p13, BranchConfig cfg, bool product) {
    const auto p = params_from({p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13});
    Forward f = forward_of(x, p, cfg);
    const int64_t n = x.size(0), c = x.size(1);
    const auto mcv = mc.reshape({n, c}).contiguous();
    const auto msv = f.ms.view({n, -1});
    auto y = detail::bam_combine_forward(x, mcv, msv, product);
    save_branch(ctx, x, p, f, cfg, {mcv, msv});
    ctx->saved_data["product"] = product;
    ctx->saved_data["mc_sizes"] = mc.sizes().vec();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor dx, dmc, dms;
    detail::bam_combine_backward(saved[0], grads[0], saved[15], saved[16],
                                 ctx->saved_data["product"].toBool(), dx, dmc, dms);
    auto out = branch_backward(ctx, saved, dms, dx, true);
    out.insert(out.begin(), {dx, dmc.view(ctx->saved_data["mc_sizes"].toIntVector())});
    out.emplace_back();  // cfg
    out.emplace_back();  // product
    return out;
  }
};

bool float_cpu(const torch::Tensor& t) {
  return !t.defined() ||
         (t.layout() == torch::kStrided && t.is_cpu() && t.scalar_type() == torch::kFloat);
}

bool conv_is(const torch::nn::Conv2dImpl* conv, int64_t in, int64_t out, int64_t k,
             int64_t dilation) {
  if (conv == nullptr) return false;
  const auto& o = conv->options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  return o.in_channels() == in && o.out_channels() == out && o.groups() == 1 &&
         o.kernel_size()->at(0) == k && o.kernel_size()->at(1) == k && o.stride()->at(0) == 1 &&
         o.stride()->at(1) == 1 && o.dilation()->at(0) == dilation &&
         o.dilation()->at(1) == dilation && padding != nullptr &&
         (*padding)->at(0) == (k / 2) * dilation && (*padding)->at(1) == (k / 2) * dilation &&
         variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) != nullptr &&
         float_cpu(conv->weight) && float_cpu(conv->bias);
}

bool norm_is(const torch::nn::BatchNorm2dImpl* bn, int64_t channels) {
  if (bn == nullptr || bn->options.num_features() != channels) return false;
  for (const auto* t : {&bn->weight, &bn->bias, &bn->running_mean, &bn->running_var})
    if (!float_cpu(*t)) return false;
  return !bn->options.track_running_stats() ||
         (bn->running_mean.defined() && bn->running_var.defined());
}

}  // namespace
}  // namespace dynattn
#endif  // DYNATTN_HAVE_VEC16

namespace dynattn {

bool bam_spatial_branch_applicable(const torch::Tensor& x, const BamSpatialLayers& layers) {
#ifndef DYNATTN_HAVE_VEC16
  return false;  // the kernels are written in GCC/Clang vector extensions
#else
  if (!dynattn_kernels_enabled() || !x.defined() || x.layout() != torch::kStrided || !x.is_cpu() ||
      x.scalar_type() != torch::kFloat || x.dim() != 4 || x.numel() == 0)
    return false;
  if (!x.is_contiguous() && !x.is_contiguous(torch::MemoryFormat::ChannelsLast)) return false;
  if (layers.reduce == nullptr || layers.dilated[0] == nullptr) return false;
  const int64_t c = x.size(1), rd = layers.reduce->options.out_channels();
  const int64_t d = layers.dilated[0]->options.dilation()->at(0);
  return conv_is(layers.reduce, c, rd, 1, 1) && conv_is(layers.dilated[0], rd, rd, 3, d) &&
         conv_is(layers.dilated[1], rd, rd, 3, d) && conv_is(layers.final_conv, rd, 1, 1, 1) &&
         norm_is(layers.reduce_bn, rd) && norm_is(layers.dilated_bn[0], rd) &&
         norm_is(layers.dilated_bn[1], rd);
#endif
}

bool bam_spatial_branch_pays_off(int64_t batch, int64_t rd) {
  return batch >= 8 || (batch >= 2 && rd <= 8);
}

namespace {
#ifdef DYNATTN_HAVE_VEC16
// The checks of both entry points, the MACs record, and the BN layers' config.
BranchConfig prepare(const char* op, const torch::Tensor& x, const BamSpatialLayers& layers) {
  TORCH_CHECK(bam_spatial_branch_applicable(x, layers), op,
              ": expected a CPU float32 [N,C,H,W] input (contiguous or channels-last) and BAM's "
              "spatial layers for its ",
              x.defined() ? x.size(1) : 0, " channels, got ",
              x.defined() ? x.sizes() : torch::IntArrayRef{});
  BranchConfig cfg;
  cfg.dilation = layers.dilated[0]->options.dilation()->at(0);
  cfg.norms[0] = layers.reduce_bn;
  cfg.norms[1] = layers.dilated_bn[0];
  cfg.norms[2] = layers.dilated_bn[1];
  for (auto* bn : cfg.norms) {
    TORCH_CHECK(!bn->is_training() || x.size(0) * x.size(2) * x.size(3) > 1, op,
                ": BatchNorm in training mode needs more than one value per channel, got input ",
                x.sizes());
  }
  const int64_t rd = layers.reduce->options.out_channels(), c = x.size(1);
  record_macs("dynattn::bam_spatial_branch",
              x.size(0) * x.size(2) * x.size(3) * (c * rd + 2 * rd * rd * 9 + rd));
  return cfg;
}

bool records_grad(const torch::Tensor& x, const torch::autograd::variable_list& params) {
  if (!torch::GradMode::is_enabled()) return false;
  if (x.requires_grad()) return true;
  return std::any_of(params.begin(), params.end(),
                     [](const torch::Tensor& t) { return t.requires_grad(); });
}
#endif
}  // namespace

torch::Tensor bam_spatial_branch(const torch::Tensor& x, const BamSpatialLayers& layers) {
#ifdef DYNATTN_HAVE_VEC16
  const BranchConfig cfg = prepare("bam_spatial_branch", x, layers);
  const auto params = params_of(layers, x);
  // Inference: no node, nothing kept beyond the call.
  if (!records_grad(x, params)) return forward_of(x, params_from(params), cfg).ms;
  const auto& p = params;  // one argument each: LibTorch 1.13 counts a list as one input
  return BamSpatialFunction::apply(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9],
                                   p[10], p[11], p[12], p[13], cfg);
#else
  TORCH_CHECK(false, "bam_spatial_branch: built without the vector kernels");
  return {};
#endif
}

torch::Tensor bam_spatial_branch_combine(const torch::Tensor& x, const torch::Tensor& mc,
                                         const BamSpatialLayers& layers, bool product) {
#ifdef DYNATTN_HAVE_VEC16
  const BranchConfig cfg = prepare("bam_spatial_branch_combine", x, layers);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(
      mc.defined() && mc.numel() == n * c && mc.is_cpu() && mc.scalar_type() == torch::kFloat,
      "bam_spatial_branch_combine: expected M_c of ", n, " x ", c, " floats on the CPU, got ",
      mc.defined() ? mc.sizes() : torch::IntArrayRef{});
  const auto params = params_of(layers, x);
  if (!records_grad(x, params) && !(torch::GradMode::is_enabled() && mc.requires_grad())) {
    const auto ms = forward_of(x, params_from(params), cfg).ms;
    return detail::bam_combine_forward(x, mc.reshape({n, c}).contiguous(), ms.view({n, -1}),
                                       product);
  }
  const auto& p = params;
  return BamSpatialCombineFunction::apply(x, mc, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                                          p[8], p[9], p[10], p[11], p[12], p[13], cfg, product);
#else
  TORCH_CHECK(false, "bam_spatial_branch_combine: built without the vector kernels");
  return {};
#endif
}

}  // namespace dynattn
