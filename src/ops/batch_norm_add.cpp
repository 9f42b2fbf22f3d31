#include "dynattn/ops/batch_norm_add.h"
#include "dynattn/ops/dispatch.h"

#include <cmath>
#include <utility>

#include "batch_norm_add_kernels.h"
#include "dynattn/ops/conv2d.h"
#include "vec16.h"
#include "vector_clones.h"

namespace dynattn {

namespace {

// Sums over the `count` segments of `length` floats starting every `stride` floats: of v, or of
// (v - centre)^2 when `squares`. Sixteen lanes of float partial sums, added up in double.
#ifdef DYNATTN_HAVE_VEC16
using namespace detail::vec16;

DYNATTN_KERNEL_CLONES
double segment_sum(const float* data, int64_t count, int64_t length, int64_t stride, bool squares,
                   float centre) {
  Vec acc{};
  double tail = 0.0;
  for (int64_t s = 0; s < count; ++s) {
    const float* p = data + s * stride;
    int64_t i = 0;
    for (; i + kLanes <= length; i += kLanes) {
      const Vec v = load(p + i, kLanes);
      const Vec d = v - centre;
      acc += squares ? d * d : v;
    }
    for (; i < length; ++i) {
      const double d = static_cast<double>(p[i]) - (squares ? centre : 0.0);
      tail += squares ? d * d : d;
    }
  }
  double total = tail;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// sum g and sum g (z - centre) over the same segments of g and z.
DYNATTN_KERNEL_CLONES
std::pair<double, double> segment_gradient_sums(const float* g, const float* z, int64_t count,
                                                int64_t length, int64_t stride, float centre) {
  Vec sum_g{}, sum_gz{};
  double tail_g = 0.0, tail_gz = 0.0;
  for (int64_t s = 0; s < count; ++s) {
    const float *gp = g + s * stride, *zp = z + s * stride;
    int64_t i = 0;
    for (; i + kLanes <= length; i += kLanes) {
      const Vec gv = load(gp + i, kLanes);
      sum_g += gv;
      sum_gz += gv * (load(zp + i, kLanes) - centre);
    }
    for (; i < length; ++i) {
      tail_g += gp[i];
      tail_gz += static_cast<double>(gp[i]) * (zp[i] - centre);
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    tail_g += sum_g[l];
    tail_gz += sum_gz[l];
  }
  return {tail_g, tail_gz};
}
#else
std::pair<double, double> segment_gradient_sums(const float* g, const float* z, int64_t count,
                                                int64_t length, int64_t stride, float centre) {
  double sum_g = 0.0, sum_gz = 0.0;
  for (int64_t s = 0; s < count; ++s)
    for (int64_t i = 0; i < length; ++i) {
      sum_g += g[s * stride + i];
      sum_gz += static_cast<double>(g[s * stride + i]) * (z[s * stride + i] - centre);
    }
  return {sum_g, sum_gz};
}

double segment_sum(const float* data, int64_t count, int64_t length, int64_t stride, bool squares,
                   float centre) {
  double total = 0.0;
  for (int64_t s = 0; s < count; ++s)
    for (int64_t i = 0; i < length; ++i) {
      const double d = static_cast<double>(data[s * stride + i]) - (squares ? centre : 0.0);
      total += squares ? d * d : d;
    }
  return total;
}
#endif

// The elementwise halves of the two passes below, per ISA: the baseline (SSE2) build of these
// loops was about 5% of the non-local block's training step at 64@7x7, batch 64. AVX2 and the
// baseline only: neither has FMA, so every clone rounds as the baseline did.

// out = z * scale + shift + r over n segments of m floats, `stride` apart.
DYNATTN_VECTOR_CLONES
void affine_add_segments(const float* z, const float* r, int64_t n, int64_t m, int64_t stride,
                         float scale, float shift, float* out) {
  for (int64_t s = 0; s < n; ++s) {
    const float* __restrict__ zs = z + s * stride;
    const float* __restrict__ rs = r + s * stride;
    float* __restrict__ os = out + s * stride;
    for (int64_t i = 0; i < m; ++i) os[i] = zs[i] * scale + shift + rs[i];
  }
}

// dz = k * (g - mean_g - (z - mu) * inv * mean_gx) over the same segments.
DYNATTN_VECTOR_CLONES
void norm_grad_segments(const float* g, const float* z, int64_t n, int64_t m, int64_t stride,
                        float k, float mean_g, float mu, float inv, float mean_gx, float* dz) {
  for (int64_t s = 0; s < n; ++s) {
    const float* __restrict__ gs = g + s * stride;
    const float* __restrict__ zs = z + s * stride;
    float* __restrict__ ds = dz + s * stride;
    for (int64_t i = 0; i < m; ++i) ds[i] = k * (gs[i] - mean_g - (zs[i] - mu) * inv * mean_gx);
  }
}

}  // namespace

namespace detail {

void batch_norm_add_forward(const torch::Tensor& z, const torch::Tensor& residual,
                            const torch::Tensor& weight, const torch::Tensor& bias,
                            const torch::Tensor& running_mean, const torch::Tensor& running_var,
                            double factor, double eps, torch::Tensor& out, torch::Tensor& mean,
                            torch::Tensor& inv_std) {
  const int64_t n = z.size(0), c = z.size(1), m = z.numel() / (n * c);
  const double count = static_cast<double>(n * m);
  out = torch::empty_like(z);
  mean = torch::empty({c}, z.options());
  inv_std = torch::empty({c}, z.options());
  const float *zp = z.data_ptr<float>(), *rp = residual.data_ptr<float>();
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float *op = out.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = inv_std.data_ptr<float>();
  const bool keep = running_mean.defined() && running_mean.numel() == c;
  float* rm = keep ? running_mean.data_ptr<float>() : nullptr;
  float* rv = keep ? running_var.data_ptr<float>() : nullptr;
  at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const float* first = zp + ch * m;
      const double mu = segment_sum(first, n, m, c * m, false, 0.0f) / count;
      const double var = segment_sum(first, n, m, c * m, true, static_cast<float>(mu)) / count;
      const double inv = 1.0 / std::sqrt(var + eps);
      mp[ch] = static_cast<float>(mu);
      ip[ch] = static_cast<float>(inv);
      const float scale = static_cast<float>(w[ch] * inv);
      const float shift = static_cast<float>(b[ch] - mu * w[ch] * inv);
      affine_add_segments(zp + ch * m, rp + ch * m, n, m, c * m, scale, shift, op + ch * m);
      if (keep) {
        const double unbiased = count > 1 ? var * count / (count - 1) : var;
        rm[ch] = static_cast<float>((1 - factor) * rm[ch] + factor * mu);
        rv[ch] = static_cast<float>((1 - factor) * rv[ch] + factor * unbiased);
      }
    }
  });
  // Written through pointers: bump the versions as an in-place ATen op would, so that what was
  // derived from the statistics (e.g. a folded inference form) is known to be stale.
  if (keep) {
    for (const auto* t : {&running_mean, &running_var})
      if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  }
}

void batch_norm_add_backward(const torch::Tensor& z, const torch::Tensor& weight,
                             const torch::Tensor& mean, const torch::Tensor& inv_std,
                             const torch::Tensor& dy, torch::Tensor& dz, torch::Tensor& d_weight,
                             torch::Tensor& d_bias) {
  const int64_t n = z.size(0), c = z.size(1), m = z.numel() / (n * c);
  const double count = static_cast<double>(n * m);
  dz = torch::empty_like(z);
  d_weight = torch::empty({c}, weight.options());
  d_bias = torch::empty({c}, weight.options());
  const float *zp = z.data_ptr<float>(), *gp = dy.data_ptr<float>(), *w = weight.data_ptr<float>(),
              *mp = mean.data_ptr<float>(), *ip = inv_std.data_ptr<float>();
  float *dp = dz.data_ptr<float>(), *dw = d_weight.data_ptr<float>(),
        *db = d_bias.data_ptr<float>();
  at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const float mu = mp[ch], inv = ip[ch];
      const auto [sum_dy, sum_dy_centred] =
          segment_gradient_sums(gp + ch * m, zp + ch * m, n, m, c * m, mu);
      const double sum_dy_xhat = sum_dy_centred * inv;
      dw[ch] = static_cast<float>(sum_dy_xhat);
      db[ch] = static_cast<float>(sum_dy);
      const float k = w[ch] * inv;
      const float mean_dy = static_cast<float>(sum_dy / count);
      const float mean_dy_xhat = static_cast<float>(sum_dy_xhat / count);
      norm_grad_segments(gp + ch * m, zp + ch * m, n, m, c * m, k, mean_dy, mu, inv, mean_dy_xhat,
                         dp + ch * m);
    }
  });
}

}  // namespace detail

