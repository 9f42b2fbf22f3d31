// The fused inference kernels of the channel-attention gates (ops/fused_gates.h) against the
// modules' ATen path: same outputs for random weights and BN statistics over the options that
// change the maths, taken exactly when they should be, and the ATen path (training, autograd,
// errors) unchanged.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "../attention_channel/channel_test_util.h"
#include "dynattn/attention/attention_maps.h"
#include "dynattn/attention/bam.h"
#include "dynattn/attention/cbam.h"
#include "dynattn/core/compat.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/fused_gates.h"
#include "dynattn/profile/mac_counter.h"
#include "kernel_policy.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::close_to_reference;
using dynattn::test_util::error_of;
using dynattn::test_util::max_abs_diff;
using dynattn::test_util::randomize;
using ::testing::HasSubstr;

namespace {

// Restores the process-wide switch whatever a test does.
using SelectionGuard = dynattn::testing::PolicyRestorer;

struct Shape {
  int64_t n, c, h, w;
};

torch::nn::AnyModule make(const std::string& spec, int64_t channels, uint64_t seed) {
  auto m = create_attention(spec, channels);
  randomize(*m.ptr(), seed);
  m.ptr()->eval();
  return m;
}

// The ATen path's output (switch off) and the fused one (switch on), both without autograd;
// checks that exactly the second call ran a fused kernel.
struct TwoPaths {
  torch::Tensor aten, fused;
};

TwoPaths run_both(torch::nn::AnyModule& m, const torch::Tensor& x) {
  TwoPaths r;
  InferenceGuard inference;
  {
    SelectionGuard guard;
    dynattn::testing::set_dynattn_kernels(false);
    const int64_t before = fused_gates_calls();
    r.aten = m.forward<torch::Tensor>(x);
    EXPECT_EQ(fused_gates_calls(), before) << "switch off must keep the ATen path";
  }
  const int64_t before = fused_gates_calls();
  r.fused = m.forward<torch::Tensor>(x);
  EXPECT_EQ(fused_gates_calls(), before + 1) << "the fused kernel did not run";
  return r;
}

// Every shape in both layouts: the fused output equals the ATen one within the project's
// tolerance and keeps the input's memory format.
void expect_parity(const std::string& spec, const std::vector<Shape>& shapes, uint64_t seed,
                   double input_scale = 1.0) {
  for (const auto& s : shapes) {
    auto m = make(spec, s.c, seed);
    const auto x = torch::randn({s.n, s.c, s.h, s.w}) * input_scale;
    for (bool channels_last : {false, true}) {
      const auto input = channels_last ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
      const std::string what = spec + " [" + std::to_string(s.n) + "," + std::to_string(s.c) + "," +
                               std::to_string(s.h) + "," + std::to_string(s.w) + "]" +
                               (channels_last ? " channels-last" : " contiguous");
      const auto r = run_both(m, input);
      ASSERT_EQ(r.fused.sizes(), r.aten.sizes()) << what;
      EXPECT_TRUE(close_to_reference(r.fused, r.aten))
          << what << ": max |fused - aten| = " << max_abs_diff(r.fused, r.aten);
      EXPECT_TRUE(r.fused.is_contiguous(channels_last ? torch::MemoryFormat::ChannelsLast
                                                      : torch::MemoryFormat::Contiguous))
          << what;
    }
  }
}

const std::vector<Shape> kShapes = {
    {1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 7, 7}, {1, 24, 1, 1}, {4, 8, 3, 9}};

}  // namespace

TEST(FusedGates, SqueezeExcitationMatchesTheAtenPath) {
  expect_parity("se", kShapes, 1);
  expect_parity("se:gate=hard_sigmoid", kShapes, 2);
  // Explicit widths, including one wider than C.
  expect_parity("se:rd=3", {{2, 16, 6, 5}}, 3);
  expect_parity("se:rd=40", {{2, 16, 6, 5}}, 4);
}

