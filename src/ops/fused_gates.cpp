#include "dynattn/ops/fused_gates.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"

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

float lanes_total(const float* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

float sum_of(const float* p, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += p[i];
  return lanes_total(acc);
}

// Sum and maximum of p[0..n), n >= 1.
void sum_max_of(const float* p, int64_t n, float* sum, float* max) {
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

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return lanes_total(acc);
}

// y[i] += a * x[i]
void axpy(float a, const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

float sigmoid(float v) {
  return 1.0f / (1.0f + std::exp(-v));
}

float hard_sigmoid(float v) {  // ATen's hardsigmoid: min(max(v + 3, 0), 6) / 6
  return std::min(std::max(v + 3.0f, 0.0f), 6.0f) / 6.0f;
}

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
  const float inv = 1.0f / static_cast<float>(im.hw);
  if (!im.channels_last) {
    at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float* row = im.x + ch * im.hw;
        float sum;
        if (max != nullptr) {
          sum_max_of(row, im.hw, &sum, &max[ch]);
        } else {
          sum = sum_of(row, im.hw);
        }
        mean[ch] = sum * inv;
      }
    });
    return;
  }
  // Channels-last: each task walks every pixel for its block of channels.
  at::parallel_for(0, im.c, std::max<int64_t>(16, grain_for(im.hw)),
                   [&](int64_t begin, int64_t end) {
                     const int64_t len = end - begin;
                     float* sum = mean + begin;
                     std::fill(sum, sum + len, 0.0f);
                     if (max != nullptr) std::copy(im.x + begin, im.x + end, max + begin);
                     for (int64_t p = 0; p < im.hw; ++p) {
                       const float* px = im.x + p * im.c + begin;
                       for (int64_t j = 0; j < len; ++j) sum[j] += px[j];
                       if (max != nullptr) {
                         float* top = max + begin;
                         for (int64_t j = 0; j < len; ++j) top[j] = top[j] < px[j] ? px[j] : top[j];
                       }
                     }
                     for (int64_t j = 0; j < len; ++j) sum[j] *= inv;
                   });
}

// y = x * gate[c] * (pixel_gate ? pixel_gate[p] : 1), the products in that order.
void apply_gates(const Image& im, const float* gate, const float* pixel_gate) {
  if (!im.channels_last) {
    at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float* __restrict__ src = im.x + ch * im.hw;
        float* __restrict__ dst = im.y + ch * im.hw;
        const float g = gate[ch];
        if (pixel_gate == nullptr) {
          for (int64_t p = 0; p < im.hw; ++p) dst[p] = src[p] * g;
        } else {
          for (int64_t p = 0; p < im.hw; ++p) dst[p] = src[p] * g * pixel_gate[p];
        }
      }
    });
    return;
  }
  at::parallel_for(0, im.hw, grain_for(im.c), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* __restrict__ src = im.x + p * im.c;
      float* __restrict__ dst = im.y + p * im.c;
      if (pixel_gate == nullptr) {
        for (int64_t ch = 0; ch < im.c; ++ch) dst[ch] = src[ch] * gate[ch];
      } else {
        const float s = pixel_gate[p];
        for (int64_t ch = 0; ch < im.c; ++ch) dst[ch] = src[ch] * gate[ch] * s;
      }
    }
  });
}

// The channel MLP with its weights read once per call.
class Mlp {
 public:
  Mlp(const ChannelMlp& m, int64_t channels)
      : c_(channels),
        rd_(m.fc1_weight.size(0)),
        w1_(m.fc1_weight),
        w2_(m.fc2_weight),
        b2_(m.fc2_bias),
        hidden_(affine_of(m.fc1_bias, m.bn, rd_, "MLP hidden layer")) {
    TORCH_CHECK(w1_.numel() == rd_ * c_ && w2_.numel() == c_ * rd_, "fused gates: MLP weights of ",
                w1_.numel(), " and ", w2_.numel(), " values do not match ", c_,
                " channels and width ", rd_);
    TORCH_CHECK(b2_.data() == nullptr || b2_.numel() == c_, "fused gates: MLP output bias has ",
                b2_.numel(), " values, expected ", c_);
  }
  int64_t width() const { return rd_; }
  int64_t macs() const { return 2 * c_ * rd_; }

  // out[c] = fc2(relu(bn(fc1(v)))); hidden: rd floats of scratch.
  void operator()(const float* v, float* hidden, float* out) const {
    for (int64_t r = 0; r < rd_; ++r)
      hidden[r] = std::max(0.0f, hidden_(r, dot(w1_.data() + r * c_, v, c_)));
    for (int64_t ch = 0; ch < c_; ++ch) {
      const float bias = b2_.data() != nullptr ? b2_[ch] : 0.0f;
      out[ch] = dot(w2_.data() + ch * rd_, hidden, rd_) + bias;
    }
  }

