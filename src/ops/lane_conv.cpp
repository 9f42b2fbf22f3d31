#include "lane_conv.h"

#ifdef DYNATTN_HAVE_VEC16
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace dynattn::detail {
namespace {
using namespace vec16;

// Output channels per register block.
constexpr int64_t kOutBlock = 4;
constexpr int64_t kMaxTaps = kLaneConvMaxKernel * kLaneConvMaxKernel;

// Taps of output pixel (y, x) that fall inside the map: index ky * k + kx and the input pixel's
// offset (in floats of the lane layout).
struct Taps {
  int count = 0;
  int index[kMaxTaps];
  int64_t offset[kMaxTaps];
};

Taps taps_at(int64_t y, int64_t x, int64_t k, int64_t d, const LaneShape& g) {
  Taps t;
  const int64_t r = k / 2;
  for (int64_t ky = 0; ky < k; ++ky) {
    const int64_t yy = y + (ky - r) * d;
    if (yy < 0 || yy >= g.h) continue;
    for (int64_t kx = 0; kx < k; ++kx) {
      const int64_t xx = x + (kx - r) * d;
      if (xx < 0 || xx >= g.w) continue;
      t.index[t.count] = static_cast<int>(ky * k + kx);
      t.offset[t.count] = (yy * g.w + xx) * g.n;
      ++t.count;
    }
  }
  return t;
}

// OB output channels from o0, images [n0, n0 + lanes) of one output pixel. w [cout][cin][kk];
// out points at channel o0's pixel, image 0.
template <int64_t OB>
DYNATTN_ALWAYS_INLINE void conv_pixel_block(const float* in, int64_t cin, int64_t plane,
                                            const float* w, int64_t kk, const float* bias,
                                            int64_t o0, const Taps& taps, int64_t n0, int64_t lanes,
                                            float* out) {
  Vec acc[OB];
  for (int64_t o = 0; o < OB; ++o) acc[o] = splat(bias != nullptr ? bias[o0 + o] : 0.0f);
  for (int64_t i = 0; i < cin; ++i) {
    for (int t = 0; t < taps.count; ++t) {
      // A whole vector even for the last images: the lanes past them are other pixels' (or the
      // buffer's slack) and only feed lanes that are not stored.
      const Vec v = load(in + i * plane + taps.offset[t] + n0, kLanes);
      const float* wt = w + (o0 * cin + i) * kk + taps.index[t];
      for (int64_t o = 0; o < OB; ++o) acc[o] += v * wt[o * cin * kk];
    }
  }
  for (int64_t o = 0; o < OB; ++o) store(out + o * plane + n0, acc[o], lanes);
}

template <int64_t OB>
DYNATTN_ALWAYS_INLINE void conv_pixel(const float* in, int64_t cin, int64_t plane, const float* w,
                                      int64_t kk, const float* bias, int64_t o0, const Taps& taps,
                                      int64_t n, float* out) {
  for (int64_t n0 = 0; n0 < n; n0 += kLanes)
    conv_pixel_block<OB>(in, cin, plane, w, kk, bias, o0, taps, n0, std::min(kLanes, n - n0), out);
}

// Output rows [y0, y1) of lane_conv.
DYNATTN_KERNEL_CLONES
void conv_rows(const float* in, int64_t cin, const float* w, const float* bias, int64_t cout,
               int64_t k, int64_t d, const LaneShape& g, int64_t y0, int64_t y1, float* out) {
  const int64_t plane = g.plane(), kk = k * k;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = 0; x < g.w; ++x) {
      const Taps taps = taps_at(y, x, k, d, g);
      float* dst = out + (y * g.w + x) * g.n;
      int64_t o0 = 0;
      for (; o0 + kOutBlock <= cout; o0 += kOutBlock)
        conv_pixel<kOutBlock>(in, cin, plane, w, kk, bias, o0, taps, g.n, dst + o0 * plane);
      switch (cout - o0) {
        case 3:
          conv_pixel<3>(in, cin, plane, w, kk, bias, o0, taps, g.n, dst + o0 * plane);
          break;
        case 2:
          conv_pixel<2>(in, cin, plane, w, kk, bias, o0, taps, g.n, dst + o0 * plane);
          break;
        case 1:
          conv_pixel<1>(in, cin, plane, w, kk, bias, o0, taps, g.n, dst + o0 * plane);
          break;
        default:
          break;
      }
    }
  }
}

DYNATTN_ALWAYS_INLINE double run_dot(const float* a, const float* b, int64_t m) {
  Vec s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= m; i += 2 * kLanes) {
    s0 += load(a + i, kLanes) * load(b + i, kLanes);
    s1 += load(a + i + kLanes, kLanes) * load(b + i + kLanes, kLanes);
  }
  double total = 0.0;
  for (; i < m; ++i) total += static_cast<double>(a[i]) * b[i];
  const Vec s = s0 + s1;
  for (int64_t l = 0; l < kLanes; ++l) total += s[l];
  return total;
}

