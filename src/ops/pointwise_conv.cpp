#include "dynattn/ops/pointwise_conv.h"
#include "dynattn/ops/dispatch.h"

#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "onednn_engine.h"
#include "strided_matmul.h"

namespace dynattn {

namespace {

void check_shapes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  bool ok = x.dim() >= 3 && weight.dim() == x.dim() && weight.size(1) == x.size(1);
  for (int64_t d = 2; ok && d < weight.dim(); ++d) ok = weight.size(d) == 1;
  TORCH_CHECK(ok,
              "pointwise_conv: expected x [N, C_in, ...] and weight [C_out, C_in, 1, ...] of "
              "the same rank, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0)),
              "pointwise_conv: expected bias [", weight.size(0), "], got ", bias.sizes());
}

#ifdef DYNATTN_HAVE_ONEDNN

struct PointwiseConvFunction : torch::autograd::Function<PointwiseConvFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias) {
    const int64_t n = x.size(0), c_in = x.size(1), c_out = weight.size(0);
    const int64_t pixels = x.numel() / (n * c_in);
    const auto w = weight.reshape({c_out, c_in}).contiguous();
    auto sizes = x.sizes().vec();
    sizes[1] = c_out;
    auto y = torch::empty(sizes, x.options());
    detail::strided_matmul(detail::row_major(1, c_out, c_in), w.data_ptr<float>(),
                           detail::row_major(n, c_in, pixels), x.data_ptr<float>(),
                           detail::row_major(n, c_out, pixels), y.data_ptr<float>());
    // oneDNN 2.6 has no fast per-row bias for this form: one pass over y.
    const bool has_bias = bias.numel() > 0;
    if (has_bias) y.view({n, c_out, pixels}).add_(bias.view({1, c_out, 1}));
    record_macs("dynattn::pointwise_conv", n * c_out * c_in * pixels);
    ctx->save_for_backward({x, w});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["weight_sizes"] = weight.sizes().vec();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1];
    const auto dy = grads[0].contiguous();
    const int64_t n = x.size(0), c_in = x.size(1), c_out = w.size(0);
    const int64_t pixels = x.numel() / (n * c_in);
    torch::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) {
      dx = torch::empty_like(x);
      detail::strided_matmul(detail::transposed(1, c_in, c_out), w.data_ptr<float>(),
                             detail::row_major(n, c_out, pixels), dy.data_ptr<float>(),
                             detail::row_major(n, c_in, pixels), dx.data_ptr<float>());
    }
    if (ctx->needs_input_grad(1)) {
      // dW^T per sample, [N, C_in, C_out], then the sum over the batch.
      auto per_sample = torch::empty({n, c_in, c_out}, x.options());
      detail::strided_matmul(detail::row_major(n, c_in, pixels), x.data_ptr<float>(),
                             detail::transposed(n, pixels, c_out), dy.data_ptr<float>(),
                             detail::row_major(n, c_in, c_out), per_sample.data_ptr<float>());
      dw = per_sample.sum(0).t().reshape(ctx->saved_data["weight_sizes"].toIntVector());
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["has_bias"].toBool())
      db = dy.view({n, c_out, pixels}).sum(std::vector<int64_t>{0, 2});
    return {dx, dw, db};
  }
};

#endif

}  // namespace

bool pointwise_conv_applicable(const torch::Tensor& x, const torch::Tensor& weight) {
#ifdef DYNATTN_HAVE_ONEDNN
  for (const auto* t : {&x, &weight})
    if (!t->defined() || !t->is_cpu() || t->scalar_type() != torch::kFloat ||
        t->layout() != torch::kStrided || t->numel() == 0)
      return false;
  return x.dim() >= 3 && dynattn_kernels_enabled();
#else
  return false;
#endif
}

torch::Tensor pointwise_conv(const torch::Tensor& x, const torch::Tensor& weight,
                             const torch::Tensor& bias) {
  check_shapes(x, weight, bias);
  TORCH_CHECK(pointwise_conv_applicable(x, weight),
              "pointwise_conv: expected non-empty float CPU tensors, the oneDNN library and the "
              "dynattn kernel policy, got ",
              x.scalar_type(), " on ", x.device());
#ifdef DYNATTN_HAVE_ONEDNN
  try {
    // No bias as an empty tensor: autograd functions in LibTorch 1.13 reject undefined inputs.
    return PointwiseConvFunction::apply(
        x.contiguous(), weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
  } catch (const dnnl::error& e) {
    TORCH_CHECK(false, "pointwise_conv: oneDNN failed for x ", x.sizes(), ", weight ",
                weight.sizes(), ": ", e.what());
  }
#else
  return torch::Tensor();
#endif
}

}  // namespace dynattn