 private:
  int64_t c_, rd_;
  Values w1_, w2_, b2_;
  Affine hidden_;
};

// Zero-padded planes for "same" convolutions: `planes` maps of h x w with `pad` zeros around.
struct PaddedPlanes {
  PaddedPlanes(int64_t planes, int64_t h, int64_t w, int64_t pad)
      : h(h), w(w), pad(pad), hp(h + 2 * pad), wp(w + 2 * pad), data(planes * hp * wp, 0.0f) {}
  float* plane(int64_t i) { return data.data() + i * hp * wp; }
  const float* plane(int64_t i) const { return data.data() + i * hp * wp; }
  float* interior(int64_t i, int64_t y) { return plane(i) + (y + pad) * wp + pad; }

  int64_t h, w, pad, hp, wp;
  std::vector<float> data;
};

// out[o][y][x] = sum over i, ky, kx of weight[o][i][ky][kx] * in[i][y + ky*dil][x + kx*dil]
// (in padded by dil * (k/2): a stride-1 "same" convolution), for rows y in [y0, y1); out(o, y)
// gives the start of output row y of plane o.
template <class OutRow>
void conv_same(const PaddedPlanes& in, int64_t cin, const float* weight, int64_t cout, int64_t k,
               int64_t dil, int64_t y0, int64_t y1, OutRow&& out) {
  for (int64_t o = 0; o < cout; ++o) {
    for (int64_t y = y0; y < y1; ++y) {
      float* dst = out(o, y);
      std::fill(dst, dst + in.w, 0.0f);
      for (int64_t i = 0; i < cin; ++i) {
        const float* w = weight + (o * cin + i) * k * k;
        for (int64_t ky = 0; ky < k; ++ky) {
          const float* src = in.plane(i) + (y + ky * dil) * in.wp;
          for (int64_t kx = 0; kx < k; ++kx) axpy(w[ky * k + kx], src + kx * dil, dst, in.w);
        }
      }
    }
  }
}

}  // namespace

