#include "dynattn/ops/softmax_attention.h"
#include "dynattn/ops/dispatch.h"

#include "attention_kernel.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "onednn_engine.h"

#include <cmath>

namespace dynattn {

namespace {

void check_shapes(const torch::Tensor& theta, const torch::Tensor& phi, const torch::Tensor& g) {
  TORCH_CHECK(theta.dim() == 3 && phi.dim() == 3 && g.dim() == 3,
              "softmax_attention: expected theta [N, D, Q], phi [N, D, K] and g [N, Dv, K], got ",
              theta.sizes(), ", ", phi.sizes(), " and ", g.sizes());
  TORCH_CHECK(phi.size(0) == theta.size(0) && g.size(0) == theta.size(0) &&
                  phi.size(1) == theta.size(1) && g.size(2) == phi.size(2),
              "softmax_attention: expected theta [N, D, Q], phi [N, D, K] and g [N, Dv, K], got ",
              theta.sizes(), ", ", phi.sizes(), " and ", g.sizes());
}

// Outside ATen's operators: counted as the two torch::bmm calls would be.
void record_attention_macs(const torch::Tensor& theta, const torch::Tensor& phi,
                           const torch::Tensor& g) {
  record_macs("dynattn::softmax_attention",
              theta.size(0) * theta.size(2) * phi.size(2) * (theta.size(1) + g.size(1)));
}

bool kernel_fits(const torch::Tensor& phi, const torch::Tensor& g) {
  return detail::attention_kernel_suits(phi.size(1), g.size(1), phi.size(2));
}

// The kernel's operands for contiguous theta [N, D, Q], phi [N, D, K], g [N, Dv, K].
detail::AttentionKernelArgs kernel_args(const torch::Tensor& theta, const torch::Tensor& phi,
                                        const torch::Tensor& g, double scale) {
  detail::AttentionKernelArgs a;
  a.d = theta.size(1);
  a.q = theta.size(2);
  a.k = phi.size(2);
  a.dv = g.size(1);
  a.theta = theta.data_ptr<float>();
  a.theta_stride = a.d * a.q;
  a.phi = phi.data_ptr<float>();
  a.phi_stride = a.d * a.k;
  a.g = g.data_ptr<float>();
  a.g_stride = a.dv * a.k;
  a.count = theta.size(0);
  a.scale = static_cast<float>(scale);
  return a;
}

// The hand-written kernel (attention_kernel.h), images split across threads.
struct KernelAttentionFunction : torch::autograd::Function<KernelAttentionFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& theta,
                               const torch::Tensor& phi, const torch::Tensor& g, double scale,
                               bool save) {
    const int64_t n = theta.size(0), q = theta.size(2), k = phi.size(2), dv = g.size(1);
    auto y = torch::empty({n, dv, q}, theta.options());
    auto probs = save
                     ? torch::empty({n, detail::attention_kernel_probs_size(q, k)}, theta.options())
                     : torch::Tensor();
    auto a = kernel_args(theta, phi, g, scale);
    a.y = y.data_ptr<float>();
    a.y_stride = dv * q;
    a.probs = save ? probs.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      detail::attention_kernel_forward(detail::attention_kernel_images(a, n0, n1));
    });
    record_attention_macs(theta, phi, g);
    ctx->save_for_backward({theta, phi, g, probs});
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &theta = saved[0], &phi = saved[1], &g = saved[2], &probs = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto dy = grads[0].contiguous();
    const int64_t n = theta.size(0), d = theta.size(1), q = theta.size(2), k = phi.size(2),
                  dv = g.size(1);
    auto grad_or_none = [&](int index, const torch::Tensor& like) {
      return ctx->needs_input_grad(index) ? torch::empty_like(like) : torch::Tensor();
    };
    auto d_theta = grad_or_none(0, theta), d_phi = grad_or_none(1, phi), d_g = grad_or_none(2, g);
    auto ptr = [](torch::Tensor& t, int64_t offset) {
      return t.defined() ? t.data_ptr<float>() + offset : nullptr;
    };
    auto a = kernel_args(theta, phi, g, scale);
    a.probs = const_cast<float*>(probs.data_ptr<float>());
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      detail::AttentionKernelGrads out;
      out.dy = dy.data_ptr<float>() + n0 * dv * q;
      out.dy_stride = dv * q;
      out.d_theta = ptr(d_theta, n0 * d * q);
      out.d_theta_stride = d * q;
      out.d_phi = ptr(d_phi, n0 * d * k);
      out.d_phi_stride = d * k;
      out.d_g = ptr(d_g, n0 * dv * k);
      out.d_g_stride = dv * k;
      detail::attention_kernel_backward(detail::attention_kernel_images(a, n0, n1), out);
    });
    return {d_theta, d_phi, d_g, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

#ifdef DYNATTN_HAVE_ONEDNN

namespace {

using dnnl::memory;
using Dims = memory::dims;

// The logical matrix batch [B, R, C] of a tensor stored as [B, R, C], or as [B, C, R] when
// `transposed` (a transpose read through strides, never copied).
memory::desc matrices(int64_t b, int64_t r, int64_t c, bool transposed) {
  return memory::desc(Dims{b, r, c}, memory::data_type::f32,
                      transposed ? Dims{r * c, 1, r} : Dims{r * c, c, 1});
}

memory wrap(const memory::desc& desc, const torch::Tensor& t) {
  return memory(desc, detail::onednn_cpu_engine(), t.data_ptr());
}

// out [B, M, N] = a [B, M, K] x b [B, K, N], a and b given as stored tensors (see matrices()).
void batched_matmul(dnnl::stream& stream, const torch::Tensor& a, bool a_transposed,
                    const torch::Tensor& b, bool b_transposed, const torch::Tensor& out) {
  const int64_t batch = out.size(0), m = out.size(1), n = out.size(2);
  const int64_t k = a_transposed ? a.size(1) : a.size(2);
  const auto a_desc = matrices(batch, m, k, a_transposed);
  const auto b_desc = matrices(batch, k, n, b_transposed);
  const auto out_desc = matrices(batch, m, n, false);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_desc, b_desc, out_desc),
                                        detail::onednn_cpu_engine());
  dnnl::matmul(pd).execute(stream, {{DNNL_ARG_SRC, wrap(a_desc, a)},
                                    {DNNL_ARG_WEIGHTS, wrap(b_desc, b)},
                                    {DNNL_ARG_DST, wrap(out_desc, out)}});
}

