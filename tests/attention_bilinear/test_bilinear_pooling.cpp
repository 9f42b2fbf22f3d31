#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "dynattn/attention/bilinear_pooling.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using dynattn::BilinearNormalization;
using dynattn::BilinearPooling;
using dynattn::BilinearPoolingOptions;
using dynattn::signed_sqrt;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {

BilinearNormalization no_normalization() {
  return BilinearNormalization().signed_sqrt(false).l2(false);
}

// sum_l a_l b_l^T by explicit loops over locations, [N, Ca*Cb].
torch::Tensor naive_bilinear(const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t n = a.size(0), ca = a.size(1), cb = b.size(1);
  auto out = torch::zeros({n, ca * cb}, a.options());
  auto acc = out.accessor<double, 2>();
  auto xa = a.accessor<double, 4>();
  auto xb = b.accessor<double, 4>();
  for (int64_t s = 0; s < n; ++s)
    for (int64_t y = 0; y < a.size(2); ++y)
      for (int64_t x = 0; x < a.size(3); ++x)
        for (int64_t i = 0; i < ca; ++i)
          for (int64_t j = 0; j < cb; ++j) acc[s][i * cb + j] += xa[s][i][y][x] * xb[s][j][y][x];
  return out;
}

// [N=1, C=2, H=1, W=2]: locations l1 = (1, 2) and l2 = (3, -1).
torch::Tensor hand_input() {
  return torch::tensor({1.0, 3.0, 2.0, -1.0}, torch::kDouble).view({1, 2, 1, 2});
}

}  // namespace

TEST(BilinearPooling, HandCheckedTinyInput) {
  // Phi = l1 l1^T + l2 l2^T = [[1,2],[2,4]] + [[9,-3],[-3,1]] = [[10,-1],[-1,5]];
  // averaged over the 2 locations: [[5,-0.5],[-0.5,2.5]].
  BilinearPooling sum(BilinearPoolingOptions(2).average(false).normalization(no_normalization()));
  EXPECT_TRUE(
      torch::equal(sum(hand_input()), torch::tensor({{10.0, -1.0, -1.0, 5.0}}, torch::kDouble)));
  BilinearPooling mean(BilinearPoolingOptions(2).normalization(no_normalization()));
  EXPECT_TRUE(
      torch::equal(mean(hand_input()), torch::tensor({{5.0, -0.5, -0.5, 2.5}}, torch::kDouble)));
  // Signed square root (eps 1e-5): sign(x)(sqrt(|x| + eps) - sqrt(eps)); then L2: the squares
  // of sign(x)sqrt(|x|) sum to 5 + 0.5 + 0.5 + 2.5 = 8.5, so without eps the output would be
  // (sqrt(5), -sqrt(.5), -sqrt(.5), sqrt(2.5)) / sqrt(8.5) = (0.76696, -0.24254, -0.24254,
  // 0.54233).
  const double eps = 1e-5;
  auto ss = [&](double x) {
    return (x > 0 ? 1 : -1) * (std::sqrt(std::abs(x) + eps) - std::sqrt(eps));
  };
  const double v[4] = {ss(5.0), ss(-0.5), ss(-0.5), ss(2.5)};
  const double norm = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]);
  BilinearPooling full(BilinearPoolingOptions(2));
  const auto out = full(hand_input());
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(out[0][k].item<double>(), v[k] / norm, 1e-15);
  const double without_eps[4] = {0.766964988, -0.242535625, -0.242535625, 0.542326145};
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(out[0][k].item<double>(), without_eps[k], 2e-3);
  EXPECT_NEAR(out.norm().item<double>(), 1.0, 1e-15);
}

