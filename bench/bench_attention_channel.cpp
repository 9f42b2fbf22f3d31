// Channel attention modules (se, eca, cbam, bam) against the block they sit in: forward
// (inference) and forward+backward (training) at ResNet-20's stage shapes C=16@28x28, 32@14x14,
// 64@7x7, batch 1 and 64, contiguous and channels-last. "block" is the plain BasicBlock
// (conv3x3-BN-ReLU-conv3x3-BN + identity, ReLU) of the same shape, so a module's overhead reads
// as its time over the block's.
// "pass" is one memory pass over the same map (y = x * 1: read it, write a new one); with it the
// issue's overhead rule reads off the JSON: a module's time over the block's must stay within
// 1.5 x (its MACs over the block's + memory_passes x pass time over the block's). Each module
// reports its counted MACs per image and the number of extra passes it makes over the C x H x W
// map, each full traversal (a reduction or an elementwise kernel) counted as one, from its
// forward; traversals of pooled vectors or of 1-2 channel maps are not counted:
//   se, eca: 2 (spatial mean, gate multiply);
//   cbam: 6 (spatial mean, spatial max, channel-gate multiply, channel max, channel mean,
//         spatial-gate multiply);
//   bam: 4 (spatial mean, broadcast sum of the two maps, sigmoid, addcmul); the spatial
//        branch's 1x1 reduction reads the map too, but as MACs.
// The forward (inference) of se, eca, cbam and bam runs the fused kernels of ops/fused_gates.h;
// "<kind>_aten" is the same module with them switched off (the ATen path), so that both read
// off one run. The pass counts above are the ATen path's; the fused kernels make fewer (se, eca:
// 2; cbam: 3, the two poolings sharing one; bam: 2 plus the reduce conv's read, as MACs).
// Run: build/bench/dynattn_bench --benchmark_filter=Attention
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstring>
#include <string>
#include <vector>

#include "dynattn/attention/bam.h"
#include "dynattn/core/compat.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/ops/bam_spatial_branch.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/fused_gates.h"
#include "dynattn/profile/mac_counter.h"

namespace {

struct StageShape {
  int64_t channels, size;
};
constexpr StageShape kShapes[] = {{16, 28}, {32, 14}, {64, 7}};

// One memory pass over the map: the unit of the overhead rule.
struct MemoryPassImpl : torch::nn::Cloneable<MemoryPassImpl> {
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) { return x.mul(1.0); }
};
TORCH_MODULE(MemoryPass);

constexpr char kAtenSuffix[] = "_aten";

