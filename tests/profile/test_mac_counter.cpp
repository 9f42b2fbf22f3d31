#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/record_function.h>

#include <thread>

#include "dynattn/core/compat.h"
#include "dynattn/profile/mac_counter.h"

namespace dynattn {
namespace {

namespace nn = torch::nn;

TEST(MacCounter, Conv2dGroupedStridedWithAndWithoutBias) {
  // 8 -> 16 channels, 3x3, stride 2, groups 2 on 10x10: output [2,16,5,5] = 800 values,
  // each 8/2 * 3*3 = 36 MACs. The bias is an addition, not a MAC.
  for (const bool bias : {true, false}) {
    nn::Conv2d conv(nn::Conv2dOptions(8, 16, 3).stride(2).padding(1).groups(2).bias(bias));
    const auto x = torch::randn({2, 8, 10, 10});
    const MacCount c = count_macs([&] { conv(x); });
    EXPECT_EQ(c.macs, 800 * 36) << "bias=" << bias;
    EXPECT_EQ(c.by_op.at("aten::convolution"), 800 * 36);
    EXPECT_EQ(c.calls.at("aten::convolution"), 1);
    EXPECT_EQ(c.by_op.size(), 1u) << "nested conv ops must not be counted again";
  }
}

TEST(MacCounter, DepthwiseConv) {
  nn::Conv2d conv(nn::Conv2dOptions(6, 6, 3).padding(1).groups(6));
  const auto x = torch::randn({1, 6, 8, 8});
  EXPECT_EQ(count_macs([&] { conv(x); }).macs, 6 * 8 * 8 * 9);
}

TEST(MacCounter, PaddingSameCountsLikeExplicitPadding) {
  nn::Conv2d same(nn::Conv2dOptions(4, 8, 3).padding(torch::kSame));
  nn::Conv2d explicit_pad(nn::Conv2dOptions(4, 8, 3).padding(1));
  const auto x = torch::randn({1, 4, 7, 7});
  EXPECT_EQ(count_macs([&] { same(x); }).macs, 8 * 7 * 7 * 4 * 9);
  EXPECT_EQ(count_macs([&] { explicit_pad(x); }).macs, 8 * 7 * 7 * 4 * 9);
}

TEST(MacCounter, Conv1dGrouped) {
  // [1,4,9] * [6,2,3], groups 2: output [1,6,7] = 42 values of 2*3 MACs.
  nn::Conv1d conv(nn::Conv1dOptions(4, 6, 3).groups(2));
  const auto x = torch::randn({1, 4, 9});
  EXPECT_EQ(count_macs([&] { conv(x); }).macs, 42 * 6);
}

TEST(MacCounter, TransposedConv) {
  // Every input value is scattered onto Cout/groups * k*k = 4*9 outputs.
  nn::ConvTranspose2d conv(nn::ConvTranspose2dOptions(8, 4, 3).stride(2));
  const auto x = torch::randn({2, 8, 10, 10});
  const MacCount c = count_macs([&] { conv(x); });
  EXPECT_EQ(c.macs, 2 * 8 * 10 * 10 * 4 * 9);
  EXPECT_EQ(c.calls.at("aten::convolution"), 1);
}

TEST(MacCounter, LinearWithAndWithoutBias) {
  // With a bias, linear is one addmm; without, matmul -> mm: 5*8*4 MACs either way.
  nn::Linear with_bias(8, 4);
  nn::Linear no_bias(nn::LinearOptions(8, 4).bias(false));
  const auto x = torch::randn({5, 8});
  const MacCount a = count_macs([&] { with_bias(x); });
  const MacCount b = count_macs([&] { no_bias(x); });
  EXPECT_EQ(a.macs, 5 * 8 * 4);
  EXPECT_EQ(b.macs, 5 * 8 * 4);
  EXPECT_EQ(a.by_op.size(), 1u);
  EXPECT_EQ(b.by_op.size(), 1u);
  // 3-D input: matmul folds the batch into one mm (plus an add_ for the bias).
  const auto x3 = torch::randn({3, 5, 8});
  EXPECT_EQ(count_macs([&] { with_bias(x3); }).macs, 3 * 5 * 8 * 4);
  EXPECT_EQ(count_macs([&] { no_bias(x3); }).macs, 3 * 5 * 8 * 4);
}

TEST(MacCounter, MatmulBmmMvDot) {
  const auto a = torch::randn({3, 5, 8});
  const auto b = torch::randn({3, 8, 4});
  const MacCount mm3 = count_macs([&] { torch::matmul(a, b); });
  EXPECT_EQ(mm3.macs, 3 * 5 * 8 * 4);
  EXPECT_EQ(mm3.calls.at("aten::bmm"), 1);
  EXPECT_EQ(count_macs([&] { torch::bmm(a, b); }).macs, 3 * 5 * 8 * 4);
  EXPECT_EQ(count_macs([&] { torch::matmul(a, torch::randn({8, 4})); }).macs, 3 * 5 * 8 * 4);
  EXPECT_EQ(count_macs([&] { torch::baddbmm(torch::zeros({3, 5, 4}), a, b); }).macs, 480);
  EXPECT_EQ(count_macs([&] { torch::addbmm(torch::zeros({5, 4}), a, b); }).macs, 480);
  // mv calls addmv_ inside: counted once.
  const MacCount mv = count_macs([&] { torch::matmul(torch::randn({3, 8}), torch::randn({8})); });
  EXPECT_EQ(mv.macs, 3 * 8);
  EXPECT_EQ(mv.by_op.size(), 1u);
  EXPECT_EQ(count_macs([&] { torch::matmul(torch::randn({8}), torch::randn({8})); }).macs, 8);
  EXPECT_EQ(count_macs([&] { torch::einsum("bij,bjk->bik", {a, b}); }).macs, 480);
}

TEST(MacCounter, ElementwiseOpsCostNothing) {
  const auto x = torch::randn({4, 16, 8, 8});
  EXPECT_EQ(count_macs([&] { torch::relu(x * 2 + 1).mean({2, 3}).sigmoid(); }).macs, 0);
}

int64_t maybe_run(nn::Conv2d& conv, const torch::Tensor& x, bool run) {
  return count_macs([&] {
           if (run) conv(x);
         })
      .macs;
}

TEST(MacCounter, SkippedBranchCostsNothing) {
  nn::Conv2d conv(nn::Conv2dOptions(4, 4, 3).padding(1));
  const auto x = torch::randn({1, 4, 6, 6});
  EXPECT_EQ(maybe_run(conv, x, false), 0);
  EXPECT_EQ(maybe_run(conv, x, true), 4 * 6 * 6 * 4 * 9);
}

TEST(MacCounter, NestedCountersBothCount) {
  const auto a = torch::randn({4, 8});
  const auto b = torch::randn({8, 2});
  InferenceGuard no_grad;
  MacCounter outer;
  torch::mm(a, b);  // 64
  {
    MacCounter inner;
    torch::mm(a, b);
    torch::mm(a, b);
    EXPECT_EQ(inner.macs(), 128);
    EXPECT_EQ(inner.count().calls.at("aten::mm"), 2);
  }
  torch::mm(a, b);
  EXPECT_EQ(outer.macs(), 4 * 64);
  EXPECT_EQ(outer.count().calls.at("aten::mm"), 4);
  outer.reset();
  EXPECT_EQ(outer.macs(), 0);
  EXPECT_TRUE(outer.count().by_op.empty());
  torch::mm(a, b);
  EXPECT_EQ(outer.macs(), 64);
}

TEST(MacCounter, DestroyedCounterStopsCountingAndUnregisters) {
  const auto a = torch::randn({4, 8});
  const auto b = torch::randn({8, 2});
  const bool had_callbacks = at::hasThreadLocalCallbacks();
  int64_t seen = 0;
  {
    MacCounter counter;
    EXPECT_TRUE(at::hasThreadLocalCallbacks());
    torch::mm(a, b);
    seen = counter.macs();
  }
  EXPECT_EQ(seen, 64);
  EXPECT_EQ(at::hasThreadLocalCallbacks(), had_callbacks);
  // A new counter starts from zero and sees only what runs after it.
  torch::mm(a, b);
  MacCounter later;
  EXPECT_EQ(later.macs(), 0);
  torch::mm(a, b);
  EXPECT_EQ(later.macs(), 64);
}

TEST(MacCounter, OtherThreadsAreNotCounted) {
  const auto a = torch::randn({4, 8});
  const auto b = torch::randn({8, 2});
  MacCounter counter;
  int64_t worker_own = -1;
  std::thread worker([&] {
    torch::mm(a, b);  // not ours
    MacCounter own;   // a counter of the worker sees the worker's ops only
    torch::mm(a, b);
    torch::mm(a, b);
    worker_own = own.macs();
  });
  worker.join();
  EXPECT_EQ(counter.macs(), 0);
  EXPECT_EQ(worker_own, 128);
  torch::mm(a, b);
  EXPECT_EQ(counter.macs(), 64);
}

TEST(MacCounter, SameCountWithGradInferenceModeAndNoGrad) {
  nn::Sequential net(nn::Conv2d(nn::Conv2dOptions(3, 8, 3).padding(1)), nn::ReLU(),
                     nn::Conv2d(nn::Conv2dOptions(8, 8, 3).stride(2).groups(4)), nn::Flatten(),
                     nn::Linear(8 * 3 * 3, 10));
  const auto x = torch::randn({2, 3, 8, 8});
  const int64_t expected = 2 * 8 * 8 * 8 * 3 * 9 + 2 * 8 * 3 * 3 * 2 * 9 + 2 * 72 * 10;
  EXPECT_EQ(count_macs([&] { net->forward(x); }).macs, expected);
  {
    torch::NoGradGuard no_grad;
    MacCounter counter;
    net->forward(x);
    EXPECT_EQ(counter.macs(), expected);
  }
  {
    ASSERT_TRUE(torch::GradMode::is_enabled());
    MacCounter counter;
    net->forward(x);
    EXPECT_EQ(counter.macs(), expected);
  }
}

TEST(MacCounter, BackwardIsNotCounted) {
  nn::Sequential net(nn::Conv2d(nn::Conv2dOptions(3, 4, 3)), nn::Flatten(),
                     nn::Linear(4 * 4 * 4, 5));
  const auto x = torch::randn({2, 3, 6, 6});
  const int64_t forward = 2 * 4 * 4 * 4 * 3 * 9 + 2 * 64 * 5;
  MacCounter counter;
  auto loss = net->forward(x).pow(2).sum();
  EXPECT_EQ(counter.macs(), forward);
  loss.backward();
  EXPECT_EQ(counter.macs(), forward);
  EXPECT_TRUE(net->parameters()[0].grad().defined());
  // The next forward is counted again after a backward pass.
  net->forward(x);
  EXPECT_EQ(counter.macs(), 2 * forward);
}

TEST(MacCounter, CountMacsRunsInInferenceMode) {
  bool inference = false;
  count_macs([&] { inference = c10::InferenceMode::is_enabled(); });
  EXPECT_TRUE(inference);
}

TEST(CountParameters, CountsAllParametersOnce) {
  nn::Conv2d conv(nn::Conv2dOptions(8, 16, 3));
  EXPECT_EQ(count_parameters(*conv), 16 * 8 * 9 + 16);
  nn::Linear shared(4, 3);
  nn::Sequential net(shared, nn::BatchNorm1d(3), shared);
  for (auto& p : net->parameters()) p.set_requires_grad(false);  // frozen still counts
  // Linear 4*3+3 once (shared), BatchNorm weight+bias 3+3; running stats are buffers.
  EXPECT_EQ(count_parameters(*net), 15 + 6);
}

}  // namespace
}  // namespace dynattn