TEST(FusedGates, EfficientChannelAttentionMatchesTheAtenPath) {
  expect_parity("eca", kShapes, 5);
  // Kernel sizes up to wider than C (all zero padding at the ends).
  for (int k : {1, 3, 5, 9}) expect_parity("eca:k=" + std::to_string(k), {{2, 4, 5, 7}}, 6);
}

TEST(FusedGates, CbamMatchesTheAtenPathForEveryOption) {
  for (bool max_first : {true, false}) {
    for (bool mlp_bias : {true, false}) {
      for (bool spatial_bn : {true, false}) {
        for (int kernel : {7, 3}) {
          std::string spec = "cbam:max_first=" + std::string(max_first ? "true" : "false") +
                             ",mlp_bias=" + (mlp_bias ? "true" : "false") +
                             ",spatial_bn=" + (spatial_bn ? "true" : "false") +
                             ",kernel=" + std::to_string(kernel);
          expect_parity(spec, {{1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 7, 7}}, 7);
        }
      }
    }
  }
  // Kernel wider than the map, a 1x1 map, an explicit width.
  expect_parity("cbam:kernel=9", {{2, 8, 3, 4}, {1, 24, 1, 1}}, 8);
  expect_parity("cbam:rd=5,r=4", {{2, 32, 6, 6}}, 9);
}

TEST(FusedGates, BamMatchesTheAtenPathForEveryOption) {
  for (bool product : {false, true}) {
    for (int dilation : {4, 1, 2}) {
      const std::string spec = "bam:product=" + std::string(product ? "true" : "false") +
                               ",dilation=" + std::to_string(dilation);
      // rd = 1, 2 and 4: the spatial branch runs inside the kernel.
      expect_parity(spec, {{1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 7, 7}, {1, 16, 1, 1}}, 10);
      // rd = 10: inside the kernel for two images, ATen's convolutions for three; rd = 20:
      // always ATen's (bam_spatial_in_kernel).
      expect_parity(spec + ",rd=10", {{2, 40, 6, 5}, {3, 40, 6, 5}}, 11);
      expect_parity(spec + ",rd=20", {{1, 40, 6, 5}}, 11);
    }
  }
  // Large logits: the sum form falls back from e^-a e^-b to one exponential per element.
  expect_parity("bam", {{2, 16, 5, 7}}, 12, /*input_scale=*/300.0);
}

TEST(FusedGates, TakenUnderNoGradAndInferenceModeOnly) {
  auto m = make("se", 16, 13);
  const auto x = torch::randn({2, 16, 5, 5});
  int64_t before = fused_gates_calls();
  {
    torch::NoGradGuard no_grad;
    m.forward(x);
  }
  EXPECT_EQ(fused_gates_calls(), before + 1) << "NoGradGuard turns autograd recording off";
  before = fused_gates_calls();
  // Autograd on (the parameters require grad): not the inference kernel but SE's training form,
  // one autograd node.
  EXPECT_FALSE(fused_gates_apply(x));
  EXPECT_TRUE(fused_gates_train_apply(x));
  EXPECT_TRUE(m.forward<torch::Tensor>(x).requires_grad());
  EXPECT_EQ(fused_gates_calls(), before + 1);
  InferenceGuard inference;
  before = fused_gates_calls();
  // Other dtypes, non-dense layouts, empty batches: the ATen path, same result.
  const auto transposed = x.transpose(2, 3);
  EXPECT_FALSE(fused_gates_apply(transposed));
  EXPECT_FALSE(fused_gates_apply(torch::randn({0, 16, 5, 5})));
  EXPECT_FALSE(fused_gates_apply(x.to(torch::kDouble)));
  EXPECT_FALSE(fused_gates_apply(torch::randn({2, 16, 5})));
  EXPECT_FALSE(fused_gates_apply(x, {torch::randn({4}, torch::kDouble)}));
  EXPECT_TRUE(fused_gates_apply(x, {torch::Tensor(), torch::randn({4})}));
  m.forward(transposed);
  m.forward(torch::randn({0, 16, 5, 5}));
  auto double_module = make("se", 16, 13);
  double_module.ptr()->to(torch::kDouble);
  double_module.forward(x.to(torch::kDouble));
  EXPECT_EQ(fused_gates_calls(), before);
}

