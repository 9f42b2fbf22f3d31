#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <thread>

#include "dynattn/profile/benchmark.h"

namespace dynattn {
namespace {

TEST(TimeCallable, RespectsMinItersAndWarmup) {
  int calls = 0;
  const TimingStats s = time_callable([&] { ++calls; }, /*warmup=*/3, /*min_iters=*/17,
                                      /*min_seconds=*/0.0);
  EXPECT_EQ(s.iterations, 17);
  EXPECT_EQ(calls, 3 + 17);
  EXPECT_LE(s.min_ms, s.median_ms);
  EXPECT_LE(s.median_ms, s.p90_ms);
  EXPECT_GE(s.min_ms, 0.0);
}

TEST(TimeCallable, RunsUntilMinSeconds) {
  const auto start = std::chrono::steady_clock::now();
  const TimingStats s = time_callable([] {}, 0, 1, /*min_seconds=*/0.02);
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(elapsed, 0.02);
  EXPECT_GT(s.iterations, 1);
}

TEST(TimeCallable, SleepStatsAreSane) {
  const TimingStats s =
      time_callable([] { std::this_thread::sleep_for(std::chrono::milliseconds(1)); }, 1, 10, 0.0);
  EXPECT_EQ(s.iterations, 10);
  EXPECT_GE(s.min_ms, 1.0);
  EXPECT_GE(s.median_ms, 1.0);
  EXPECT_GE(s.mean_ms, s.min_ms);
  EXPECT_LE(s.median_ms, s.p90_ms);
}

TEST(TimeCallable, RejectsBadArguments) {
  auto noop = [] {};
  EXPECT_THROW(time_callable(noop, -1, 1, 0), c10::Error);
  EXPECT_THROW(time_callable(noop, 0, 0, 0), c10::Error);
  EXPECT_THROW(time_callable(noop, 0, 1, -1), c10::Error);
  EXPECT_THROW(time_callable(std::function<void()>(), 0, 1, 0), c10::Error);
}

TEST(Synchronize, CpuIsANoOp) {
  EXPECT_NO_THROW(synchronize(torch::kCPU));
}

TEST(Throughput, MatmulAndConvArePositive) {
  const int threads = torch::get_num_threads();
  EXPECT_GT(measure_matmul_gflops(64), 0.0);
  EXPECT_GT(measure_matmul_gflops(64, /*threads_hint=*/1), 0.0);
  EXPECT_EQ(torch::get_num_threads(), threads) << "the thread hint must be restored";
  EXPECT_THROW(measure_matmul_gflops(0), c10::Error);
  EXPECT_THROW(measure_matmul_gflops(8, -1), c10::Error);
  EXPECT_GT(measure_conv_peak_gflops(1), 0.0);
  EXPECT_EQ(torch::get_num_threads(), threads) << "the thread hint must be restored";
}

}  // namespace
}  // namespace dynattn
