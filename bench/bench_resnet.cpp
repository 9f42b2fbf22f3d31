// Google Benchmark micro-benchmarks of the ResNet family: inference at batch 1 and 64, in
// contiguous and channels-last layouts, and one training step at batch 128.
// Run: build/bench/dynattn_bench [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "dynattn/core/compat.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/models/registry.h"
#include "dynattn/train/optimizer.h"

namespace {

void BM_ResNetInference(benchmark::State& state, const std::string& spec) {
  const int64_t batch = state.range(0);
  const bool channels_last = state.range(1) != 0;
  auto model = dynattn::create_model(spec);
  model.ptr()->eval();
  auto x = torch::randn({batch, 1, 28, 28});
  if (channels_last) {
    dynattn::to_memory_format(*model.ptr(), torch::MemoryFormat::ChannelsLast);
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  dynattn::InferenceGuard guard;
  for (int i = 0; i < 5; ++i) model.forward(x);
  for (auto _ : state) benchmark::DoNotOptimize(model.forward(x));
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetLabel(channels_last ? "channels_last" : "contiguous");
}

void BM_ResNetTrainStep(benchmark::State& state, const std::string& spec) {
  const int64_t batch = state.range(0);
  const bool channels_last = state.range(1) != 0;
  auto model = dynattn::create_model(spec);
  model.ptr()->train();
  auto x = torch::randn({batch, 1, 28, 28});
  auto y = torch::randint(0, 10, {batch}, torch::kInt64);
  if (channels_last) {
    dynattn::to_memory_format(*model.ptr(), torch::MemoryFormat::ChannelsLast);
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  auto opt = dynattn::make_optimizer(*model.ptr(), dynattn::OptimizerOptions().lr(0.01));
  auto step = [&] {
    auto loss = torch::nn::functional::cross_entropy(model.forward(x), y);
    opt->zero_grad();
    loss.backward();
    opt->step();
  };
  for (int i = 0; i < 2; ++i) step();
  for (auto _ : state) step();
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetLabel(channels_last ? "channels_last" : "contiguous");
}

}  // namespace

BENCHMARK_CAPTURE(BM_ResNetInference, resnet20, std::string("resnet20"))
    ->ArgsProduct({{1, 64}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_ResNetTrainStep, resnet20, std::string("resnet20"))
    ->ArgsProduct({{128}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