dnnl::softmax_forward::primitive_desc softmax_pd(const memory::desc& desc) {
  return dnnl::softmax_forward::primitive_desc(
      dnnl::softmax_forward::desc(dnnl::prop_kind::forward_training, desc, 2),
      detail::onednn_cpu_engine());
}

// Forward on contiguous float tensors: y, and the softmax output A [N, Q, K] for the backward.
std::pair<torch::Tensor, torch::Tensor> attend(const torch::Tensor& theta, const torch::Tensor& phi,
                                               const torch::Tensor& g) {
  const int64_t n = theta.size(0), q = theta.size(2), k = phi.size(2), dv = g.size(1);
  auto& stream = detail::onednn_cpu_stream();
  auto a = torch::empty({n, q, k}, theta.options());
  batched_matmul(stream, theta, /*a_transposed=*/true, phi, false, a);  // logits theta^T phi
  const auto a_desc = matrices(n, q, k, false);
  const auto softmax = softmax_pd(a_desc);
  if (detail::is_reference_implementation(softmax.impl_info_str())) {
    stream.wait();
    a = torch::softmax(a, 2);  // never oneDNN's reference kernel (ops/dispatch.h)
  } else {
    dnnl::softmax_forward(softmax).execute(
        stream, {{DNNL_ARG_SRC, wrap(a_desc, a)}, {DNNL_ARG_DST, wrap(a_desc, a)}});
  }
  auto y = torch::empty({n, dv, q}, theta.options());
  batched_matmul(stream, g, false, a, /*b_transposed=*/true, y);  // g A^T
  stream.wait();
  record_attention_macs(theta, phi, g);
  return {y, a};
}

