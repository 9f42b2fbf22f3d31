// Peak memory through the allocator's profiler hook: known allocation sizes show up, the peak
// is the highest sum of live blocks (not the sum of all), and measurements nest.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/models/registry.h"
#include "dynattn/profile/peak_memory.h"

using namespace dynattn;

namespace {
constexpr int64_t kMiB = 1 << 20;
}  // namespace

TEST(PeakMemory, AKnownAllocationShowsUp) {
  const auto r = measure_peak_memory([] {
    auto t = torch::empty({kMiB}, torch::kFloat);  // 4 MiB
    t.fill_(1.0f);
  });
  EXPECT_GE(r.peak_bytes, 4 * kMiB);
  EXPECT_LT(r.peak_bytes, 4 * kMiB + 64 * 1024) << "nothing else of size is allocated";
  EXPECT_GE(r.total_bytes, 4 * kMiB);
  EXPECT_GE(r.allocations, 1);
  EXPECT_EQ(r.end_bytes, 0) << "the tensor was freed inside fn";
}

TEST(PeakMemory, PeakIsTheHighestSumOfLiveBlocks) {
  // Two blocks alive together: 4 + 8 MiB; then one after the other: at most 8 MiB live.
  const auto together = measure_peak_memory([] {
    auto a = torch::empty({kMiB}, torch::kFloat);
    auto b = torch::empty({2 * kMiB}, torch::kFloat);
  });
  const auto apart = measure_peak_memory([] {
    { auto a = torch::empty({kMiB}, torch::kFloat); }
    { auto b = torch::empty({2 * kMiB}, torch::kFloat); }
  });
  EXPECT_GE(together.peak_bytes, 12 * kMiB);
  EXPECT_GE(apart.peak_bytes, 8 * kMiB);
  EXPECT_LT(apart.peak_bytes, 12 * kMiB);
  EXPECT_GE(apart.total_bytes, 12 * kMiB) << "both allocations are counted in the total";
}

TEST(PeakMemory, BlocksThatOutliveFnAreReportedAtTheEnd) {
  torch::Tensor kept;
  const auto r = measure_peak_memory([&] { kept = torch::empty({kMiB}, torch::kFloat); });
  EXPECT_GE(r.end_bytes, 4 * kMiB);
  EXPECT_EQ(r.end_bytes, r.peak_bytes);
}

TEST(PeakMemory, MeasurementsNest) {
  PeakMemory inner;
  const auto outer = measure_peak_memory([&] {
    auto a = torch::empty({kMiB}, torch::kFloat);
    inner = measure_peak_memory([] { auto b = torch::empty({2 * kMiB}, torch::kFloat); });
  });
  EXPECT_GE(inner.peak_bytes, 8 * kMiB);
  EXPECT_LT(inner.peak_bytes, 12 * kMiB);
  EXPECT_GE(outer.peak_bytes, 12 * kMiB) << "the outer measurement sees the inner allocations";
}

TEST(PeakMemory, ALargerBatchNeedsMoreMemoryForAForwardPass) {
  torch::NoGradGuard no_grad;
  auto model = create_model("resnet20:width=8");
  model.ptr()->eval();
  auto peak = [&](int64_t batch) {
    const auto x = torch::randn({batch, 1, 28, 28});
    return measure_peak_memory([&] { model.forward(x); }).peak_bytes;
  };
  peak(1);  // warm-up (one-time buffers)
  const int64_t one = peak(1), eight = peak(8);
  // At least the first 8-channel 28x28 activation of each image.
  EXPECT_GE(one, 8 * 28 * 28 * 4);
  EXPECT_GT(eight, one);
}