// dw[o][i][t] = sum over output pixels whose tap t is inside the map of
// d_out[o][p][:] . in[i][p + offset(t)][:], for the (o, i) pairs [k0, k1). Along a row the valid
// output pixels of a tap are one run, and so are their input pixels: one dot per row.
DYNATTN_KERNEL_CLONES
void weight_grad_pairs(const float* d_out, const float* in, int64_t cin, int64_t k, int64_t d,
                       const LaneShape& g, int64_t k0, int64_t k1, float* dw) {
  const int64_t plane = g.plane(), r = k / 2;
  for (int64_t pair = k0; pair < k1; ++pair) {
    const int64_t o = pair / cin, i = pair % cin;
    for (int64_t ky = 0; ky < k; ++ky) {
      const int64_t dy = (ky - r) * d;
      const int64_t y_lo = std::max<int64_t>(0, -dy), y_hi = std::min(g.h, g.h - dy);
      for (int64_t kx = 0; kx < k; ++kx) {
        const int64_t dx = (kx - r) * d;
        const int64_t x_lo = std::max<int64_t>(0, -dx), x_hi = std::min(g.w, g.w - dx);
        double total = 0.0;
        if (x_lo < x_hi) {
          for (int64_t y = y_lo; y < y_hi; ++y) {
            const float* a = d_out + o * plane + (y * g.w + x_lo) * g.n;
            const float* b = in + i * plane + ((y + dy) * g.w + x_lo + dx) * g.n;
            total += run_dot(a, b, (x_hi - x_lo) * g.n);
          }
        }
        dw[(pair * k + ky) * k + kx] = static_cast<float>(total);
      }
    }
  }
}

}  // namespace

torch::Tensor lane_buffer(int64_t channels, const LaneShape& g,
                          const torch::TensorOptions& options) {
  return torch::empty({channels * g.plane() + kLanes}, options);
}

void lane_conv(const float* in, int64_t cin, const float* weight, const float* bias, int64_t cout,
               int64_t k, int64_t dilation, const LaneShape& g, float* out) {
  TORCH_CHECK(k % 2 == 1 && k <= kLaneConvMaxKernel, "lane_conv: kernel ", k, " not supported");
  const int64_t row_work = std::max<int64_t>(1, g.w * g.n * cin * cout * k * k);
  at::parallel_for(0, g.h, std::max<int64_t>(1, 32768 / row_work), [&](int64_t y0, int64_t y1) {
    conv_rows(in, cin, weight, bias, cout, k, dilation, g, y0, y1, out);
  });
}

void lane_conv_input_grad(const float* d_out, int64_t cout, const float* weight, int64_t cin,
                          int64_t k, int64_t dilation, const LaneShape& g, float* d_in) {
  // Taps are symmetric about the centre: tap t's offset is minus tap (kk - 1 - t)'s.
  const int64_t kk = k * k;
  std::vector<float> flipped(cout * cin * kk);
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i)
      for (int64_t t = 0; t < kk; ++t)
        flipped[(i * cout + o) * kk + t] = weight[(o * cin + i) * kk + kk - 1 - t];
  lane_conv(d_out, cout, flipped.data(), nullptr, cin, k, dilation, g, d_in);
}

void lane_conv_weight_grad(const float* d_out, int64_t cout, const float* in, int64_t cin,
                           int64_t k, int64_t dilation, const LaneShape& g, float* d_weight) {
  at::parallel_for(0, cout * cin, 1, [&](int64_t k0, int64_t k1) {
    weight_grad_pairs(d_out, in, cin, k, dilation, g, k0, k1, d_weight);
  });
}

void to_lanes(const float* x, int64_t c, const LaneShape& g, float* lanes) {
  const int64_t pixels = g.pixels();
  at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch)
      for (int64_t i = 0; i < g.n; ++i) {
        const float* src = x + (i * c + ch) * pixels;
        float* dst = lanes + ch * g.plane() + i;
        for (int64_t p = 0; p < pixels; ++p) dst[p * g.n] = src[p];
      }
  });
}

void from_lanes(const float* lanes, int64_t c, const LaneShape& g, float* x) {
  const int64_t pixels = g.pixels();
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0; i < n1; ++i)
      for (int64_t ch = 0; ch < c; ++ch) {
        const float* src = lanes + ch * g.plane() + i;
        float* dst = x + (i * c + ch) * pixels;
        for (int64_t p = 0; p < pixels; ++p) dst[p] = src[p * g.n];
      }
  });
}

DYNATTN_KERNEL_CLONES
double lane_run_dot(const float* a, const float* b, int64_t m) {
  return run_dot(a, b, m);
}

}  // namespace dynattn::detail
#endif
