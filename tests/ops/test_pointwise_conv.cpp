#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/pointwise_conv.h"
#include "dynattn/profile/mac_counter.h"
#include "kernel_policy.h"
#include "test_util.h"

using dynattn::pointwise_conv;
using dynattn::pointwise_conv_applicable;
using dynattn::test_util::error_of;
using dynattn::test_util::max_rel;
using testing::HasSubstr;

namespace {

bool applies() {
  return pointwise_conv_applicable(torch::zeros({1, 1, 1}), torch::zeros({1, 1, 1}));
}

torch::Tensor aten_conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const auto spatial = x.dim() - 2;
  const std::vector<int64_t> ones(spatial, 1), zeros(spatial, 0);
  return at::convolution(x, w, b, ones, zeros, ones, false, zeros, 1);
}

}  // namespace

TEST(PointwiseConv, MatchesAtenConvolutionInDoubleWithGradients) {
  if (!applies()) GTEST_SKIP() << "built without the oneDNN library";
  torch::manual_seed(5);
  const std::vector<std::vector<int64_t>> shapes = {{3, 4, 9}, {2, 5, 7, 6}, {2, 3, 3, 4, 5}};
  for (const auto& shape : shapes) {
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(std::to_string(shape.size() - 2) + "-D" + (with_bias ? " with bias" : ""));
      std::vector<int64_t> w_shape(shape.size(), 1);
      w_shape[0] = 6;
      w_shape[1] = shape[1];
      auto x = torch::randn(shape).requires_grad_();
      auto w = torch::randn(w_shape).requires_grad_();
      auto b = with_bias ? torch::randn({6}).requires_grad_() : torch::Tensor();
      const auto y = pointwise_conv(x, w, b);
      const auto weights = torch::randn_like(y);
      (y * weights).sum().backward();

      auto x64 = x.detach().to(torch::kDouble).requires_grad_();
      auto w64 = w.detach().to(torch::kDouble).requires_grad_();
      auto b64 = with_bias ? b.detach().to(torch::kDouble).requires_grad_() : torch::Tensor();
      const auto want = aten_conv(x64, w64, b64);
      (want * weights.to(torch::kDouble)).sum().backward();
      EXPECT_LE(max_rel(y, want), 1e-5);
      EXPECT_LE(max_rel(x.grad(), x64.grad()), 1e-5);
      EXPECT_LE(max_rel(w.grad(), w64.grad()), 1e-5);
      if (with_bias) EXPECT_LE(max_rel(b.grad(), b64.grad()), 1e-5);
    }
  }
}

TEST(PointwiseConv, ChannelsLastInputAndPartialGradients) {
  if (!applies()) GTEST_SKIP() << "built without the oneDNN library";
  torch::manual_seed(7);
  const auto x = torch::randn({2, 8, 5, 3}).contiguous(torch::MemoryFormat::ChannelsLast);
  auto w = torch::randn({4, 8, 1, 1}).requires_grad_();
  const auto b = torch::randn({4});
  const auto y = pointwise_conv(x, w, b);
  EXPECT_LE(max_rel(y, aten_conv(x, w.detach(), b)), 1e-5);
  y.sum().backward();  // only the weight asks for a gradient
  auto w_ref = w.detach().clone().requires_grad_();
  aten_conv(x, w_ref, b).sum().backward();
  EXPECT_LE(max_rel(w.grad(), w_ref.grad()), 1e-5);
}

TEST(PointwiseConv, CountsItsMacs) {
  if (!applies()) GTEST_SKIP() << "built without the oneDNN library";
  const auto count = dynattn::count_macs([] {
    pointwise_conv(torch::randn({2, 3, 4, 5}), torch::randn({7, 3, 1, 1}), torch::Tensor());
  });
  EXPECT_EQ(count.macs, 2 * 7 * 3 * 4 * 5);
  EXPECT_EQ(count.calls.at("dynattn::pointwise_conv"), 1);
}

TEST(PointwiseConv, ApplicabilityAndBadShapes) {
  const auto x = torch::zeros({1, 2, 3}), w = torch::zeros({4, 2, 1});
  EXPECT_FALSE(pointwise_conv_applicable(x.to(torch::kDouble), w));
  EXPECT_FALSE(pointwise_conv_applicable(torch::zeros({0, 2, 3}), w));
  {
    const auto previous = dynattn::kernel_policy();
    dynattn::testing::set_dynattn_kernels(false);
    EXPECT_FALSE(pointwise_conv_applicable(x, w));
    dynattn::set_kernel_policy(previous);
  }
  EXPECT_THAT(
      error_of([] {
        pointwise_conv(torch::zeros({1, 2, 3, 3}), torch::zeros({4, 2, 3, 3}), torch::Tensor());
      }),
      HasSubstr("expected x [N, C_in, ...] and weight [C_out, C_in, 1, ...] of the same "
                "rank, got [1, 2, 3, 3] and [4, 2, 3, 3]"));
  EXPECT_THAT(error_of([] {
                pointwise_conv(torch::zeros({1, 2, 3}), torch::zeros({4, 2, 1}), torch::zeros({3}));
              }),
              HasSubstr("expected bias [4], got [3]"));
  EXPECT_THAT(error_of([] {
                pointwise_conv(torch::zeros({1, 2, 3}, torch::kDouble), torch::zeros({4, 2, 1}),
                               torch::Tensor());
              }),
              HasSubstr("pointwise_conv: expected non-empty float CPU tensors"));
}