TEST(BilinearPooling, MatchesPythonReferenceImplementations) {
  // Expected values from /usr/bin/python3 (torch 1.13) on x = sin(0..11) as [1,3,2,2]:
  // "reference": the B-CNN PyTorch reference's head (bmm / (H*W), sign(x)sqrt(|x| + 1e-5),
  // F.normalize); "msqrt": the textbook coupled Newton-Schulz loop (Frobenius, 5 full
  // iterations) followed by the stable signed square root and F.normalize.
  const auto x = torch::arange(12, torch::kDouble).sin().view({1, 3, 2, 2});
  BilinearPooling reference(
      BilinearPoolingOptions(3).normalization(BilinearNormalization().sqrt_form("reference")));
  const auto expected_reference =
      torch::tensor({0.3627798395, -0.2862891731, -0.1564174768, -0.2862891731, 0.4116557583,
                     -0.3735965156, -0.1564174768, -0.3735965156, 0.45489095},
                    torch::kDouble);
  EXPECT_TRUE(torch::allclose(reference(x)[0], expected_reference, 0, 1e-9));
  BilinearPooling msqrt(BilinearPoolingOptions(3).matrix_sqrt(5));
  const auto expected_msqrt =
      torch::tensor({0.3972506125, -0.2921734791, -0.2133661164, -0.2921734791, 0.3919510991,
                     -0.3391983165, -0.2133661164, -0.3391983165, 0.4434798845},
                    torch::kDouble);
  EXPECT_TRUE(torch::allclose(msqrt(x)[0], expected_msqrt, 0, 1e-9));
}

TEST(BilinearPooling, EqualsNaiveLoopOverLocations) {
  torch::manual_seed(1);
  const auto x = torch::randn({2, 3, 3, 4}, torch::kDouble);
  BilinearPooling sum(BilinearPoolingOptions(3).average(false).normalization(no_normalization()));
  EXPECT_TRUE(torch::allclose(sum(x), naive_bilinear(x, x), 1e-12, 1e-12));
  BilinearPooling mean(BilinearPoolingOptions(3).normalization(no_normalization()));
  EXPECT_TRUE(torch::allclose(mean(x), naive_bilinear(x, x) / 12.0, 1e-12, 1e-12));
}

TEST(BilinearPooling, TwoStreamEqualsNaiveLoopWithRowMajorFlattening) {
  torch::manual_seed(2);
  const auto a = torch::randn({2, 3, 2, 3}, torch::kDouble);
  const auto b = torch::randn({2, 5, 2, 3}, torch::kDouble);
  BilinearPooling pool(
      BilinearPoolingOptions(3).channels_b(5).average(false).normalization(no_normalization()));
  const auto out = pool(a, b);
  EXPECT_EQ(out.sizes(), torch::IntArrayRef({2, 15}));
  EXPECT_EQ(pool->output_dim(), 15);
  EXPECT_TRUE(torch::allclose(out, naive_bilinear(a, b), 1e-12, 1e-12));
  // forward(x, x) is the symmetric form.
  const auto x = torch::randn({1, 3, 2, 2}, torch::kDouble);
  BilinearPooling sym(BilinearPoolingOptions(3));
  EXPECT_TRUE(torch::allclose(sym(x, x), sym(x), 1e-14, 1e-14));
}

TEST(BilinearPooling, AverageSwitchDividesByLocationsOnly) {
  torch::manual_seed(3);
  const auto x = torch::randn({2, 4, 3, 5}, torch::kDouble);
  BilinearPooling sum(BilinearPoolingOptions(4).average(false).normalization(no_normalization()));
  BilinearPooling mean(BilinearPoolingOptions(4).normalization(no_normalization()));
  EXPECT_TRUE(torch::allclose(sum(x), mean(x) * 15.0, 1e-13, 1e-13));
  // With L2 on and no signed square root, sum and mean pooling give the same feature.
  BilinearPooling sum_l2(BilinearPoolingOptions(4).average(false).normalization(
      BilinearNormalization().signed_sqrt(false)));
  BilinearPooling mean_l2(
      BilinearPoolingOptions(4).normalization(BilinearNormalization().signed_sqrt(false)));
  EXPECT_TRUE(torch::allclose(sum_l2(x), mean_l2(x), 1e-13, 1e-13));
}

TEST(BilinearPooling, NormalizationSwitchesChangeOnlyTheirStep) {
  torch::manual_seed(4);
  const auto x = torch::randn({2, 3, 2, 2}, torch::kDouble);
  BilinearPooling raw(BilinearPoolingOptions(3).normalization(no_normalization()));
  const auto phi = raw(x);
  BilinearPooling sqrt_only(
      BilinearPoolingOptions(3).normalization(BilinearNormalization().l2(false)));
  EXPECT_TRUE(torch::allclose(sqrt_only(x), signed_sqrt(phi, 1e-5), 1e-14, 1e-14));
  BilinearPooling l2_only(
      BilinearPoolingOptions(3).normalization(BilinearNormalization().signed_sqrt(false)));
  EXPECT_TRUE(torch::allclose(l2_only(x), phi / phi.norm(2, {1}, true), 1e-14, 1e-14));
  BilinearPooling both(BilinearPoolingOptions(3));
  const auto s = signed_sqrt(phi, 1e-5);
  EXPECT_TRUE(torch::allclose(both(x), s / s.norm(2, {1}, true), 1e-14, 1e-14));
  EXPECT_TRUE(torch::allclose(both(x).norm(2, {1}), torch::ones({2}, torch::kDouble)));
}