TEST(FusedGates, BatchNormInTrainingModeKeepsTheAtenPath) {
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 32, 6, 6});
  {
    // BAM's branches use batch statistics as ATen operators; only its combine is fused (tested
    // against ATen in BamTrainingFormMatchesTheAtenGradients).
    auto m = make("bam", 32, 14);
    m.ptr()->train();
    const int64_t before = fused_gates_calls();
    m.forward(x);
    EXPECT_EQ(fused_gates_calls(), before + 1);
  }
  {
    // CBAM's training form computes its spatial BN with batch statistics (tested against ATen
    // in CbamTrainingFormMatchesTheAtenGradients), not the inference kernel.
    auto m = make("cbam", 32, 14);
    m.ptr()->train();
    const int64_t before = fused_gates_calls();
    m.forward(x);
    EXPECT_EQ(fused_gates_calls(), before + 1);
  }
  // Without the spatial BN, CBAM's maths does not depend on the mode.
  auto no_bn = make("cbam:spatial_bn=false", 32, 15);
  no_bn.ptr()->train();
  const int64_t before = fused_gates_calls();
  no_bn.forward(x);
  EXPECT_EQ(fused_gates_calls(), before + 1);
}

// Fused training forms (float) against the exact result (the ATen path in double): within 1e-4
// of each tensor's scale or 10x the error of ATen's own float path (aten). Outputs and input
// gradients stay within 1e-5; the weight gradients are sums over pixels and channels that
// cancel (gates near saturation, random dy), where float sums in another order than ATen's land
// up to ~5e-5 of the scale away; a wrong formula is off by the value's scale. abs_floor: an
// absolute tolerance for gradients that are zero in exact arithmetic (a bias before a training
// BN), where only rounding is left.
void expect_as_accurate(const std::vector<torch::Tensor>& fused,
                        const std::vector<torch::Tensor>& aten,
                        const std::vector<torch::Tensor>& exact, const std::string& what,
                        double abs_floor = 0.0) {
  ASSERT_EQ(fused.size(), exact.size());
  ASSERT_EQ(aten.size(), exact.size());
  for (size_t i = 0; i < fused.size(); ++i) {
    const auto b = exact[i].to(torch::kDouble);
    const double scale = b.abs().max().item<double>() + 1e-6;
    const double aten_error = (aten[i].to(torch::kDouble) - b).abs().max().item<double>();
    EXPECT_LE((fused[i].to(torch::kDouble) - b).abs().max().item<double>(),
              std::max({(i < 2 ? 1e-5 : 1e-4) * scale, 10 * aten_error, abs_floor}))
        << what << " tensor " << i;
  }
}

// One forward and backward of a module in training through its fused node (selection on, float)
// or ATen (selection off, or double), its buffers first reset to buffers0: the output, the input
// gradient, every parameter's gradient and every buffer afterwards. Checks that exactly the
// fused path counted a kernel call and that the output keeps x0's layout.
std::vector<torch::Tensor> train_step(torch::nn::AnyModule& m, const torch::Tensor& x0,
                                      const torch::Tensor& dy,
                                      const std::vector<torch::Tensor>& buffers0, bool selection,
                                      torch::Dtype dtype, const std::string& spec) {
  SelectionGuard guard;
  dynattn::testing::set_dynattn_kernels(selection);
  m.ptr()->to(torch::kFloat);
  auto buffers = m.ptr()->buffers();
  EXPECT_EQ(buffers.size(), buffers0.size()) << spec;
  for (size_t i = 0; i < std::min(buffers.size(), buffers0.size()); ++i)
    buffers[i].data().copy_(buffers0[i]);
  m.ptr()->to(dtype);
  for (auto& p : m.ptr()->parameters()) p.mutable_grad() = torch::Tensor();
  auto x = x0.to(dtype).clone().requires_grad_();
  const int64_t before = fused_gates_calls();
  auto y = m.forward<torch::Tensor>(x);
  EXPECT_EQ(fused_gates_calls(), before + (selection && dtype == torch::kFloat ? 1 : 0)) << spec;
  const bool cl = !x0.is_contiguous();
  EXPECT_TRUE(
      y.is_contiguous(cl ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous))
      << spec;
  (y * dy.to(dtype)).sum().backward();
  std::vector<torch::Tensor> out{y.detach(), x.grad()};
  for (auto& p : m.ptr()->parameters()) out.push_back(p.grad().clone());
  for (auto& b : m.ptr()->buffers()) out.push_back(b.clone());
  m.ptr()->to(torch::kFloat);
  return out;
}

