// Timing helpers for `dynattn bench` and the experiments: robust statistics of a callable's
// wall-clock time, and the machine's achievable convolution / matrix-product throughput,
// which turns MAC counts into a "fraction of peak" that is comparable across machines.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <functional>

namespace dynattn {

struct TimingStats {
  double median_ms = 0;
  double p90_ms = 0;  // nearest-rank 90th percentile
  double mean_ms = 0;
  double min_ms = 0;
  int64_t iterations = 0;  // timed iterations (warm-up excluded)
};

// Waits until the work queued on `device` has finished: a no-op except on CUDA, where kernels
// run asynchronously and a timer would otherwise only measure the launch.
void synchronize(torch::Device device);

// Calls fn() `warmup` times untimed, then times calls (steady_clock) until at least
// `min_iters` calls and `min_seconds` of timed work have both been done. Every call is
// followed by synchronize(sync_device). One sample is kept per call, so a trivial fn with a
// large min_seconds costs memory; time something that takes microseconds or more.
TimingStats time_callable(const std::function<void()>& fn, int warmup, int min_iters,
                          double min_seconds, torch::Device sync_device = torch::kCPU);

// Achievable convolution throughput of this process on the CPU, in GFLOP/s (2 FLOPs per MAC):
// the best time of a large 3x3 convolution (64 -> 64 channels, 56x56, stride 1), in
// contiguous and channels-last layout, after warm-up, in inference mode. threads_hint > 0
// runs it with that many intra-op threads (restored afterwards). Takes about a second.
double measure_conv_peak_gflops(int threads_hint = 0);

// GFLOP/s (2*n^3 FLOPs) of one n x n float matrix product on the CPU, best of a few runs
// (at least 3, more while under ~10 ms of timed work). threads_hint as above.
double measure_matmul_gflops(int64_t n, int threads_hint = 0);

}  // namespace dynattn