TEST(SignedSqrt, StableFormIsContinuousWithFiniteSlopeAtZero) {
  const double eps = 1e-5;
  const auto x = torch::tensor({0.0, -0.0, 1e-12, -1e-12}, torch::kDouble).requires_grad_();
  const auto y = signed_sqrt(x, eps);
  const auto grad = torch::autograd::grad({y.sum()}, {x})[0];
  EXPECT_TRUE(torch::isfinite(grad).all().item<bool>());
  // d/dx sign(x)(sqrt(|x| + eps) - sqrt(eps)) = 1 / (2 sqrt(|x| + eps)).
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(grad[k].item<double>(), 0.5 / std::sqrt(eps), 1e-3);
  EXPECT_EQ(y[0].item<double>(), 0.0);
  EXPECT_LT(std::abs(y[2].item<double>()), 1e-9);  // continuous: no jump of sqrt(eps)
}

TEST(SignedSqrt, CloseToPlainSignedSqrtAwayFromZero) {
  const double eps = 1e-5;
  const auto x = torch::tensor({-100.0, -1.0, -0.01, 0.01, 1.0, 100.0}, torch::kDouble);
  const auto plain = x.sign() * x.abs().sqrt();
  // |sign(x)(sqrt(|x|+eps) - sqrt(eps)) - sign(x)sqrt(|x|)| <= sqrt(eps)
  EXPECT_LE((signed_sqrt(x, eps) - plain).abs().max().item<double>(), std::sqrt(eps));
  EXPECT_LT((signed_sqrt(x, 1e-12) - plain).abs().max().item<double>(), 1.1e-6);
  // Exact value by hand: sqrt(1 + eps) - sqrt(eps).
  EXPECT_NEAR(signed_sqrt(x, eps)[4].item<double>(), std::sqrt(1 + eps) - std::sqrt(eps), 1e-15);
}

TEST(SignedSqrt, ReferenceFormDiffersExactlyBySqrtEps) {
  const double eps = 1e-5;
  const auto x = torch::tensor({-4.0, -0.3, 0.0, 0.3, 4.0}, torch::kDouble).requires_grad_();
  const auto ref = signed_sqrt(x, eps, "reference");
  const auto stable = signed_sqrt(x, eps, "stable");
  EXPECT_TRUE(torch::allclose(ref - stable, x.sign() * std::sqrt(eps), 0, 1e-15));
  // The reference form's autograd slope at 0 is 0 (sign(0) = 0), the stable one's 1/(2 sqrt(eps)).
  const auto g_ref = torch::autograd::grad({ref.sum()}, {x})[0];
  const auto g_stable = torch::autograd::grad({stable.sum()}, {x})[0];
  EXPECT_EQ(g_ref[2].item<double>(), 0.0);
  EXPECT_NEAR(g_stable[2].item<double>(), 0.5 / std::sqrt(eps), 1e-9);
  EXPECT_NEAR(g_ref[4].item<double>(), g_stable[4].item<double>(), 1e-15);
  // As a module option.
  const auto in = torch::tensor({1.0, 3.0, 2.0, -1.0}, torch::kDouble).view({1, 2, 1, 2});
  BilinearPooling pool(BilinearPoolingOptions(2).normalization(
      BilinearNormalization().l2(false).sqrt_form("reference")));
  EXPECT_NEAR(pool(in)[0][0].item<double>(), std::sqrt(5.0 + eps), 1e-15);
}