// One training-form case of module m: snapshots its buffers, draws x (in the layout asked for)
// and dy, and checks the fused float run and ATen's float run against ATen in double.
void expect_training_form_matches(torch::nn::AnyModule& m, const std::vector<int64_t>& shape,
                                  bool cl, const std::string& spec, const std::string& what,
                                  double abs_floor = 0.0) {
  std::vector<torch::Tensor> buffers0;
  for (auto& b : m.ptr()->buffers()) buffers0.push_back(b.clone());
  auto x0 = torch::randn(shape);
  if (cl) x0 = x0.contiguous(torch::MemoryFormat::ChannelsLast);
  const auto dy = torch::randn(shape);
  const auto fused = train_step(m, x0, dy, buffers0, true, torch::kFloat, spec);
  const auto exact = train_step(m, x0, dy, buffers0, true, torch::kDouble, spec);
  expect_as_accurate(fused, train_step(m, x0, dy, buffers0, false, torch::kFloat, spec), exact,
                     what, abs_floor);
}

// SE and ECA train through one fused autograd node: same outputs and gradients (input and every
// weight) as the ATen operators, in both layouts, for batch 1 and more, odd maps, both gates.
// The reference is the ATen path in double precision: the float sums of both paths round
// differently, and where the gradient cancels (64 channels, saturated gates) either can be
// 1e-5 off.
TEST(FusedGates, TrainingFormsMatchTheAtenGradients) {
  torch::manual_seed(5);  // the same draws whatever ran before (ReLU kinks move with them)
  const std::vector<std::vector<int64_t>> shapes{{1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 1, 1}};
  for (const char* spec : {"se", "se:gate=hard_sigmoid", "se:rd=3", "eca", "eca:k=5"}) {
    for (const auto& shape : shapes) {
      for (bool cl : {false, true}) {
        auto m = make(spec, shape[1], 21);
        m.ptr()->train();
        // Hard sigmoid: logits spread over its linear and flat parts.
        for (auto& p : m.ptr()->parameters()) p.data().mul_(4);
        std::ostringstream what;
        what << spec << " shape " << shape << " cl " << cl;
        expect_training_form_matches(m, shape, cl, spec, what.str());
      }
    }
  }
}

// CBAM trains through one fused autograd node: outputs, gradients of the input and of every
// weight, and the spatial BN's running statistics as the ATen path computes them in double.
TEST(FusedGates, CbamTrainingFormMatchesTheAtenGradients) {
  torch::manual_seed(5);  // the same draws whatever ran before (ReLU kinks move with them)
  // 1x1 maps in eval mode only: a training BN over two values makes the spatial gradients
  // vanish, so their rounding is all that is left to compare.
  const std::vector<std::vector<int64_t>> shapes{
      {1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 3, 3}, {2, 64, 1, 1}};
  for (const char* spec : {"cbam", "cbam:max_first=false,mlp_bias=false", "cbam:spatial_bn=false",
                           "cbam:kernel=3,r=8"}) {
    for (const auto& shape : shapes) {
      for (bool cl : {false, true}) {
        for (bool train : {true, false}) {
          if (train && shape[2] * shape[3] == 1) continue;
          auto m = make(spec, shape[1], 23);
          m.ptr()->train(train);
          std::ostringstream what;
          what << spec << " shape " << shape << " cl " << cl << " train " << train;
          expect_training_form_matches(m, shape, cl, spec, what.str());
        }
      }
    }
  }
}

