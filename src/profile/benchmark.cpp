#include "dynattn/profile/benchmark.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "dynattn/core/compat.h"

namespace dynattn {
namespace {
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Restores the intra-op thread count on scope exit, so a measurement with a thread hint
// does not change the rest of the process.
class ThreadCountGuard {
 public:
  explicit ThreadCountGuard(int threads) : previous_(torch::get_num_threads()) {
    if (threads > 0) torch::set_num_threads(threads);
  }
  ~ThreadCountGuard() { torch::set_num_threads(previous_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int previous_;
};

// Best wall time in seconds of fn() over at least `min_runs` runs, stopping once
// `budget_seconds` of timed work is done or after `max_runs` runs.
double best_seconds(const std::function<void()>& fn, int min_runs, int max_runs,
                    double budget_seconds) {
  double best = std::numeric_limits<double>::infinity();
  double total = 0;
  for (int run = 0; run < max_runs && (run < min_runs || total < budget_seconds); ++run) {
    const auto start = Clock::now();
    fn();
    const double t = seconds_since(start);
    best = std::min(best, t);
    total += t;
  }
  return best;
}
}  // namespace

void synchronize(torch::Device device) {
  if (device.is_cuda() && torch::cuda::is_available()) {
    cuda_synchronize(device.has_index() ? device.index() : -1);
  }
}

TimingStats time_callable(const std::function<void()>& fn, int warmup, int min_iters,
                          double min_seconds, torch::Device sync_device) {
  TORCH_CHECK(fn, "time_callable: fn is empty");
  TORCH_CHECK(warmup >= 0, "time_callable: warmup must be >= 0, got ", warmup);
  TORCH_CHECK(min_iters >= 1, "time_callable: min_iters must be >= 1, got ", min_iters);
  TORCH_CHECK(std::isfinite(min_seconds) && min_seconds >= 0,
              "time_callable: min_seconds must be a finite number >= 0, got ", min_seconds);
  for (int i = 0; i < warmup; ++i) {
    fn();
    synchronize(sync_device);
  }
  std::vector<double> samples_ms;
  samples_ms.reserve(static_cast<size_t>(min_iters));
  double total_s = 0;
  while (static_cast<int64_t>(samples_ms.size()) < min_iters || total_s < min_seconds) {
    const auto start = Clock::now();
    fn();
    synchronize(sync_device);
    const double s = seconds_since(start);
    samples_ms.push_back(s * 1e3);
    total_s += s;
  }

  TimingStats stats;
  stats.iterations = static_cast<int64_t>(samples_ms.size());
  stats.mean_ms = std::accumulate(samples_ms.begin(), samples_ms.end(), 0.0) /
                  static_cast<double>(samples_ms.size());
  std::sort(samples_ms.begin(), samples_ms.end());
  const size_t n = samples_ms.size();
  stats.min_ms = samples_ms.front();
  stats.median_ms =
      n % 2 == 1 ? samples_ms[n / 2] : 0.5 * (samples_ms[n / 2 - 1] + samples_ms[n / 2]);
  // Nearest rank: the smallest sample with at least 90% of the samples at or below it.
  const size_t rank = static_cast<size_t>(std::ceil(0.9 * static_cast<double>(n)));
  stats.p90_ms = samples_ms[std::max<size_t>(rank, 1) - 1];
  return stats;
}

double measure_conv_peak_gflops(int threads_hint) {
  TORCH_CHECK(threads_hint >= 0, "measure_conv_peak_gflops: threads_hint must be >= 0 (0 = ",
              "keep the current count), got ", threads_hint);
  ThreadCountGuard threads(threads_hint);
  InferenceGuard no_grad;
  // A ResNet-stage-sized layer: large enough that oneDNN reaches its steady throughput,
  // small enough (~3.7 GMAC) to time a few runs in about a second on two cores.
  const int64_t n = 16, c = 64, hw = 56, k = 3;
  const double flops = 2.0 * static_cast<double>(n * c * hw * hw * c * k * k);
  const auto input = torch::randn({n, c, hw, hw});
  const auto weight = torch::randn({c, c, k, k}) * 0.05;
  double best = std::numeric_limits<double>::infinity();
  for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    const auto x = input.contiguous(format);
    const auto w = weight.contiguous(format);
    const std::vector<int64_t> stride{1, 1}, padding{1, 1};
    auto run = [&] { torch::conv2d(x, w, torch::Tensor(), stride, padding); };
    run();  // warm-up: oneDNN builds its primitive and reorders the weights on first use
    best = std::min(best, best_seconds(run, /*min_runs=*/3, /*max_runs=*/20,
                                       /*budget_seconds=*/0.3));
  }
  return flops / best / 1e9;
}

double measure_matmul_gflops(int64_t n, int threads_hint) {
  TORCH_CHECK(n > 0, "measure_matmul_gflops: n must be > 0, got ", n);
  TORCH_CHECK(threads_hint >= 0, "measure_matmul_gflops: threads_hint must be >= 0 (0 = keep ",
              "the current count), got ", threads_hint);
  ThreadCountGuard threads(threads_hint);
  InferenceGuard no_grad;
  const auto a = torch::randn({n, n});
  const auto b = torch::randn({n, n});
  auto out = torch::empty({n, n});
  // mm_out into a preallocated result: only the BLAS gemm is timed, not the allocator.
  auto run = [&] { torch::mm_out(out, a, b); };
  run();
  const double best = best_seconds(run, /*min_runs=*/3, /*max_runs=*/50, /*budget_seconds=*/0.01);
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / best /
         1e9;
}

}  // namespace dynattn