namespace {

struct BatchNormAddFunction : torch::autograd::Function<BatchNormAddFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& z,
                               const torch::Tensor& residual, const torch::Tensor& weight,
                               const torch::Tensor& bias, torch::Tensor running_mean,
                               torch::Tensor running_var, double factor, double eps) {
    torch::Tensor out, mean, inv_std;
    detail::batch_norm_add_forward(z, residual, weight, bias, running_mean, running_var, factor,
                                   eps, out, mean, inv_std);
    ctx->save_for_backward({z, weight, mean, inv_std});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor dz, d_weight, d_bias;
    detail::batch_norm_add_backward(saved[0], saved[1], saved[2], saved[3], grads[0].contiguous(),
                                    dz, d_weight, d_bias);
    return {dz, grads[0], d_weight, d_bias, {}, {}, {}, {}};
  }
};

}  // namespace

bool batch_norm_add_applicable(const torch::Tensor& z, const torch::Tensor& residual) {
  for (const auto* t : {&z, &residual})
    if (!t->defined() || !t->is_cpu() || t->scalar_type() != torch::kFloat || !t->is_contiguous() ||
        t->numel() == 0 || t->dim() < 2)
      return false;
  return z.sizes() == residual.sizes() && dynattn_kernels_enabled();
}

torch::Tensor batch_norm_add(const torch::Tensor& z, const torch::Tensor& residual,
                             const torch::Tensor& weight, const torch::Tensor& bias,
                             const torch::Tensor& running_mean, const torch::Tensor& running_var,
                             double factor, double eps) {
  TORCH_CHECK(batch_norm_add_applicable(z, residual),
              "batch_norm_add: expected contiguous non-empty float CPU tensors z and residual of "
              "one shape (and the dynattn kernel policy on), got ",
              z.sizes(), " and ", residual.sizes());
  const int64_t c = z.size(1);
  TORCH_CHECK(weight.defined() && bias.defined() && weight.numel() == c && bias.numel() == c &&
                  weight.scalar_type() == torch::kFloat && bias.scalar_type() == torch::kFloat,
              "batch_norm_add: expected float weight and bias of ", c, " channels");
  TORCH_CHECK(!running_mean.defined() ||
                  (running_mean.numel() == c && running_var.defined() && running_var.numel() == c &&
                   running_mean.is_contiguous() && running_var.is_contiguous()),
              "batch_norm_add: expected running statistics of ", c, " channels");
  // No statistics as empty tensors: autograd functions in LibTorch 1.13 reject undefined inputs.
  const auto none = torch::empty({0}, z.options());
  return BatchNormAddFunction::apply(z, residual, weight.contiguous(), bias.contiguous(),
                                     running_mean.defined() ? running_mean : none,
                                     running_var.defined() ? running_var : none, factor, eps);
}

}  // namespace dynattn