TEST(BilinearPooling, GradientFiniteWhereBilinearEntriesAreExactlyZero) {
  // Channel 0 lives only at location 0 and channel 1 only at location 1: Phi_01 = Phi_10 = 0.
  const auto x = torch::tensor({2.0, 0.0, 0.0, 3.0}, torch::kDouble).view({1, 2, 1, 2});
  x.requires_grad_();
  BilinearPooling pool(BilinearPoolingOptions(2));
  const auto out = pool(x);
  EXPECT_EQ(out[0][1].item<double>(), 0.0);
  const auto grad = torch::autograd::grad({out.sum()}, {x})[0];
  EXPECT_TRUE(torch::isfinite(grad).all().item<bool>());
  // The slope at 0 is the true one, so finite differences agree (an eps large enough that
  // central differences of step 1e-6 resolve the curvature of the square root at 0).
  BilinearPooling wide(
      BilinearPoolingOptions(2).normalization(BilinearNormalization().sqrt_eps(1e-2)));
  EXPECT_GRADCHECK([&] { return wide(x); }, {x});
}

TEST(BilinearPooling, MatrixSqrtSquaresBackToPhi) {
  torch::manual_seed(5);
  // H*W = 12 >= C = 3: Phi has full rank, so Newton-Schulz converges fast.
  const auto x = torch::randn({2, 3, 3, 4}, torch::kDouble);
  BilinearPooling pool(BilinearPoolingOptions(3).matrix_sqrt(20).normalization(no_normalization()));
  const auto result = pool->forward_with_maps(x);
  const auto phi = result.maps.at("bilinear");
  const auto root = result.maps.at("matrix_sqrt");
  EXPECT_LT((torch::bmm(root, root) - phi).abs().max().item<double>(), 1e-10);
  EXPECT_TRUE(torch::allclose(result.output, root.reshape({2, 9}), 0, 0));
  // matrix_sqrt = 0 leaves Phi alone and has no "matrix_sqrt" map.
  BilinearPooling off(BilinearPoolingOptions(3).normalization(no_normalization()));
  const auto plain = off->forward_with_maps(x);
  EXPECT_EQ(plain.maps.count("matrix_sqrt"), 0u);
  EXPECT_TRUE(torch::allclose(plain.output, phi.reshape({2, 9}), 0, 0));
}

TEST(BilinearPooling, ForwardWithMapsMatchesForward) {
  torch::manual_seed(6);
  const auto x = torch::randn({2, 4, 3, 3});
  BilinearPooling pool(BilinearPoolingOptions(4).matrix_sqrt(5));
  const auto result = pool->forward_with_maps(x);
  EXPECT_TRUE(torch::equal(result.output, pool(x)));
  EXPECT_EQ(result.maps.at("bilinear").sizes(), torch::IntArrayRef({2, 4, 4}));
  EXPECT_EQ(result.maps.at("matrix_sqrt").sizes(), torch::IntArrayRef({2, 4, 4}));
  EXPECT_EQ(result.output.scalar_type(), torch::kFloat);
}

TEST(BilinearPooling, Gradcheck) {
  torch::manual_seed(7);
  const auto x = torch::randn({2, 3, 2, 3}, torch::kDouble).requires_grad_();
  BilinearPooling plain(BilinearPoolingOptions(3));
  EXPECT_GRADCHECK([&] { return plain(x); }, {x});
  BilinearPooling msqrt(BilinearPoolingOptions(3).matrix_sqrt(5));
  EXPECT_GRADCHECK([&] { return msqrt(x); }, {x});
  BilinearPooling trace(BilinearPoolingOptions(3).matrix_sqrt(3).matrix_sqrt_norm("trace"));
  EXPECT_GRADCHECK([&] { return trace(x); }, {x});
  const auto b = torch::randn({2, 4, 2, 3}, torch::kDouble).requires_grad_();
  BilinearPooling two(BilinearPoolingOptions(3).channels_b(4));
  EXPECT_GRADCHECK([&] { return two(x, b); }, {x, b});
}

TEST(BilinearPooling, MacsAreTheBatchedProduct) {
  const int64_t n = 2, c = 8, h = 3, w = 5;
  const auto x = torch::randn({n, c, h, w});
  BilinearPooling pool{BilinearPoolingOptions(c)};
  const auto count = dynattn::count_macs([&] { pool(x); });
  EXPECT_EQ(count.macs, n * c * c * h * w);
  EXPECT_EQ(count.by_op.at("aten::bmm"), n * c * c * h * w);
  // Newton-Schulz adds 3n - 3 products of N*C^3 for n = 5 iterations.
  BilinearPooling msqrt(BilinearPoolingOptions(c).matrix_sqrt(5));
  EXPECT_EQ(dynattn::count_macs([&] { msqrt(x); }).macs, n * c * c * h * w + 12 * n * c * c * c);
}

