// The non-local block (embedded gaussian, C/2 inner width) next to the 3x3 conv + BN it is
// usually compared with, at the shapes of the CIFAR-style ResNet's stages 2 and 3.
// Counters for the overhead rule (see bench_attention_channel.cpp): MACs per image, and the
// non-local block's memory passes over the C x H x W map beyond its products, counted as there
// (each traversal of its ATen-path forward; those of maps a fraction of the size as that
// fraction): BN, the residual add, the 2x max-pool of the keys' input when sub-sampled, and the
// softmax over the affinity, [Q, K] per image against the map's [C, Q]: K / C passes (1.5 at
// 32@14x14 sub-sampled, 6.1 without, 0.14 and 0.77 at 64@7x7). (Until 2026-12 this was a flat 3,
// which missed the max-pool and took the affinity for the map's size at every shape.)
// Run: build/bench/dynattn_bench
// --benchmark_filter='NonLocal|Conv3x3BN|SoftmaxAttention|PointwiseConv|BatchNormAdd'
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "dynattn/attention/non_local.h"
#include "dynattn/core/compat.h"
#include "dynattn/ops/batch_norm_add.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/pointwise_conv.h"
#include "dynattn/ops/softmax_attention.h"
#include "dynattn/profile/mac_counter.h"

namespace {

template <typename M>
void set_counters(benchmark::State& state, M& module, const torch::Tensor& x, double passes) {
  torch::NoGradGuard no_grad;
  const auto macs = dynattn::count_macs([&] { module->forward(x); }).macs;
  state.counters["macs_per_image"] = static_cast<double>(macs) / static_cast<double>(x.size(0));
  state.counters["memory_passes"] = passes;
}

// Args: channels, spatial size, batch, sub-sampling, backward.
void BM_NonLocal(benchmark::State& state) {
  const int64_t channels = state.range(0), size = state.range(1), batch = state.range(2);
  const bool subsample = state.range(3) != 0, backward = state.range(4) != 0;
  dynattn::NonLocalBlock block(dynattn::NonLocalOptions(channels).subsample(subsample));
  {
    torch::NoGradGuard no_grad;
    block->named_parameters()["bn.weight"].fill_(1.0);  // a real branch, not the init identity
  }
  const auto x = torch::randn({batch, channels, size, size});
  const double keys = subsample ? static_cast<double>((size / 2) * (size / 2)) : size * size;
  set_counters(state, block, x, (subsample ? 3.0 : 2.0) + keys / static_cast<double>(channels));
  if (backward) {
    const auto input = x.clone().requires_grad_();
    for (auto _ : state) {
      block->zero_grad();
      block->forward(input).sum().backward();
    }
  } else {
    block->eval();
    dynattn::InferenceGuard guard;
    for (int i = 0; i < 3; ++i) block->forward(x);
    for (auto _ : state) benchmark::DoNotOptimize(block->forward(x));
  }
  state.SetItemsProcessed(state.iterations() * batch);
}

// The same shape through conv3x3 (no bias) + BN: the block's usual point of comparison.
void BM_Conv3x3BN(benchmark::State& state) {
  const int64_t channels = state.range(0), size = state.range(1), batch = state.range(2);
  const bool backward = state.range(4) != 0;
  torch::nn::Sequential layer(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, 3).padding(1).bias(false)),
      torch::nn::BatchNorm2d(channels));
  const auto x = torch::randn({batch, channels, size, size});
  set_counters(state, layer, x, 0);
  if (backward) {
    const auto input = x.clone().requires_grad_();
    for (auto _ : state) {
      layer->zero_grad();
      layer->forward(input).sum().backward();
    }
  } else {
    layer->eval();
    dynattn::InferenceGuard guard;
    for (int i = 0; i < 3; ++i) layer->forward(x);
    for (auto _ : state) benchmark::DoNotOptimize(layer->forward(x));
  }
  state.SetItemsProcessed(state.iterations() * batch);
}