bool on_aten_path(const std::string& kind) {
  const std::string suffix = kAtenSuffix;
  return kind.size() > suffix.size() &&
         kind.compare(kind.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "se_aten" -> "se"
std::string module_kind(const std::string& kind) {
  return on_aten_path(kind) ? kind.substr(0, kind.size() - std::strlen(kAtenSuffix)) : kind;
}

// Switches the fused kernels (and conv2d_forward's kernel choice) off while alive, for the
// "_aten" variants.
struct AtenPathGuard : dynattn::KernelPolicyGuard {
  explicit AtenPathGuard(bool aten) : dynattn::KernelPolicyGuard(policy_for(aten)) {}
  static dynattn::KernelPolicy policy_for(bool aten) {
    auto p = dynattn::kernel_policy();
    if (aten) p.dynattn = false;
    return p;
  }
};

int memory_passes(const std::string& kind) {
  if (kind == "se" || kind == "eca") return 2;
  if (kind == "cbam") return 6;
  if (kind == "bam") return 4;
  return 0;
}

torch::nn::AnyModule make_module(const std::string& kind, int64_t channels) {
  if (kind == "pass") return torch::nn::AnyModule(MemoryPass());
  if (kind == "block")
    return torch::nn::AnyModule(
        dynattn::BasicBlock(dynattn::BasicBlockOptions(channels, channels)));
  return dynattn::create_attention(module_kind(kind), channels);
}

// Args: shape index (into kShapes), batch, channels-last.
struct Setup {
  torch::nn::AnyModule module;
  torch::Tensor x;
};

Setup setup(benchmark::State& state, const std::string& kind, bool training) {
  const auto shape = kShapes[state.range(0)];
  const int64_t batch = state.range(1);
  const bool channels_last = state.range(2) != 0;
  Setup s{make_module(kind, shape.channels),
          torch::randn({batch, shape.channels, shape.size, shape.size})};
  s.module.ptr()->train(training);
  if (channels_last) {
    dynattn::to_memory_format(*s.module.ptr(), torch::MemoryFormat::ChannelsLast);
    s.x = s.x.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  {
    torch::NoGradGuard no_grad;
    const auto macs = dynattn::count_macs([&] { s.module.forward(s.x); }).macs;
    state.counters["macs_per_image"] = static_cast<double>(macs) / static_cast<double>(batch);
    state.counters["memory_passes"] = memory_passes(module_kind(kind));
  }
  state.SetLabel("C=" + std::to_string(shape.channels) + " " + std::to_string(shape.size) + "x" +
                 std::to_string(shape.size) + (channels_last ? " channels_last" : " contiguous"));
  return s;
}

void BM_AttentionForward(benchmark::State& state, const std::string& kind) {
  AtenPathGuard path(on_aten_path(kind));
  auto s = setup(state, kind, /*training=*/false);
  dynattn::InferenceGuard guard;
  for (int i = 0; i < 5; ++i) s.module.forward(s.x);
  for (auto _ : state) benchmark::DoNotOptimize(s.module.forward(s.x));
  state.SetItemsProcessed(state.iterations() * s.x.size(0));
}

void BM_AttentionForwardBackward(benchmark::State& state, const std::string& kind) {
  if (kind == "bam" && state.range(1) == 1) {
    state.SkipWithError("BAM's BatchNorm1d cannot train on a batch of 1");
    return;
  }
  auto s = setup(state, kind, /*training=*/true);
  s.x.requires_grad_();  // as inside a network: the input gradient is computed too
  auto step = [&] {
    auto y = s.module.forward<torch::Tensor>(s.x);
    y.backward(torch::ones_like(y));
  };
  for (int i = 0; i < 3; ++i) step();
  for (auto _ : state) step();
  state.SetItemsProcessed(state.iterations() * s.x.size(0));
}

// Where BAM's inference computes its spatial branch, each followed by the same fused rest:
// inside fused_bam() per image (direct loops), as the batch-lane kernels of
// ops/bam_spatial_branch.h, or as ATen's convolutions: the measurement behind
// bam_spatial_in_kernel() and bam_spatial_branch_pays_off().
enum class BamBranch { InKernel, Lanes, Aten };

void BM_BamSpatialBranch(benchmark::State& state, BamBranch where) {
  const int64_t c = state.range(0), hw = state.range(1), rd = state.range(2), n = state.range(3);
  dynattn::BAM bam(dynattn::BAMOptions(c).rd_channels(rd));
  bam->eval();
  const auto x = torch::randn({n, c, hw, hw});
  dynattn::InferenceGuard guard;
  auto& gc = *bam->channel_att->gate_c;
  auto& gs = *bam->spatial_att->gate_s;
  dynattn::BatchNormEval bn[4];
  dynattn::eval_form(*gc.ptr(1)->as<torch::nn::BatchNorm1d>(), bn[0]);
  for (int i = 0; i < 3; ++i)
    dynattn::eval_form(*gs.ptr(1 + 3 * i)->as<torch::nn::BatchNorm2d>(), bn[1 + i]);
  const auto* fc0 = gc.ptr(0)->as<torch::nn::Linear>();
  const auto* fc_final = gc.ptr(3)->as<torch::nn::Linear>();
  const dynattn::ChannelMlp mlp{fc0->weight, fc0->bias, fc_final->weight, fc_final->bias, &bn[0]};
  dynattn::BamSpatialWeights sw;
  const auto* reduce = gs.ptr(0)->as<torch::nn::Conv2d>();
  sw.reduce_weight = reduce->weight;
  sw.reduce_bias = reduce->bias;
  sw.reduce_bn = &bn[1];
  for (int i = 0; i < 2; ++i) {
    const auto* conv = gs.ptr(3 + 3 * i)->as<torch::nn::Conv2d>();
    sw.dilated_weight[i] = conv->weight;
    sw.dilated_bias[i] = conv->bias;
    sw.dilated_bn[i] = &bn[2 + i];
  }
  const auto* final_conv = gs.ptr(9)->as<torch::nn::Conv2d>();
  sw.final_weight = final_conv->weight;
  sw.final_bias = final_conv->bias;
  sw.dilation = bam->options.dilation();
  auto run = [&] {
    if (where == BamBranch::InKernel) return dynattn::fused_bam(x, mlp, &sw, {}, false);
    torch::Tensor logits;
    if (where == BamBranch::Lanes) {
      logits = dynattn::bam_spatial_branch(x, bam->spatial_att->layers());
    } else {
      AtenPathGuard path(true);
      logits = bam->spatial_att(x);
    }
    return dynattn::fused_bam(x, mlp, nullptr, logits, false);
  };
  for (int i = 0; i < 3; ++i) run();
  for (auto _ : state) benchmark::DoNotOptimize(run());
  state.SetItemsProcessed(state.iterations() * n);
}

void bam_spatial_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"C", "HW", "rd", "N"});
  for (auto a : {std::vector<int64_t>{16, 28, 1, 64},
                 {32, 14, 2, 64},
                 {64, 7, 4, 1},
                 {64, 7, 4, 4},
                 {64, 7, 4, 16},
                 {64, 7, 4, 64},
                 {128, 7, 8, 2},
                 {128, 7, 8, 8},
                 {128, 14, 8, 16},
                 {256, 14, 16, 1},
                 {256, 14, 16, 16},
                 {256, 14, 32, 1},
                 {512, 7, 32, 1}})
    b->Args(a);
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

void args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "N", "cl"})
      ->ArgsProduct({{0, 1, 2}, {1, 64}, {0, 1}})
      ->Unit(benchmark::kMicrosecond)
      ->UseRealTime();
}

}  // namespace

BENCHMARK_CAPTURE(BM_AttentionForward, block, std::string("block"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, pass, std::string("pass"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, se, std::string("se"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, eca, std::string("eca"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, cbam, std::string("cbam"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, bam, std::string("bam"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, se_aten, std::string("se_aten"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, eca_aten, std::string("eca_aten"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, cbam_aten, std::string("cbam_aten"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForward, bam_aten, std::string("bam_aten"))->Apply(args);
BENCHMARK_CAPTURE(BM_BamSpatialBranch, in_kernel, BamBranch::InKernel)->Apply(bam_spatial_args);
BENCHMARK_CAPTURE(BM_BamSpatialBranch, lanes, BamBranch::Lanes)->Apply(bam_spatial_args);
BENCHMARK_CAPTURE(BM_BamSpatialBranch, aten, BamBranch::Aten)->Apply(bam_spatial_args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, block, std::string("block"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, pass, std::string("pass"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, se, std::string("se"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, eca, std::string("eca"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, cbam, std::string("cbam"))->Apply(args);
BENCHMARK_CAPTURE(BM_AttentionForwardBackward, bam, std::string("bam"))->Apply(args);
