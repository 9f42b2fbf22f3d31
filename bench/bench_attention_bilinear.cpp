// The bilinear heads (full, full + Newton-Schulz matrix square root, Tensor Sketch in its Gram
// and per-location FFT forms, Random Maclaurin) against the plain global-average-pool + Linear
// head, on the ResNet-20 last stage's output [64, 64, 7, 7] with 10 classes: inference, and forward
// + backward to the input (what a training step through the head costs). Run:
// build/bench/dynattn_bench --benchmark_filter=BilinearHead
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <functional>
#include <string>

#include "dynattn/attention/bilinear_head.h"
#include "dynattn/core/compat.h"

namespace {

constexpr int64_t kBatch = 64, kChannels = 64, kSize = 7, kClasses = 10;

// "avg" is the reference head: mean over H, W then Linear(C, classes).
std::function<torch::Tensor(const torch::Tensor&)> make_head(const std::string& spec) {
  if (spec == "avg") {
    torch::nn::Linear fc(kChannels, kClasses);
    return [fc](const torch::Tensor& x) mutable { return fc(x.mean({2, 3})); };
  }
  auto head = dynattn::create_bilinear_head(spec, kChannels, kClasses);
  return [head](const torch::Tensor& x) mutable { return head(x); };
}

void BM_BilinearHeadForward(benchmark::State& state, const std::string& spec) {
  auto head = make_head(spec);
  const auto x = torch::relu(torch::randn({kBatch, kChannels, kSize, kSize}));
  dynattn::InferenceGuard guard;
  for (int i = 0; i < 3; ++i) head(x);
  for (auto _ : state) benchmark::DoNotOptimize(head(x));
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void BM_BilinearHeadForwardBackward(benchmark::State& state, const std::string& spec) {
  auto head = make_head(spec);
  const auto x = torch::relu(torch::randn({kBatch, kChannels, kSize, kSize})).requires_grad_();
  auto step = [&] {
    head(x).sum().backward();
    x.mutable_grad().reset();
  };
  for (int i = 0; i < 3; ++i) step();
  for (auto _ : state) step();
  state.SetItemsProcessed(state.iterations() * kBatch);
}

}  // namespace

#define DYNATTN_BILINEAR_BENCH(name, spec)                                   \
  BENCHMARK_CAPTURE(BM_BilinearHeadForward, name, std::string(spec))         \
      ->Unit(benchmark::kMillisecond)                                        \
      ->UseRealTime();                                                       \
  BENCHMARK_CAPTURE(BM_BilinearHeadForwardBackward, name, std::string(spec)) \
      ->Unit(benchmark::kMillisecond)                                        \
      ->UseRealTime()

DYNATTN_BILINEAR_BENCH(avg_pool, "avg");
DYNATTN_BILINEAR_BENCH(full, "full");
DYNATTN_BILINEAR_BENCH(full_matrix_sqrt5, "full:matrix_sqrt=5");
DYNATTN_BILINEAR_BENCH(tensor_sketch_d2048_gram, "tensor_sketch:d=2048,algorithm=gram");
DYNATTN_BILINEAR_BENCH(tensor_sketch_d2048_fft, "tensor_sketch:d=2048,algorithm=fft");
DYNATTN_BILINEAR_BENCH(random_maclaurin_d2048, "random_maclaurin:d=2048");
