#include "dynattn/attention/matrix_sqrt.h"

namespace dynattn {

torch::Tensor matrix_sqrt_newton_schulz(const torch::Tensor& a, const MatrixSqrtOptions& options) {
  TORCH_CHECK(a.defined() && a.dim() == 3 && a.size(1) == a.size(2),
              "matrix_sqrt_newton_schulz: expected a batch of square matrices [N,C,C], got ",
              a.defined() ? a.sizes() : torch::IntArrayRef());
  TORCH_CHECK(a.is_floating_point(),
              "matrix_sqrt_newton_schulz: expected a floating-point input, got ", a.scalar_type());
  TORCH_CHECK(options.iterations() >= 1,
              "matrix_sqrt_newton_schulz: iterations must be at least 1, got ",
              options.iterations());
  const std::string& norm = options.normalization();
  TORCH_CHECK(norm == "frobenius" || norm == "trace",
              "matrix_sqrt_newton_schulz: normalization must be 'frobenius' or 'trace', got '",
              norm, "'");
  const int64_t n = a.size(0), c = a.size(1);
  // Clamped so that an all-zero matrix (a dead ReLU map) gives zeros rather than 0/0; squared
  // before the square root of the Frobenius norm so its gradient stays finite there too.
  constexpr double kTiny = 1e-30;
  torch::Tensor scale;
  if (norm == "frobenius") {
    scale = a.pow(2).sum({1, 2}, /*keepdim=*/true).clamp_min(kTiny * kTiny).sqrt();
  } else {
    scale = a.diagonal(0, 1, 2).sum(1).view({n, 1, 1}).clamp_min(kTiny);
  }
  const auto y0 = a / scale;
  const auto eye = torch::eye(c, a.options()).expand({n, c, c});
  const auto three_eye = eye * 3.0;
  // Z0 = I: the first T is (3I - Y0) / 2 and Z1 = T.
  auto t = (three_eye - y0) * 0.5;
  auto y = torch::bmm(y0, t);
  auto z = t;
  for (int64_t k = 1; k < options.iterations(); ++k) {
    t = torch::baddbmm(three_eye, z, y, /*beta=*/1.0, /*alpha=*/-1.0) * 0.5;
    y = torch::bmm(y, t);
    if (k + 1 < options.iterations()) z = torch::bmm(t, z);  // the last Z is never used
  }
  return y * scale.sqrt();
}

}  // namespace dynattn
