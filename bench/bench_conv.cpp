// A single 3x3 convolution at batch 1, with ATen's kernel choice and with conv2d_forward()'s
// (include/dynattn/ops/conv2d.h), side by side, in both layouts.
// Run: build/bench/dynattn_bench --benchmark_filter=Conv
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"

namespace {

// Args: channels, spatial size, channels-last, kernel selection on.
void BM_Conv3x3Batch1(benchmark::State& state) {
  const int64_t channels = state.range(0), size = state.range(1);
  const bool channels_last = state.range(2) != 0, select = state.range(3) != 0;
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(channels, channels, 3).padding(1).bias(false));
  auto x = torch::randn({1, channels, size, size});
  if (channels_last) {
    conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  auto policy = dynattn::kernel_policy();
  policy.dynattn = select;
  dynattn::KernelPolicyGuard policy_guard(policy);
  dynattn::InferenceGuard guard;
  const bool onednn = dynattn::select_conv2d_kernel(x, *conv) == dynattn::ConvKernel::OneDnn;
  for (int i = 0; i < 10; ++i) dynattn::conv2d_forward(*conv, x);
  for (auto _ : state) benchmark::DoNotOptimize(dynattn::conv2d_forward(*conv, x));
  state.SetLabel(std::string(channels_last ? "channels_last" : "contiguous") +
                 (onednn ? " onednn" : " aten"));
}

}  // namespace

BENCHMARK(BM_Conv3x3Batch1)
    ->ArgNames({"C", "HW", "cl", "select"})
    ->ArgsProduct({{16, 32, 64}, {7, 14, 28}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
