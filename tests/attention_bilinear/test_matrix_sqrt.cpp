#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "dynattn/attention/matrix_sqrt.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using dynattn::matrix_sqrt_newton_schulz;
using dynattn::MatrixSqrtOptions;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {

// Well-conditioned SPD batch [n, c, c]: B B^T / c + 0.5 I.
torch::Tensor random_spd(int64_t n, int64_t c, torch::Dtype dtype = torch::kDouble) {
  const auto b = torch::randn({n, c, c}, torch::TensorOptions().dtype(dtype));
  return torch::bmm(b, b.transpose(1, 2)) / static_cast<double>(c) +
         0.5 * torch::eye(c, torch::TensorOptions().dtype(dtype));
}

double relative_square_error(const torch::Tensor& root, const torch::Tensor& a) {
  return ((torch::bmm(root, root) - a).norm() / a.norm()).item<double>();
}

}  // namespace

TEST(MatrixSqrt, HandCheckedOneIterationOnDiagonal) {
  // A = diag(1, 3). trace: c = 4, Y0 = diag(1/4, 3/4), Y1 = Y0 (3 - Y0) / 2
  //   = diag(11/32, 27/32), times sqrt(4) = 2: diag(11/16, 27/16).
  const auto a = torch::diag(torch::tensor({1.0, 3.0}, torch::kDouble)).unsqueeze(0);
  const auto trace =
      matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(1).normalization("trace"));
  EXPECT_TRUE(torch::allclose(
      trace, torch::diag(torch::tensor({11.0 / 16, 27.0 / 16}, torch::kDouble)).unsqueeze(0), 0,
      1e-15));
  // Frobenius: c = sqrt(10); y0 = a / c, y1 = y0 (3 - y0) / 2, times 10^(1/4).
  const double c = std::sqrt(10.0);
  auto expected = [&](double x) { return (x / c) * (3 - x / c) / 2 * std::sqrt(c); };
  const auto frob =
      matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(1).normalization("frobenius"));
  EXPECT_NEAR(frob[0][0][0].item<double>(), expected(1.0), 1e-15);
  EXPECT_NEAR(frob[0][1][1].item<double>(), expected(3.0), 1e-15);
  EXPECT_EQ(frob[0][0][1].item<double>(), 0.0);
}

TEST(MatrixSqrt, ErrorDecreasesWithIterations) {
  torch::manual_seed(3);
  const auto a = random_spd(3, 6);
  for (const char* norm : {"frobenius", "trace"}) {
    const double e5 = relative_square_error(
        matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(5).normalization(norm)), a);
    const double e10 = relative_square_error(
        matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(10).normalization(norm)), a);
    const double e20 = relative_square_error(
        matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(20).normalization(norm)), a);
    SCOPED_TRACE(norm);
    EXPECT_LT(e10, e5 * 0.1);
    EXPECT_LT(e20, e10);
    EXPECT_LT(e20, 1e-12);
    EXPECT_LT(e5, 0.2);
  }
}

TEST(MatrixSqrt, FrobeniusConvergesFasterThanTrace) {
  torch::manual_seed(4);
  const auto a = random_spd(2, 16);
  const auto opts = MatrixSqrtOptions().iterations(5);
  const double frob =
      relative_square_error(matrix_sqrt_newton_schulz(a, MatrixSqrtOptions(opts)), a);
  const double trace = relative_square_error(
      matrix_sqrt_newton_schulz(a, MatrixSqrtOptions(opts).normalization("trace")), a);
  EXPECT_LT(frob, trace);
}

TEST(MatrixSqrt, MatchesEigendecomposition) {
  torch::manual_seed(5);
  const auto a = random_spd(2, 5);
  const auto eig = torch::linalg::eigh(a, "L");
  const auto v = std::get<1>(eig);
  const auto root = torch::bmm(v * std::get<0>(eig).sqrt().unsqueeze(1), v.transpose(1, 2));
  const auto ns = matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(25));
  EXPECT_LT((ns - root).abs().max().item<double>(), 1e-12);
}

TEST(MatrixSqrt, FloatFollowsInputDtype) {
  torch::manual_seed(6);
  const auto a = random_spd(2, 4, torch::kFloat);
  const auto root = matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(15));
  EXPECT_EQ(root.scalar_type(), torch::kFloat);
  EXPECT_LT(relative_square_error(root, a), 1e-5);
}

TEST(MatrixSqrt, ZeroMatrixGivesZerosAndFiniteGradient) {
  const auto a = torch::zeros({1, 3, 3}, torch::kDouble).requires_grad_();
  for (const char* norm : {"frobenius", "trace"}) {
    const auto root = matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().normalization(norm));
    EXPECT_EQ(root.abs().max().item<double>(), 0.0);
    const auto grad = torch::autograd::grad({root.sum()}, {a})[0];
    EXPECT_TRUE(torch::isfinite(grad).all().item<bool>()) << norm;
  }
}

TEST(MatrixSqrt, Gradcheck) {
  torch::manual_seed(7);
  for (const char* norm : {"frobenius", "trace"}) {
    for (int64_t iterations : {1, 2, 5}) {
      const auto a = random_spd(2, 4).requires_grad_();
      SCOPED_TRACE(std::string(norm) + " " + std::to_string(iterations));
      EXPECT_GRADCHECK(
          [&] {
            return matrix_sqrt_newton_schulz(
                a, MatrixSqrtOptions().iterations(iterations).normalization(norm));
          },
          {a});
    }
  }
}

TEST(MatrixSqrt, MacsAreThreeNMinusThreeBatchedProducts) {
  const int64_t n = 2, c = 5;
  const auto a = random_spd(n, c, torch::kFloat);
  for (int64_t iterations : {1, 2, 5}) {
    const auto count = dynattn::count_macs(
        [&] { matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(iterations)); });
    const int64_t products = iterations == 1 ? 1 : 3 * iterations - 3;
    EXPECT_EQ(count.macs, products * n * c * c * c) << iterations;
  }
}

TEST(MatrixSqrt, Errors) {
  const auto a = random_spd(1, 3);
  EXPECT_THAT(error_of([&] { matrix_sqrt_newton_schulz(a[0]); }),
              HasSubstr("matrix_sqrt_newton_schulz: expected a batch of square matrices [N,C,C], "
                        "got [3, 3]"));
  EXPECT_THAT(error_of([&] {
                matrix_sqrt_newton_schulz(torch::zeros({1, 3, 4}));
              }),
              HasSubstr("square matrices [N,C,C], got [1, 3, 4]"));
  EXPECT_THAT(error_of([&] {
                matrix_sqrt_newton_schulz(torch::zeros({1, 3, 3}, torch::kLong));
              }),
              HasSubstr("floating-point input"));
  EXPECT_THAT(error_of([&] { matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().iterations(0)); }),
              HasSubstr("iterations must be at least 1, got 0"));
  EXPECT_THAT(
      error_of([&] { matrix_sqrt_newton_schulz(a, MatrixSqrtOptions().normalization("max")); }),
      HasSubstr("normalization must be 'frobenius' or 'trace', got 'max'"));
}