// The attention product of the softmax modes alone, g softmax(theta^T phi)^T, as dynattn's op
// (ops/softmax_attention.h) and as ATen's bmm/softmax/bmm, side by side.
// Args: D (= Dv), Q, K, N, backward, dynattn op.
void BM_SoftmaxAttention(benchmark::State& state) {
  const int64_t d = state.range(0), q = state.range(1), k = state.range(2), n = state.range(3);
  const bool backward = state.range(4) != 0, fused = state.range(5) != 0;
  auto theta = torch::randn({n, d, q}).requires_grad_(backward);
  auto phi = torch::randn({n, d, k}).requires_grad_(backward);
  auto g = torch::randn({n, d, k}).requires_grad_(backward);
  if (fused && !dynattn::softmax_attention_applicable(theta, phi, g)) {
    state.SkipWithError("no attention kernel in this build");
    return;
  }
  auto product = [&] {
    return fused
               ? dynattn::softmax_attention(theta, phi, g)
               : torch::bmm(
                     g, torch::softmax(torch::bmm(theta.transpose(1, 2), phi), 2).transpose(1, 2));
  };
  for (auto _ : state) {
    if (backward) {
      product().sum().backward();
    } else {
      torch::NoGradGuard no_grad;
      benchmark::DoNotOptimize(product());
    }
  }
  state.SetItemsProcessed(state.iterations() * n);
}

// A 1x1 convolution with bias of an NCHW batch, as ops/pointwise_conv.h and as torch::conv2d,
// side by side. Args: C_in, C_out, size, N, backward, dynattn op.
void BM_PointwiseConv(benchmark::State& state) {
  const int64_t c_in = state.range(0), c_out = state.range(1), size = state.range(2),
                n = state.range(3);
  const bool backward = state.range(4) != 0, ours = state.range(5) != 0;
  const auto x = torch::randn({n, c_in, size, size}).requires_grad_(backward);
  const auto w = torch::randn({c_out, c_in, 1, 1}).requires_grad_(backward);
  const auto b = torch::randn({c_out}).requires_grad_(backward);
  if (ours && !dynattn::pointwise_conv_applicable(x, w)) {
    state.SkipWithError("built without the oneDNN library");
    return;
  }
  auto conv = [&] { return ours ? dynattn::pointwise_conv(x, w, b) : torch::conv2d(x, w, b); };
  for (auto _ : state) {
    if (backward) {
      conv().sum().backward();
    } else {
      torch::NoGradGuard no_grad;
      benchmark::DoNotOptimize(conv());
    }
  }
  state.SetItemsProcessed(state.iterations() * n);
}

// Training-mode BN + residual add, forward and backward, as ops/batch_norm_add.h and as
// torch::batch_norm + add, side by side. Args: C, size, N, dynattn op.
void BM_BatchNormAdd(benchmark::State& state) {
  const int64_t c = state.range(0), size = state.range(1), n = state.range(2);
  const bool ours = state.range(3) != 0;
  const auto z = torch::randn({n, c, size, size}).requires_grad_();
  const auto residual = torch::randn({n, c, size, size}).requires_grad_();
  const auto weight = torch::ones({c}).requires_grad_(), bias = torch::zeros({c}).requires_grad_();
  auto mean = torch::zeros({c}), var = torch::ones({c});
  for (auto _ : state) {
    const auto out =
        ours ? dynattn::batch_norm_add(z, residual, weight, bias, mean, var, 0.1, 1e-5)
             : torch::batch_norm(z, weight, bias, mean, var, true, 0.1, 1e-5, false) + residual;
    out.sum().backward();
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void shapes(benchmark::internal::Benchmark* b, bool with_subsample_axis) {
  b->ArgNames({"C", "HW", "N", "sub", "bwd"});
  for (auto [c, hw] : {std::pair<int64_t, int64_t>{32, 14}, {64, 7}}) {
    for (int64_t n : {1, 64}) {
      for (int64_t bwd : {0, 1}) {
        if (with_subsample_axis) {
          b->Args({c, hw, n, 1, bwd});
          b->Args({c, hw, n, 0, bwd});
        } else {
          b->Args({c, hw, n, 0, bwd});
        }
      }
    }
  }
}

}  // namespace

BENCHMARK(BM_NonLocal)
    ->Apply([](benchmark::internal::Benchmark* b) { shapes(b, true); })
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_SoftmaxAttention)
    ->ArgNames({"D", "Q", "K", "N", "bwd", "dynattn"})
    ->ArgsProduct({{16}, {196}, {49}, {64}, {0, 1}, {0, 1}})
    ->ArgsProduct({{32}, {49}, {9}, {64}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_PointwiseConv)
    ->ArgNames({"Cin", "Cout", "HW", "N", "bwd", "dynattn"})
    ->ArgsProduct({{32}, {16}, {14}, {64}, {0, 1}, {0, 1}})
    ->ArgsProduct({{64}, {32}, {7}, {64}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_BatchNormAdd)
    ->ArgNames({"C", "HW", "N", "dynattn"})
    ->ArgsProduct({{32}, {14}, {64}, {0, 1}})
    ->ArgsProduct({{64}, {7}, {64}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_Conv3x3BN)
    ->Apply([](benchmark::internal::Benchmark* b) { shapes(b, false); })
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