// BAM trains with its combine as one fused autograd node (the branches stay modules):
// outputs, gradients of the input and of every weight, and the BN statistics as the ATen path
// computes them in double. Scaled weights push logits past the range where the sum form factors
// the sigmoid (|logit| > 80), so both of its code paths run.
TEST(FusedGates, BamTrainingFormMatchesTheAtenGradients) {
  torch::manual_seed(5);
  const std::vector<std::vector<int64_t>> shapes{{2, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 3, 3}};
  for (const char* spec : {"bam", "bam:product=1", "bam:rd=4,dilation=2"}) {
    for (const auto& shape : shapes) {
      for (bool cl : {false, true}) {
        for (double scale : {1.0, 30.0}) {
          auto m = make(spec, shape[1], 29);
          m.ptr()->train();
          for (auto& p : m.ptr()->parameters()) p.data().mul_(scale);
          std::ostringstream what;
          what << spec << " shape " << shape << " cl " << cl << " scale " << scale;
          // The conv and linear biases before a training BN get zero gradient in exact
          // arithmetic; with dy ~ N(0, 1), float rounding leaves ~1e-8 .. 1e-6 there.
          expect_training_form_matches(m, shape, cl, spec, what.str(), 1e-5);
        }
      }
    }
  }
}

// On an AVX-512 machine the tests above run the 16-float forms of the CBAM and BAM kernels; with
// them switched off the AVX2/baseline forms run, and must match the ATen path as well.
TEST(FusedGates, NarrowVectorFormsMatchTheAtenPathToo) {
  dynattn::testing::PolicyRestorer guard;
  dynattn::testing::set_wide_vectors(false);
  EXPECT_FALSE(wide_vector_kernels_run());
  expect_parity("cbam", {{1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 7, 7}}, 7);
  expect_parity("bam", {{1, 16, 28, 28}, {3, 32, 5, 7}, {2, 64, 7, 7}}, 10);
  torch::manual_seed(5);
  for (const char* spec : {"cbam", "bam"}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{2, 16, 28, 28}, {3, 32, 5, 7}}) {
      for (bool cl : {false, true}) {
        auto m = make(spec, shape[1], 31);
        m.ptr()->train();
        std::ostringstream what;
        what << spec << " shape " << shape << " cl " << cl << " (narrow vector forms)";
        expect_training_form_matches(m, shape, cl, spec, what.str(), 1e-5);
      }
    }
  }
}

// The combine's own contract, without the module: gradients reach mc and ms in their shapes,
// and wrong sizes are refused with the shapes in the message.
TEST(FusedGates, BamCombineGradientsKeepTheGateShapes) {
  const auto x = torch::randn({2, 8, 4, 5}).requires_grad_();
  const auto mc = torch::randn({2, 8, 1, 1}).requires_grad_();
  const auto ms = torch::randn({2, 1, 4, 5}).requires_grad_();
  const auto y = fused_bam_combine_train(x, mc, ms, false);
  y.sum().backward();
  EXPECT_EQ(mc.grad().sizes(), mc.sizes());
  EXPECT_EQ(ms.grad().sizes(), ms.sizes());
  const auto s = torch::sigmoid(mc.detach() + ms.detach());
  EXPECT_TRUE(torch::allclose(x.grad(), 1 + s, 1e-5, 1e-6));
  EXPECT_THAT(error_of([&] { fused_bam_combine_train(x, mc, ms.narrow(3, 0, 4), false); }),
              HasSubstr("expected M_c with 16 and M_s with 40 elements"));
}