bool fused_gates_apply(const torch::Tensor& x, std::initializer_list<torch::Tensor> params) {
  if (!conv2d_kernel_selection_enabled() || torch::GradMode::is_enabled()) return false;
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

torch::Tensor fused_squeeze_excitation(const torch::Tensor& x, const ChannelMlp& mlp,
                                       GateFunction gate) {
  const Mlp fc(mlp, x.size(1));
  record_macs("dynattn::fused_squeeze_excitation", x.size(0) * fc.macs());
  return for_each_image(x, [&](const Image& im) {
    std::vector<float> pooled(im.c), logits(im.c), hidden(fc.width());
    pool_pixels(im, pooled.data(), nullptr);
    fc(pooled.data(), hidden.data(), logits.data());
    for (auto& v : logits) v = gate == GateFunction::Sigmoid ? sigmoid(v) : hard_sigmoid(v);
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
      gate[ch] = sigmoid(v + b0);
    }
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
    for (int64_t ch = 0; ch < im.c; ++ch) gate[ch] = sigmoid(gate[ch] + logits[ch]);

    // Spatial gate: the channel max and mean of x * M_c per pixel, straight into the padded
    // input planes of the conv.
    PaddedPlanes maps(2, im.h, im.w, k / 2);
    const int64_t max_plane = spatial.max_first ? 0 : 1, mean_plane = 1 - max_plane;
    const float inv_c = 1.0f / static_cast<float>(im.c);
    at::parallel_for(0, im.h, grain_for(im.w * im.c), [&](int64_t y0, int64_t y1) {
      const int64_t len = (y1 - y0) * im.w;
      std::vector<float> sum(len), max(len);
      if (!im.channels_last) {
        const float* src = im.x + y0 * im.w;
        for (int64_t p = 0; p < len; ++p) sum[p] = max[p] = src[p] * gate[0];
        for (int64_t ch = 1; ch < im.c; ++ch) {
          src = im.x + ch * im.hw + y0 * im.w;
          const float g = gate[ch];
          for (int64_t p = 0; p < len; ++p) {
            const float v = src[p] * g;
            sum[p] += v;
            max[p] = max[p] < v ? v : max[p];
          }
        }
      } else {
        std::vector<float> refined(im.c);
        for (int64_t p = 0; p < len; ++p) {
          const float* px = im.x + (y0 * im.w + p) * im.c;
          for (int64_t ch = 0; ch < im.c; ++ch) refined[ch] = px[ch] * gate[ch];
          sum_max_of(refined.data(), im.c, &sum[p], &max[p]);
        }
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
    std::vector<float> pixel_gate(im.hw);
    at::parallel_for(0, im.h, grain_for(im.w * 2 * k * k), [&](int64_t y0, int64_t y1) {
      conv_same(maps, 2, conv_w.data(), 1, k, 1, y0, y1,
                [&](int64_t, int64_t y) { return pixel_gate.data() + y * im.w; });
      for (int64_t p = y0 * im.w; p < y1 * im.w; ++p)
        pixel_gate[p] = sigmoid(epilogue(0, pixel_gate[p]));
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
      // reduce (1x1, C -> rd) + BN + ReLU into padded planes, two dilated 3x3 convs + BN + ReLU,
      // the final 1x1 (rd -> 1).
      PaddedPlanes a(rd, im.h, im.w, dil), b(rd, im.h, im.w, dil);
      at::parallel_for(0, im.h, grain_for(im.w * im.c * rd), [&](int64_t y0, int64_t y1) {
        for (int64_t y = y0; y < y1; ++y) {
          if (!im.channels_last) {
            for (int64_t r = 0; r < rd; ++r)
              std::fill(a.interior(r, y), a.interior(r, y) + im.w, 0.0f);
            for (int64_t ch = 0; ch < im.c; ++ch) {
              const float* src = im.x + ch * im.hw + y * im.w;
              for (int64_t r = 0; r < rd; ++r)
                axpy(reduce_w[r * im.c + ch], src, a.interior(r, y), im.w);
            }
          } else {
            for (int64_t j = 0; j < im.w; ++j) {
              const float* px = im.x + (y * im.w + j) * im.c;
              for (int64_t r = 0; r < rd; ++r)
                a.interior(r, y)[j] = dot(reduce_w.data() + r * im.c, px, im.c);
            }
          }
          for (int64_t r = 0; r < rd; ++r) {
            float* row = a.interior(r, y);
            for (int64_t j = 0; j < im.w; ++j) row[j] = std::max(0.0f, epilogues[0](r, row[j]));
          }
        }
      });
      PaddedPlanes* src = &a;
      PaddedPlanes* dst = &b;
      const float* dilated[2] = {di0_w.data(), di1_w.data()};
      for (int i = 0; i < 2; ++i) {
        at::parallel_for(0, im.h, grain_for(im.w * rd * rd * 9), [&](int64_t y0, int64_t y1) {
          conv_same(*src, rd, dilated[i], rd, 3, dil, y0, y1,
                    [&](int64_t o, int64_t y) { return dst->interior(o, y); });
          for (int64_t r = 0; r < rd; ++r) {
            for (int64_t y = y0; y < y1; ++y) {
              float* row = dst->interior(r, y);
              for (int64_t j = 0; j < im.w; ++j)
                row[j] = std::max(0.0f, epilogues[1 + i](r, row[j]));
            }
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

    // y = x + x * s. Sum form: s = sigmoid(mc + ms) = 1 / (1 + e^-mc e^-ms), exact while both
    // exponentials stay finite and non-zero; otherwise (and for the product form) one
    // exponential per element.
    const auto finite = [](const std::vector<float>& v) {
      return std::all_of(v.begin(), v.end(), [](float t) { return std::abs(t) <= 80.0f; });
    };
    const bool factor = !product && finite(mc) && finite(ms);
    std::vector<float> ec(im.c), es(im.hw);
    if (factor) {
      for (int64_t ch = 0; ch < im.c; ++ch) ec[ch] = std::exp(-mc[ch]);
      for (int64_t p = 0; p < im.hw; ++p) es[p] = std::exp(-ms[p]);
    }
    const auto gate_of = [&](int64_t ch, int64_t p) {
      if (factor) return 1.0f / (1.0f + ec[ch] * es[p]);
      return sigmoid(product ? mc[ch] * ms[p] : mc[ch] + ms[p]);
    };
    if (!im.channels_last) {
      at::parallel_for(0, im.c, grain_for(im.hw), [&](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) {
          const float* __restrict__ src = im.x + ch * im.hw;
          float* __restrict__ dst = im.y + ch * im.hw;
          if (factor) {
            const float e = ec[ch];
            for (int64_t p = 0; p < im.hw; ++p)
              dst[p] = src[p] + src[p] * (1.0f / (1.0f + e * es[p]));
          } else {
            for (int64_t p = 0; p < im.hw; ++p) dst[p] = src[p] + src[p] * gate_of(ch, p);
          }
        }
      });
    } else {
      at::parallel_for(0, im.hw, grain_for(im.c), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const float* __restrict__ src = im.x + p * im.c;
          float* __restrict__ dst = im.y + p * im.c;
          if (factor) {
            const float e = es[p];
            for (int64_t ch = 0; ch < im.c; ++ch)
              dst[ch] = src[ch] + src[ch] * (1.0f / (1.0f + ec[ch] * e));
          } else {
            for (int64_t ch = 0; ch < im.c; ++ch) dst[ch] = src[ch] + src[ch] * gate_of(ch, p);
          }
        }
      });
    }
  });
}

}  // namespace dynattn
