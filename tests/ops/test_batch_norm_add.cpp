#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/ops/batch_norm_add.h"
#include "dynattn/ops/conv2d.h"
#include "kernel_policy.h"
#include "test_util.h"

using dynattn::batch_norm_add;
using dynattn::batch_norm_add_applicable;
using dynattn::test_util::error_of;
using dynattn::test_util::max_rel;
using testing::HasSubstr;

TEST(BatchNormAdd, MatchesBatchNormPlusAddInDoubleWithGradientsAndRunningStatistics) {
  torch::manual_seed(21);
  // A mean far from zero: the centred second pass keeps the variance exact.
  const std::vector<std::vector<int64_t>> shapes = {{4, 3, 37}, {3, 5, 7, 6}, {2, 4, 3, 4, 5}};
  for (const auto& shape : shapes) {
    SCOPED_TRACE(std::to_string(shape.size() - 2) + "-D");
    const int64_t c = shape[1];
    auto z = (torch::randn(shape) * 3 + 50).requires_grad_();
    auto residual = torch::randn(shape).requires_grad_();
    auto weight = torch::randn({c}).requires_grad_();
    auto bias = torch::randn({c}).requires_grad_();
    auto running_mean = torch::randn({c}), running_var = torch::rand({c}) + 0.5;
    auto mean64 = running_mean.to(torch::kDouble), var64 = running_var.to(torch::kDouble);
    const auto out =
        batch_norm_add(z, residual, weight, bias, running_mean, running_var, 0.1, 1e-5);
    const auto w = torch::randn_like(out);
    (out * w).sum().backward();

    auto z64 = z.detach().to(torch::kDouble).requires_grad_();
    auto r64 = residual.detach().to(torch::kDouble).requires_grad_();
    auto weight64 = weight.detach().to(torch::kDouble).requires_grad_();
    auto bias64 = bias.detach().to(torch::kDouble).requires_grad_();
    const auto want =
        torch::batch_norm(z64, weight64, bias64, mean64, var64, true, 0.1, 1e-5, false) + r64;
    (want * w.to(torch::kDouble)).sum().backward();
    EXPECT_LE(max_rel(out, want), 1e-5);
    EXPECT_LE(max_rel(z.grad(), z64.grad()), 1e-5);
    EXPECT_LE(max_rel(residual.grad(), r64.grad()), 1e-6);
    EXPECT_LE(max_rel(weight.grad(), weight64.grad()), 1e-5);
    EXPECT_LE(max_rel(bias.grad(), bias64.grad()), 1e-5);
    EXPECT_LE(max_rel(running_mean, mean64), 1e-6);
    EXPECT_LE(max_rel(running_var, var64), 1e-5);
  }
}

TEST(BatchNormAdd, WithoutRunningStatistics) {
  torch::manual_seed(22);
  const auto z = torch::randn({3, 2, 5}), residual = torch::randn({3, 2, 5});
  const auto weight = torch::rand({2}), bias = torch::randn({2});
  const auto out =
      batch_norm_add(z, residual, weight, bias, torch::Tensor(), torch::Tensor(), 0.1, 1e-3);
  const auto want =
      torch::batch_norm(z, weight, bias, torch::Tensor(), torch::Tensor(), true, 0.1, 1e-3, false) +
      residual;
  EXPECT_LE(max_rel(out, want), 1e-5);
}

TEST(BatchNormAdd, ApplicabilityAndBadArguments) {
  const auto z = torch::zeros({2, 3, 4});
  EXPECT_FALSE(batch_norm_add_applicable(z.to(torch::kDouble), z));
  EXPECT_FALSE(batch_norm_add_applicable(z, torch::zeros({2, 3, 5})));
  EXPECT_FALSE(batch_norm_add_applicable(z.transpose(1, 2), z.transpose(1, 2)));
  {
    const auto previous = dynattn::kernel_policy();
    dynattn::testing::set_dynattn_kernels(false);
    EXPECT_FALSE(batch_norm_add_applicable(z, z));
    dynattn::set_kernel_policy(previous);
  }
  EXPECT_THAT(error_of([&] {
                batch_norm_add(z, torch::zeros({2, 3, 5}), torch::ones({3}), torch::zeros({3}),
                               torch::Tensor(), torch::Tensor(), 0.1, 1e-5);
              }),
              HasSubstr("of one shape (and the dynattn kernel policy on), got [2, 3, 4] and "
                        "[2, 3, 5]"));
  EXPECT_THAT(error_of([&] {
                batch_norm_add(z, z, torch::ones({2}), torch::zeros({3}), torch::Tensor(),
                               torch::Tensor(), 0.1, 1e-5);
              }),
              HasSubstr("expected float weight and bias of 3 channels"));
  EXPECT_THAT(error_of([&] {
                batch_norm_add(z, z, torch::ones({3}), torch::zeros({3}), torch::zeros({2}),
                               torch::ones({2}), 0.1, 1e-5);
              }),
              HasSubstr("expected running statistics of 3 channels"));
}
