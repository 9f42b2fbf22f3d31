#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>

#include "dynattn/reparam/fold_batch_norm.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {
// BN with non-trivial statistics and affine parameters, in eval mode.
torch::nn::BatchNorm2d random_bn(int64_t channels, double eps, bool affine) {
  torch::nn::BatchNorm2d bn(torch::nn::BatchNorm2dOptions(channels).eps(eps).affine(affine));
  torch::NoGradGuard no_grad;
  bn->running_mean.normal_(0.0, 0.5);
  bn->running_var.uniform_(0.1, 3.0);
  if (affine) {
    bn->weight.normal_(1.0, 0.5);
    bn->bias.normal_(0.0, 0.5);
  }
  bn->eval();
  return bn;
}
}  // namespace

// The ncnn-style sweep: random shapes, groups (depthwise included), strides, dilations, padding,
// with and without conv bias and BN affine; fused == unfused relative to the output scale.
TEST(FoldBatchNorm, FusedEqualsUnfusedOverRandomConfigurations) {
  std::mt19937 rng(7);
  auto pick = [&](std::vector<int64_t> v) { return v[rng() % v.size()]; };
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t groups = pick({1, 1, 2, 4});
    const bool depthwise = trial % 7 == 0;
    const int64_t cin = depthwise ? pick({4, 8}) : groups * pick({1, 3, 4});
    const int64_t cout = depthwise ? cin : groups * pick({1, 2, 5});
    const int64_t k = pick({1, 3, 5});
    torch::nn::Conv2d conv(torch::nn::Conv2dOptions(cin, cout, k)
                               .stride(pick({1, 2}))
                               .padding(pick({0, 1, 2}))
                               .dilation(pick({1, 2}))
                               .groups(depthwise ? cin : groups)
                               .bias(trial % 2 == 0));
    auto bn = random_bn(cout, pick({1, 1000}) * 1e-5, trial % 3 != 0);
    conv->eval();
    const auto x = torch::randn({2, cin, 11, 9});
    torch::NoGradGuard no_grad;
    const auto expected = bn(conv(x));
    auto fused = fold_conv_bn(*conv, *bn, "test");
    const auto actual = fused(x);
    const double tol = 1e-5 * std::max(1.0, expected.abs().max().item<double>());
    EXPECT_LE((actual - expected).abs().max().item<double>(), tol) << "trial " << trial;
    EXPECT_TRUE(fused->options.bias());
  }
}

TEST(FoldBatchNorm, ChannelsLastWeightsStayChannelsLast) {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(8, 8, 3).padding(1).bias(false));
  conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));
  auto bn = random_bn(8, 1e-5, true);
  auto fused = fold_conv_bn(*conv, *bn, "cl");
  EXPECT_TRUE(fused->weight.is_contiguous(torch::MemoryFormat::ChannelsLast));
  const auto x = torch::randn({1, 8, 6, 6}).contiguous(torch::MemoryFormat::ChannelsLast);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(fused(x), bn(conv(x)), 1e-5, 1e-5));
}

TEST(FoldBatchNorm, ThreeDimensionalWeightsFoldByTheFirstDimension) {
  // fold_batch_norm works on any conv rank: 1-D here.
  auto w = torch::randn({4, 2, 3});
  auto mean = torch::randn({4}), var = torch::rand({4}) + 0.5;
  auto gamma = torch::randn({4}), beta = torch::randn({4});
  const auto f = fold_batch_norm(w, torch::Tensor(), mean, var, gamma, beta, 1e-5, "1d");
  const auto x = torch::randn({2, 2, 10});
  const auto expected =
      torch::batch_norm(torch::conv1d(x, w), gamma, beta, mean, var, false, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(torch::conv1d(x, f.weight, f.bias), expected, 1e-5, 1e-5));
}

TEST(FoldBatchNorm, RefusesTrainingModeMissingStatisticsAndMismatches) {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3));
  torch::nn::BatchNorm2d training(4);
  EXPECT_THAT(error_of([&] { fold_conv_bn(*conv, *training, "layer1.0.bn1"); }),
              HasSubstr("layer1.0.bn1: the BatchNorm is in training mode"));
  torch::nn::BatchNorm2d no_stats(torch::nn::BatchNorm2dOptions(4).track_running_stats(false));
  no_stats->eval();
  EXPECT_THAT(error_of([&] { fold_conv_bn(*conv, *no_stats, "b"); }),
              HasSubstr("no running statistics"));
  auto wrong = random_bn(5, 1e-5, true);
  EXPECT_THAT(error_of([&] { fold_conv_bn(*conv, *wrong, "c"); }),
              HasSubstr("c: the convolution has 4 output channels but the BatchNorm 5"));
}
