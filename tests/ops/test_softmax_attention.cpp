#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/softmax_attention.h"
#include "dynattn/profile/mac_counter.h"
#include "kernel_policy.h"
#include "test_util.h"

using dynattn::softmax_attention;
using dynattn::softmax_attention_applicable;
using dynattn::test_util::error_of;
using dynattn::test_util::max_rel;
using testing::HasSubstr;

namespace {

bool applies() {
  const auto t = torch::zeros({1, 1, 1});
  return softmax_attention_applicable(t, t, t);
}

// The op's maths with ATen's operators.
torch::Tensor reference(const torch::Tensor& theta, const torch::Tensor& phi,
                        const torch::Tensor& g) {
  return torch::bmm(g, torch::softmax(torch::bmm(theta.transpose(1, 2), phi), 2).transpose(1, 2));
}

}  // namespace

TEST(SoftmaxAttention, MatchesAtenInDoubleWithGradients) {
  if (!applies()) GTEST_SKIP() << "no attention kernel in this build";
  torch::manual_seed(4);
  struct Shape {
    int64_t n, d, q, k, dv;
  };
  // Tails in every loop of the kernel (16 queries, 8 keys or rows, 4 x 4 tiles and the 16 x 1,
  // 8 x 2 and 5 x 3 edge tiles of 1, 2 or 3 last keys); the last shape has phi and g too large
  // for the kernel (oneDNN's GEMMs where built with it).
  for (const auto& s : std::vector<Shape>{{2, 4, 16, 4, 4},
                                          {3, 16, 49, 13, 8},
                                          {1, 5, 7, 7, 3},
                                          {2, 9, 33, 17, 10},
                                          {2, 6, 18, 10, 5},
                                          {1, 8, 20, 4500, 8}}) {
    SCOPED_TRACE(std::to_string(s.n) + "x" + std::to_string(s.d) + "x" + std::to_string(s.q));
    auto theta = torch::randn({s.n, s.d, s.q}).requires_grad_();
    auto phi = torch::randn({s.n, s.d, s.k}).requires_grad_();
    auto g = torch::randn({s.n, s.dv, s.k}).requires_grad_();
    const auto y = softmax_attention(theta, phi, g);
    const auto w = torch::randn_like(y);
    (y * w).sum().backward();

    auto theta64 = theta.detach().to(torch::kDouble).requires_grad_();
    auto phi64 = phi.detach().to(torch::kDouble).requires_grad_();
    auto g64 = g.detach().to(torch::kDouble).requires_grad_();
    const auto want = reference(theta64, phi64, g64);
    (want * w.to(torch::kDouble)).sum().backward();

    EXPECT_LE(max_rel(y, want), 1e-5);
    EXPECT_LE(max_rel(theta.grad(), theta64.grad()), 1e-5);
    EXPECT_LE(max_rel(phi.grad(), phi64.grad()), 1e-5);
    EXPECT_LE(max_rel(g.grad(), g64.grad()), 1e-5);
  }
}

TEST(SoftmaxAttention, TransposedAndPartialInputs) {
  if (!applies()) GTEST_SKIP() << "no attention kernel in this build";
  torch::manual_seed(6);
  // Non-contiguous inputs are read correctly; only the inputs that need a gradient get one.
  const auto theta = torch::randn({2, 9, 4}).transpose(1, 2);  // [2, 4, 9]
  auto phi = torch::randn({2, 4, 5}).requires_grad_();
  const auto g = torch::randn({2, 5, 3}).transpose(1, 2);  // [2, 3, 5]
  const auto y = softmax_attention(theta, phi, g);
  EXPECT_LE(max_rel(y, reference(theta, phi, g)), 1e-5);
  y.sum().backward();
  ASSERT_TRUE(phi.grad().defined());
  auto phi_ref = phi.detach().clone().requires_grad_();
  reference(theta, phi_ref, g).sum().backward();
  EXPECT_LE(max_rel(phi.grad(), phi_ref.grad()), 1e-5);
}