struct OnednnAttentionFunction : torch::autograd::Function<OnednnAttentionFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& theta,
                               const torch::Tensor& phi, const torch::Tensor& g) {
    auto [y, a] = attend(theta, phi, g);
    ctx->save_for_backward({theta, phi, g, a});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &theta = saved[0], &phi = saved[1], &g = saved[2], &a = saved[3];
    const auto dy = grads[0].contiguous();
    const int64_t n = theta.size(0), q = theta.size(2), k = phi.size(2);
    auto& stream = detail::onednn_cpu_stream();
    torch::Tensor d_theta, d_phi, d_g;
    if (ctx->needs_input_grad(2)) {
      d_g = torch::empty_like(g);
      batched_matmul(stream, dy, false, a, false, d_g);  // dy A
    }
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      auto d_a = torch::empty({n, q, k}, a.options());
      batched_matmul(stream, dy, /*a_transposed=*/true, g, false, d_a);  // dy^T g
      const auto desc = matrices(n, q, k, false);
      const auto forward_pd = softmax_pd(desc);
      const dnnl::softmax_backward::primitive_desc pd(dnnl::softmax_backward::desc(desc, desc, 2),
                                                      detail::onednn_cpu_engine(), forward_pd);
      if (detail::is_reference_implementation(pd.impl_info_str())) {
        // oneDNN 2.6 has its softmax backward for AVX-512 only; elsewhere ATen's elementwise
        // form: dL = A * (dA - sum_k A dA).
        stream.wait();
        d_a = a * (d_a - (a * d_a).sum(2, /*keepdim=*/true));
      } else {
        // In place: the logits' gradient overwrites the softmax output's.
        dnnl::softmax_backward(pd).execute(stream, {{DNNL_ARG_DST, wrap(desc, a)},
                                                    {DNNL_ARG_DIFF_DST, wrap(desc, d_a)},
                                                    {DNNL_ARG_DIFF_SRC, wrap(desc, d_a)}});
      }
      if (ctx->needs_input_grad(0)) {
        d_theta = torch::empty_like(theta);
        batched_matmul(stream, phi, false, d_a, /*b_transposed=*/true, d_theta);  // phi dL^T
      }
      if (ctx->needs_input_grad(1)) {
        d_phi = torch::empty_like(phi);
        batched_matmul(stream, theta, false, d_a, false, d_phi);  // theta dL
      }
    }
    stream.wait();
    return {d_theta, d_phi, d_g};
  }
};

}  // namespace

#endif

bool softmax_attention_applicable(const torch::Tensor& theta, const torch::Tensor& phi,
                                  const torch::Tensor& g) {
  for (const auto* t : {&theta, &phi, &g})
    if (!t->defined() || !t->is_cpu() || t->scalar_type() != torch::kFloat ||
        t->layout() != torch::kStrided || t->dim() != 3 || t->numel() == 0)
      return false;
#ifdef DYNATTN_HAVE_ONEDNN
  const bool some_path = true;
#else
  const bool some_path = detail::attention_kernel_available();
#endif
  return some_path && dynattn_kernels_enabled();
}

torch::Tensor softmax_attention(const torch::Tensor& theta, const torch::Tensor& phi,
                                const torch::Tensor& g, double scale) {
  check_shapes(theta, phi, g);
  TORCH_CHECK(softmax_attention_applicable(theta, phi, g),
              "softmax_attention: expected non-empty float CPU tensors (and the kernel selection "
              "switch on), got ",
              theta.scalar_type(), " on ", theta.device());
  TORCH_CHECK(std::isfinite(scale), "softmax_attention: expected a finite scale, got ", scale);
#ifdef DYNATTN_HAVE_ONEDNN
  if (!kernel_fits(phi, g)) {
    try {
      return OnednnAttentionFunction::apply((scale == 1.0 ? theta : theta * scale).contiguous(),
                                            phi.contiguous(), g.contiguous());
    } catch (const dnnl::error& e) {
      TORCH_CHECK(false, "softmax_attention: oneDNN failed for theta ", theta.sizes(), ", phi ",
                  phi.sizes(), ", g ", g.sizes(), ": ", e.what());
    }
  }
#endif
  // Inside apply() grad mode is off: whether the backward will run is decided here.
  const bool save = torch::GradMode::is_enabled() &&
                    (theta.requires_grad() || phi.requires_grad() || g.requires_grad());
  return KernelAttentionFunction::apply(theta.contiguous(), phi.contiguous(), g.contiguous(), scale,
                                        save);
}

}  // namespace dynattn