TEST(BilinearPooling, WorksInsideAnyModuleWithOneArgument) {
  torch::nn::AnyModule any(BilinearPooling(BilinearPoolingOptions(2)));
  const auto out = any.forward(hand_input());
  EXPECT_EQ(out.sizes(), torch::IntArrayRef({1, 4}));
  EXPECT_TRUE(BilinearPooling(BilinearPoolingOptions(2))->parameters().empty());
}

TEST(BilinearPooling, Errors) {
  BilinearPooling pool(BilinearPoolingOptions(4));
  EXPECT_THAT(error_of([&] {
                pool(torch::zeros({2, 4, 3}));
              }),
              HasSubstr("BilinearPooling: expected a 4-D input [N,C,H,W] with C=4, got [2, 4, 3]"));
  EXPECT_THAT(
      error_of([&] {
        pool(torch::zeros({2, 5, 3, 3}));
      }),
      HasSubstr("BilinearPooling: expected a 4-D input [N,C,H,W] with C=4, got [2, 5, 3, 3]"));
  EXPECT_THAT(error_of([&] {
                pool(torch::zeros({2, 4, 3, 3}, torch::kInt));
              }),
              HasSubstr("BilinearPooling: expected a floating-point input"));
  EXPECT_THAT(error_of([&] {
                pool(torch::zeros({2, 4, 3, 3}), torch::zeros({2, 4, 3, 2}));
              }),
              HasSubstr("the two streams must have the same N, H and W, got [2, 4, 3, 3] and "
                        "[2, 4, 3, 2]"));
  EXPECT_THAT(error_of([&] {
                pool(torch::zeros({2, 4, 3, 3}), torch::zeros({2, 3, 3, 3}));
              }),
              HasSubstr("with C=4, got [2, 3, 3, 3]"));
  BilinearPooling two(BilinearPoolingOptions(4).channels_b(3));
  EXPECT_THAT(error_of([&] {
                two(torch::zeros({2, 4, 3, 3}));
              }),
              HasSubstr("forward(x) is the symmetric form and needs channels_b = channels"));
  BilinearPooling msqrt(BilinearPoolingOptions(4).matrix_sqrt(3));
  EXPECT_THAT(error_of([&] {
                msqrt(torch::zeros({1, 4, 2, 2}), torch::zeros({1, 4, 2, 2}));
              }),
              HasSubstr("matrix_sqrt needs the symmetric form forward(x)"));
  EXPECT_THAT(error_of([] { BilinearPooling(BilinearPoolingOptions(0)); }),
              HasSubstr("BilinearPooling: channels must be positive, got 0"));
  EXPECT_THAT(error_of([] { BilinearPooling(BilinearPoolingOptions(4).matrix_sqrt(-1)); }),
              HasSubstr("matrix_sqrt (Newton-Schulz iterations) must be >= 0, got -1"));
  EXPECT_THAT(error_of([] { BilinearPooling(BilinearPoolingOptions(4).matrix_sqrt_norm("l1")); }),
              HasSubstr("matrix_sqrt_norm must be 'frobenius' or 'trace', got 'l1'"));
  EXPECT_THAT(
      error_of([] { BilinearPooling(BilinearPoolingOptions(4).channels_b(3).matrix_sqrt(2)); }),
      HasSubstr("matrix_sqrt needs the symmetric form (channels_b = channels)"));
  EXPECT_THAT(error_of([] {
                BilinearPooling(
                    BilinearPoolingOptions(4).normalization(BilinearNormalization().sqrt_eps(0)));
              }),
              HasSubstr("BilinearPooling: sqrt_eps must be positive, got 0"));
  EXPECT_THAT(error_of([] {
                BilinearPooling(BilinearPoolingOptions(4).normalization(
                    BilinearNormalization().sqrt_form("plain")));
              }),
              HasSubstr("sqrt_form must be 'stable' or 'reference', got 'plain'"));
  EXPECT_THAT(error_of([] { signed_sqrt(torch::ones({2}), 1e-5, "plain"); }),
              HasSubstr("signed_sqrt: form must be 'stable' or 'reference'"));
  EXPECT_THAT(error_of([] { signed_sqrt(torch::ones({2}), -1.0); }),
              HasSubstr("signed_sqrt: eps must be positive, got -1"));
}