TEST(SoftmaxAttention, CountsTheTwoProductsMacs) {
  if (!applies()) GTEST_SKIP() << "no attention kernel in this build";
  const auto theta = torch::randn({2, 4, 16}), phi = torch::randn({2, 4, 4}),
             g = torch::randn({2, 3, 4});
  const auto count = dynattn::count_macs([&] { softmax_attention(theta, phi, g); });
  // theta^T phi: 2 x 16 x 4 x 4; g A^T: 2 x 3 x 4 x 16.
  EXPECT_EQ(count.macs, 2 * 16 * 4 * 4 + 2 * 3 * 4 * 16);
  EXPECT_EQ(count.calls.at("dynattn::softmax_attention"), 1);
}

TEST(SoftmaxAttention, ScaleMultipliesTheLogits) {
  if (!applies()) GTEST_SKIP() << "no attention kernel in this build";
  torch::manual_seed(8);
  for (int64_t k : {11, 4500}) {  // the kernel, and the GEMM path (oneDNN) where built
    SCOPED_TRACE(k);
    auto theta = torch::randn({2, 8, 19}).requires_grad_();
    auto phi = torch::randn({2, 8, k}).requires_grad_();
    auto g = torch::randn({2, 8, k}).requires_grad_();
    const auto y = softmax_attention(theta, phi, g, 0.3);
    y.sum().backward();
    auto theta64 = theta.detach().to(torch::kDouble).requires_grad_();
    auto phi64 = phi.detach().to(torch::kDouble).requires_grad_();
    auto g64 = g.detach().to(torch::kDouble).requires_grad_();
    const auto want = reference(theta64 * 0.3, phi64, g64);
    want.sum().backward();
    EXPECT_LE(max_rel(y, want), 1e-5);
    EXPECT_LE(max_rel(theta.grad(), theta64.grad()), 1e-5);
    EXPECT_LE(max_rel(phi.grad(), phi64.grad()), 1e-5);
    EXPECT_LE(max_rel(g.grad(), g64.grad()), 1e-5);
  }
}

TEST(SoftmaxAttention, LargeLogitsAndNaNs) {
  if (!applies()) GTEST_SKIP() << "no attention kernel in this build";
  torch::manual_seed(10);
  // Logits in the thousands: exp would overflow without the row maximum taken out first.
  const auto theta = torch::randn({2, 4, 21}) * 40, phi = torch::randn({2, 4, 9}) * 40,
             g = torch::randn({2, 3, 9});
  const auto y = softmax_attention(theta, phi, g);
  EXPECT_LE(
      max_rel(y, reference(theta.to(torch::kDouble), phi.to(torch::kDouble), g.to(torch::kDouble))),
      1e-5);
  // A NaN key reaches every query of its image (as ATen's softmax), and no other image.
  auto phi_nan = phi.clone();
  phi_nan[1][2][5] = std::numeric_limits<float>::quiet_NaN();
  const auto y_nan = softmax_attention(theta, phi_nan, g);
  EXPECT_TRUE(torch::isnan(y_nan[1]).all().item<bool>());
  EXPECT_TRUE(torch::equal(y_nan[0], y[0]));
}

TEST(SoftmaxAttention, ApplicabilityAndBadShapes) {
  const auto t = torch::zeros({1, 2, 3});
  EXPECT_FALSE(softmax_attention_applicable(t.to(torch::kDouble), t, t));
  EXPECT_FALSE(softmax_attention_applicable(t, torch::zeros({1, 2}), t));
  EXPECT_FALSE(softmax_attention_applicable(torch::zeros({0, 2, 3}), t, t));
  {
    const auto previous = dynattn::kernel_policy();
    dynattn::testing::set_dynattn_kernels(false);
    EXPECT_FALSE(softmax_attention_applicable(t, t, t));
    dynattn::set_kernel_policy(previous);
  }
  EXPECT_THAT(error_of([] {
                softmax_attention(torch::randn({2, 4, 9}), torch::randn({2, 5, 3}),
                                  torch::randn({2, 3, 3}));
              }),
              HasSubstr("expected theta [N, D, Q], phi [N, D, K] and g [N, Dv, K], got [2, 4, 9]"));
  EXPECT_THAT(error_of([] {
                softmax_attention(torch::randn({2, 4, 9}, torch::kDouble), torch::randn({2, 4, 3}),
                                  torch::randn({2, 3, 3}));
              }),
              HasSubstr("softmax_attention: expected non-empty float CPU tensors"));
}
