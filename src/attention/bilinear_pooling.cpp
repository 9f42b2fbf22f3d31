#include "dynattn/attention/bilinear_pooling.h"

#include <cmath>

namespace dynattn {

torch::Tensor signed_sqrt(const torch::Tensor& x, double eps, const std::string& form) {
  // eps = 0 would bring back the infinite slope at 0 (and 0/0 in the stable form).
  TORCH_CHECK(eps > 0, "signed_sqrt: eps must be positive, got ", eps);
  if (form == "stable") {
    // The rationalised form of sign(x)(sqrt(|x|+eps) - sqrt(eps)): no cancellation for tiny x
    // and autograd gets the true derivative at 0 (sign(x) would contribute a 0 factor there).
    return x / ((x.abs() + eps).sqrt() + std::sqrt(eps));
  }
  TORCH_CHECK(form == "reference", "signed_sqrt: form must be 'stable' or 'reference', got '", form,
              "'");
  return x.sign() * (x.abs() + eps).sqrt();
}

void check_bilinear_normalization(const char* module, const BilinearNormalization& options) {
  TORCH_CHECK(options.sqrt_eps() > 0, module, ": sqrt_eps must be positive, got ",
              options.sqrt_eps());
  TORCH_CHECK(options.sqrt_form() == "stable" || options.sqrt_form() == "reference", module,
              ": sqrt_form must be 'stable' or 'reference', got '", options.sqrt_form(), "'");
}

torch::Tensor normalize_bilinear(const torch::Tensor& f, const BilinearNormalization& options) {
  auto out = f;
  if (options.signed_sqrt()) out = signed_sqrt(out, options.sqrt_eps(), options.sqrt_form());
  if (options.l2()) {
    namespace F = torch::nn::functional;
    out = F::normalize(out, F::NormalizeFuncOptions().p(2).dim(1).eps(1e-12));
  }
  return out;
}

BilinearPoolingImpl::BilinearPoolingImpl(BilinearPoolingOptions options_)
    : options(std::move(options_)) {
  reset();
}

void BilinearPoolingImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.channels() > 0, "BilinearPooling: channels must be positive, got ", o.channels());
  TORCH_CHECK(o.channels_b() >= 0, "BilinearPooling: channels_b must be >= 0 (0: = channels), got ",
              o.channels_b());
  TORCH_CHECK(o.matrix_sqrt() >= 0,
              "BilinearPooling: matrix_sqrt (Newton-Schulz iterations) must be >= 0, got ",
              o.matrix_sqrt());
  TORCH_CHECK(o.matrix_sqrt_norm() == "frobenius" || o.matrix_sqrt_norm() == "trace",
              "BilinearPooling: matrix_sqrt_norm must be 'frobenius' or 'trace', got '",
              o.matrix_sqrt_norm(), "'");
  TORCH_CHECK(o.matrix_sqrt() == 0 || o.channels_b() == 0 || o.channels_b() == o.channels(),
              "BilinearPooling: matrix_sqrt needs the symmetric form (channels_b = channels), got ",
              o.channels(), " and ", o.channels_b());
  check_bilinear_normalization("BilinearPooling", o.normalization());
}

int64_t BilinearPoolingImpl::output_dim() const {
  const int64_t cb = options.channels_b() > 0 ? options.channels_b() : options.channels();
  return options.channels() * cb;
}

torch::Tensor BilinearPoolingImpl::pool(const torch::Tensor& a, const torch::Tensor& b,
                                        AttentionMaps* maps) {
  const char* name = "BilinearPooling";
  check_attention_input(name, a, options.channels());
  const bool symmetric = !b.defined();
  TORCH_CHECK(!symmetric || options.channels_b() == 0 || options.channels_b() == options.channels(),
              name, ": forward(x) is the symmetric form and needs channels_b = channels (",
              options.channels(), "), got channels_b = ", options.channels_b(),
              "; pass the second stream as forward(a, b)");
  if (!symmetric) {
    check_attention_input(name, b,
                          options.channels_b() > 0 ? options.channels_b() : options.channels());
    TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), name,
                ": the two streams must have the same N, H and W, got ", a.sizes(), " and ",
                b.sizes());
    TORCH_CHECK(options.matrix_sqrt() == 0, name,
                ": matrix_sqrt needs the symmetric form forward(x), got two inputs");
  }
  const int64_t n = a.size(0), hw = a.size(2) * a.size(3);
  const auto fa = a.reshape({n, a.size(1), hw});
  const auto fb = symmetric ? fa : b.reshape({n, b.size(1), hw});
  auto phi = torch::bmm(fa, fb.transpose(1, 2));
  if (options.average()) phi = phi / static_cast<double>(hw);
  if (maps) (*maps)["bilinear"] = phi;
  if (options.matrix_sqrt() > 0) {
    phi = matrix_sqrt_newton_schulz(phi, MatrixSqrtOptions()
                                             .iterations(options.matrix_sqrt())
                                             .normalization(options.matrix_sqrt_norm()));
    if (maps) (*maps)["matrix_sqrt"] = phi;
  }
  return normalize_bilinear(phi.reshape({n, -1}), options.normalization());
}

torch::Tensor BilinearPoolingImpl::forward(const torch::Tensor& a, const torch::Tensor& b) {
  return pool(a, b, nullptr);
}

AttentionOutput BilinearPoolingImpl::forward_with_maps(const torch::Tensor& a,
                                                       const torch::Tensor& b) {
  AttentionOutput result;
  result.output = pool(a, b, &result.maps);
  return result;
}

void BilinearPoolingImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "dynattn::BilinearPooling(channels=" << o.channels();
  if (o.channels_b() > 0) stream << ", channels_b=" << o.channels_b();
  stream << ", average=" << o.average() << ", matrix_sqrt=" << o.matrix_sqrt()
         << ", signed_sqrt=" << o.normalization().signed_sqrt() << ", l2=" << o.normalization().l2()
         << ")";
}

}  // namespace dynattn
