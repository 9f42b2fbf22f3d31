#include "dynattn/ops/softmax_attention.h"

#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "onednn_engine.h"

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

}  // namespace

#ifndef DYNATTN_HAVE_ONEDNN

bool softmax_attention_applicable(const torch::Tensor&, const torch::Tensor&,
                                  const torch::Tensor&) {
  return false;
}

torch::Tensor softmax_attention(const torch::Tensor& theta, const torch::Tensor& phi,
                                const torch::Tensor& g) {
  check_shapes(theta, phi, g);
  TORCH_CHECK(false, "softmax_attention: dynattn was built without the oneDNN library (libdnnl)");
}

#else

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
  const int64_t n = theta.size(0), d = theta.size(1), q = theta.size(2), k = phi.size(2),
                dv = g.size(1);
  dnnl::stream stream(detail::onednn_cpu_engine());
  auto a = torch::empty({n, q, k}, theta.options());
  batched_matmul(stream, theta, /*a_transposed=*/true, phi, false, a);  // logits theta^T phi
  const auto a_desc = matrices(n, q, k, false);
  dnnl::softmax_forward(softmax_pd(a_desc))
      .execute(stream, {{DNNL_ARG_SRC, wrap(a_desc, a)}, {DNNL_ARG_DST, wrap(a_desc, a)}});
  auto y = torch::empty({n, dv, q}, theta.options());
  batched_matmul(stream, g, false, a, /*b_transposed=*/true, y);  // g A^T
  stream.wait();
  // Outside ATen's operators: counted as the two torch::bmm calls would be.
  record_macs("dynattn::softmax_attention", n * q * k * (d + dv));
  return {y, a};
}

struct SoftmaxAttentionFunction : torch::autograd::Function<SoftmaxAttentionFunction> {
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
    dnnl::stream stream(detail::onednn_cpu_engine());
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
      // In place: the logits' gradient overwrites the softmax output's.
      dnnl::softmax_backward(pd).execute(stream, {{DNNL_ARG_DST, wrap(desc, a)},
                                                  {DNNL_ARG_DIFF_DST, wrap(desc, d_a)},
                                                  {DNNL_ARG_DIFF_SRC, wrap(desc, d_a)}});
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

bool softmax_attention_applicable(const torch::Tensor& theta, const torch::Tensor& phi,
                                  const torch::Tensor& g) {
  for (const auto* t : {&theta, &phi, &g})
    if (!t->defined() || !t->is_cpu() || t->scalar_type() != torch::kFloat ||
        t->layout() != torch::kStrided || t->dim() != 3 || t->numel() == 0)
      return false;
  return conv2d_kernel_selection_enabled();
}

torch::Tensor softmax_attention(const torch::Tensor& theta, const torch::Tensor& phi,
                                const torch::Tensor& g) {
  check_shapes(theta, phi, g);
  TORCH_CHECK(softmax_attention_applicable(theta, phi, g),
              "softmax_attention: expected non-empty float CPU tensors (and the kernel selection "
              "switch on), got ",
              theta.scalar_type(), " on ", theta.device());
  try {
    return SoftmaxAttentionFunction::apply(theta.contiguous(), phi.contiguous(), g.contiguous());
  } catch (const dnnl::error& e) {
    TORCH_CHECK(false, "softmax_attention: oneDNN failed for theta ", theta.sizes(), ", phi ",
                phi.sizes(), ", g ", g.sizes(), ": ", e.what());
  }
}

#endif

}  // namespace dynattn