TEST(FusedGates, MacsAreCountedAsOnTheAtenPath) {
  for (const char* spec : {"se", "eca", "cbam", "cbam:kernel=3", "bam", "bam:rd=10"}) {
    auto m = make(spec, 64, 17);
    for (int64_t n : {1, 3, 9}) {
      const auto x = torch::randn({n, 64, 7, 5});
      SelectionGuard guard;
      dynattn::testing::set_dynattn_kernels(false);
      const int64_t aten = count_macs([&] { m.forward(x); }).macs;
      dynattn::testing::set_dynattn_kernels(true);
      const int64_t before = fused_gates_calls();
      const auto fused = count_macs([&] { m.forward(x); });
      EXPECT_EQ(fused_gates_calls(), before + 1) << spec;
      EXPECT_EQ(fused.macs, aten) << spec << " batch " << n;
      EXPECT_GT(fused.macs, 0) << spec;
      // BAM's spatial branch: inside the kernel, the lane kernels, or ATen's convolutions
      // (counted by ATen).
      if (std::string(spec).rfind("bam", 0) == 0) {
        const int64_t rd = std::string(spec) == "bam" ? 4 : 10;
        const bool in_kernel = bam_spatial_in_kernel(n, rd);
        const bool lanes = !in_kernel && bam_spatial_branch_pays_off(n, rd);
        EXPECT_EQ(fused.by_op.count("dynattn::bam_spatial_branch"), lanes ? 1u : 0u) << spec << n;
        EXPECT_EQ(fused.by_op.count("aten::convolution"), in_kernel || lanes ? 0u : 1u)
            << spec << n;
      }
    }
  }
}

TEST(FusedGates, ErrorsAreTheModulesOwn) {
  InferenceGuard inference;
  for (const char* spec : {"se", "eca", "cbam", "bam"}) {
    auto m = make(spec, 16, 18);
    const std::string name = std::string(spec) == "se"     ? "SE"
                             : std::string(spec) == "eca"  ? "ECA"
                             : std::string(spec) == "cbam" ? "CBAM"
                                                           : "BAM";
    EXPECT_THAT(error_of([&] {
                  m.forward(torch::zeros({2, 32, 4, 4}));
                }),
                HasSubstr(name + ": expected a 4-D input [N,C,H,W] with C=16, got [2, 32, 4, 4]"));
    EXPECT_THAT(error_of([&] {
                  m.forward(torch::zeros({2, 16, 4, 4}, torch::kInt));
                }),
                HasSubstr(name + ": expected a floating-point input"));
  }
}

TEST(FusedGates, ForwardWithMapsAgreesWithTheFusedForward) {
  for (const char* spec : {"se", "eca", "cbam", "bam"}) {
    auto m = make(spec, 32, 19);
    auto* maps = dynamic_cast<AttentionWithMaps*>(m.ptr().get());
    ASSERT_NE(maps, nullptr) << spec;
    InferenceGuard inference;
    const auto x = torch::randn({2, 32, 6, 7}).contiguous(torch::MemoryFormat::ChannelsLast);
    const int64_t before = fused_gates_calls();
    const auto with_maps = maps->forward_with_maps(x);
    EXPECT_EQ(fused_gates_calls(), before) << "forward_with_maps stays on the ATen path";
    const auto fused = m.forward<torch::Tensor>(x);
    EXPECT_TRUE(close_to_reference(fused, with_maps.output)) << spec;
  }
}

// Several threads: a batch splits across images, a single large image splits its channels,
// pixels and rows; the result must not depend on it.
TEST(FusedGates, ThreadSplitsGiveTheSameResult) {
  const int previous = at::get_num_threads();
  at::set_num_threads(4);
  for (const char* spec : {"se", "eca", "cbam", "cbam:max_first=false,spatial_bn=false", "bam",
                           "bam:product=true", "bam:rd=10"}) {
    expect_parity(spec, {{1, 64, 48, 40}, {3, 32, 20, 20}}, 20);
  }
  at::set_num_threads(previous);
}
