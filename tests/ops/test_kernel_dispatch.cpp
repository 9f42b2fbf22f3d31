// The kernel dispatch (ops/dispatch.h): the CPU and the policy, the table `--kernels list` prints,
// and one harness (after ggml's test-backend-ops) that walks every candidate of every dispatched
// op against the op's ATen form computed in double, on random shapes, forward and (for the
// candidates that train) backward. A candidate this CPU or policy rules out is reported as
// skipped by name; one that never applied to the harness's problems fails.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../attention_channel/channel_test_util.h"
#include "dynattn/attention/bam.h"
#include "dynattn/attention/cbam.h"
#include "dynattn/attention/efficient_channel_attention.h"
#include "dynattn/attention/squeeze_excitation.h"
#include "dynattn/core/compat.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "kernel_policy.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using dynattn::test_util::max_rel;
using dynattn::test_util::randomize;
using ::testing::HasSubstr;

namespace {

// ---- The CPU, the policy and the table ----

TEST(KernelDispatch, CpuCapabilityIsConsistent) {
  const auto& cpu = cpu_capability();
  EXPECT_FALSE(cpu.model.empty());
  EXPECT_TRUE(cpu.onednn_block == 8 || cpu.onednn_block == 16) << cpu.describe();
  if (cpu.avx512) EXPECT_TRUE(cpu.avx2) << cpu.describe();
  // A cap without AVX512 in it rules the 16-float forms out (ctest's avx2 run sets one).
  if (!cpu.isa_limit.empty() && cpu.isa_limit.find("AVX512") == std::string::npos)
    EXPECT_FALSE(cpu.avx512) << cpu.describe();
  EXPECT_EQ(&cpu, &cpu_capability()) << "read once";
}

TEST(KernelDispatch, PolicyGuardRestores) {
  const auto before = kernel_policy();
  {
    KernelPolicy p;
    p.dynattn = false;
    p.wide_vectors = false;
    p.winograd = WinogradPolicy::kNever;
    KernelPolicyGuard guard(p);
    EXPECT_FALSE(kernel_policy().dynattn);
    EXPECT_FALSE(dynattn_kernels_enabled());
    EXPECT_FALSE(wide_vector_kernels_run());
    EXPECT_EQ(kernel_policy().winograd, WinogradPolicy::kNever);
  }
  EXPECT_EQ(kernel_policy().dynattn, before.dynattn);
  EXPECT_EQ(kernel_policy().wide_vectors, before.wide_vectors);
  EXPECT_EQ(kernel_policy().winograd, before.winograd);
}

TEST(KernelDispatch, EveryOpEndsWithTheAtenFormOrAFallbackAndAtenRulesOutTheRest) {
  dynattn::testing::PolicyRestorer restore;
  for (const auto& op : kernel_ops()) {
    ASSERT_GE(op.candidates.size(), 2u) << op.name;
    EXPECT_TRUE(op.candidates.back().available()) << op.name << ": the last always runs";
    EXPECT_EQ(&kernel_op(op.name), &op);
  }
  dynattn::testing::set_dynattn_kernels(false);
  for (const auto& op : kernel_ops()) {
    if (op.candidates.back().name != "aten") continue;
    for (size_t i = 0; i + 1 < op.candidates.size(); ++i)
      EXPECT_STREQ(op.candidates[i].why_not(), "--kernels aten")
          << op.name << "/" << op.candidates[i].name;
  }
  EXPECT_THAT(error_of([] { kernel_op("no_such_op"); }), HasSubstr("no op named 'no_such_op'"));
}

TEST(KernelDispatch, ListReportNamesTheCpuAndEveryCandidate) {
  const auto report = kernel_list_report();
  EXPECT_THAT(report, HasSubstr("CPU: " + cpu_capability().describe()));
  for (const auto& op : kernel_ops()) {
    EXPECT_THAT(report, HasSubstr("\n" + op.name + ": ")) << op.name;
    for (const auto& c : op.candidates) EXPECT_THAT(report, HasSubstr(c.name)) << op.name;
  }
  if (!cpu_capability().avx512 && cpu_capability().isa_limit.empty())
    EXPECT_THAT(report, HasSubstr("vec16 (this CPU has no AVX-512)"));
}

TEST(KernelDispatch, ForcedCandidatesRefuseWhenUnavailableOrNotApplicable) {
  dynattn::testing::PolicyRestorer restore;
  const auto module = create_attention("se", 16).ptr();
  auto* se = module->as<SqueezeExcitationImpl>();
  ASSERT_NE(se, nullptr);
  se->eval();
  const auto x = torch::randn({2, 16, 5, 5});
  {
    InferenceGuard inference;
    EXPECT_EQ(se->kernel_for(x), "fused");
    dynattn::testing::set_dynattn_kernels(false);
    EXPECT_EQ(se->kernel_for(x), "aten");
    EXPECT_THAT(error_of([&] { se->forward_with("fused", x); }),
                HasSubstr("se/fused is not available here: --kernels aten"));
    dynattn::testing::set_dynattn_kernels(true);
  }
  const auto xg = x.clone().requires_grad_();
  EXPECT_EQ(se->kernel_for(xg), "fused_train");
  EXPECT_THAT(error_of([&] { se->forward_with("fused", x.to(torch::kDouble)); }),
              HasSubstr("se/fused does not apply to these arguments"));
  EXPECT_THAT(error_of([&] { se->forward_with("vec16", x); }),
              HasSubstr("op se has no candidate 'vec16'"));
}

// ---- The harness ----

// One problem of an op: a module (or conv) and an input; `grad`: run under autograd and compare
// the gradients of the input and of every parameter too.
struct Problem {
  std::string what;
  std::shared_ptr<torch::nn::Module> module;
  torch::Tensor x;
  bool grad = false;
};

// How to run a candidate by name on a problem's module.
using Runner =
    std::function<torch::Tensor(torch::nn::Module&, const std::string&, const torch::Tensor&)>;

struct HarnessCase {
  std::function<std::vector<Problem>()> problems;
  Runner run;
  // Of the float candidate against the double ATen form, relative to the reference's scale
  // (ATen's own float form: 10x that). BAM's: its batch-statistics BN gradients cancel in float.
  double tolerance;
};

// Random shapes: batch, channels, height, width, both layouts, inference and training.
std::vector<Problem> attention_problems(const std::string& spec) {
  std::mt19937 rng(7);
  std::vector<Problem> out;
  const int64_t batches[] = {1, 3, 9};
  const int64_t channels[] = {16, 32, 64};
  for (int i = 0; i < 6; ++i) {
    const int64_t n = batches[i % 3], c = channels[(i / 2) % 3];
    const int64_t h = 3 + static_cast<int64_t>(rng() % 12),
                  w = 3 + static_cast<int64_t>(rng() % 12);
    for (const bool cl : {false, true}) {
      for (const bool grad : {false, true}) {
        // Training BN needs two values per channel: BAM's channel gate normalises [N, rd].
        const int64_t batch = grad ? std::max<int64_t>(n, 2) : n;
        auto m = create_attention(spec, c).ptr();
        randomize(*m, 100 + i);
        grad ? m->train() : m->eval();
        auto x = torch::randn({batch, c, h, w});
        if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        std::ostringstream what;
        what << spec << " x " << x.sizes() << (cl ? " channels-last" : "")
             << (grad ? " training" : " inference");
        out.push_back({what.str(), m, x, grad});
      }
    }
  }
  return out;
}

template <class Impl>
Runner module_runner() {
  return [](torch::nn::Module& m, const std::string& kernel, const torch::Tensor& x) {
    auto* impl = m.as<Impl>();
    EXPECT_NE(impl, nullptr);
    return impl->forward_with(kernel, x);
  };
}

std::vector<Problem> conv_problems() {
  std::vector<Problem> out;
  // (channels, size, batch): the first two where oneDNN takes over from im2col at batch 1, then
  // a batch where it does not.
  const int64_t shapes[][3] = {{16, 28, 1}, {64, 14, 1}, {32, 14, 4}};
  for (const auto& s : shapes) {
    for (const bool cl : {false, true}) {
      torch::manual_seed(s[0] + s[1]);
      auto conv = std::make_shared<torch::nn::Conv2dImpl>(
          torch::nn::Conv2dOptions(s[0], s[0], 3).padding(1).bias(true));
      auto x = torch::randn({s[2], s[0], s[1], s[1]});
      if (cl) {
        x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));
      }
      std::ostringstream what;
      what << "conv 3x3 x " << x.sizes() << (cl ? " channels-last" : "");
      out.push_back({what.str(), conv, x, false});
    }
  }
  return out;
}

const std::map<std::string, HarnessCase>& harness_cases() {
  static const std::map<std::string, HarnessCase> cases = {
      {"se",
       {[] { return attention_problems("se"); }, module_runner<SqueezeExcitationImpl>(), 1e-4}},
      {"eca",
       {[] { return attention_problems("eca"); }, module_runner<EfficientChannelAttentionImpl>(),
        1e-4}},
      {"cbam", {[] { return attention_problems("cbam"); }, module_runner<CBAMImpl>(), 1e-4}},
      {"bam", {[] { return attention_problems("bam"); }, module_runner<BAMImpl>(), 2e-3}},
      {"bam_spatial_gate",
       {[] { return attention_problems("bam"); },
        [](torch::nn::Module& m, const std::string& kernel, const torch::Tensor& x) {
          return m.as<BAMImpl>()->spatial_att->forward_with(kernel, x);
        },
        2e-3}},
      {"conv2d_inference",
       {conv_problems,
        [](torch::nn::Module& m, const std::string& kernel, const torch::Tensor& x) {
          return conv2d_forward_with(kernel, *m.as<torch::nn::Conv2dImpl>(), x);
        },
        1e-4}},
  };
  return cases;
}

// The output and, under autograd, the gradients of x and of every parameter for a fixed random
// output gradient. Runs on a copy of the module (training BN updates its statistics).
std::vector<torch::Tensor> outcome(const HarnessCase& hc, const Problem& p,
                                   const std::string& kernel, torch::Dtype dtype) {
  auto m = p.module->clone();
  m->to(dtype);
  auto x = p.x.to(dtype).clone();  // a leaf of its own, in the problem's memory format
  if (!p.grad) {
    InferenceGuard inference;
    return {hc.run(*m, kernel, x)};
  }
  x.requires_grad_(true);
  auto y = hc.run(*m, kernel, x);
  torch::manual_seed(3);
  // Drawn in double whatever the dtype: the same output gradient for the candidate and the
  // reference.
  const auto dy = torch::randn(y.sizes(), torch::kDouble).to(y.dtype());
  (y * dy).sum().backward();
  std::vector<torch::Tensor> out = {y.detach(), x.grad()};
  for (const auto& param : m->parameters())
    out.push_back(param.grad().defined() ? param.grad() : torch::zeros_like(param));
  return out;
}

struct OpCandidate {
  std::string op, candidate;
};
void PrintTo(const OpCandidate& c, std::ostream* os) {
  *os << c.op << "/" << c.candidate;
}

std::vector<OpCandidate> dispatched_candidates() {
  std::vector<OpCandidate> out;
  for (const auto& op : kernel_ops())
    if (op.dispatched)
      for (const auto& c : op.candidates) out.push_back({op.name, c.name});
  return out;
}

TEST(KernelHarness, EveryDispatchedOpHasACase) {
  for (const auto& op : kernel_ops()) {
    if (op.dispatched) EXPECT_EQ(harness_cases().count(op.name), 1u) << op.name;
  }
}

class KernelHarness : public ::testing::TestWithParam<OpCandidate> {};

TEST_P(KernelHarness, MatchesTheAtenFormInDouble) {
  const auto& [op, candidate] = GetParam();
  const auto& info = kernel_op(op);
  const auto& entry = *std::find_if(info.candidates.begin(), info.candidates.end(),
                                    [&](const KernelCandidate& c) { return c.name == candidate; });
  if (const char* why = entry.why_not()) GTEST_SKIP() << op << "/" << candidate << ": " << why;
  const auto it = harness_cases().find(op);
  ASSERT_NE(it, harness_cases().end()) << op;
  const auto& hc = it->second;
  int ran = 0;
  for (const auto& p : hc.problems()) {
    std::vector<torch::Tensor> got;
    try {
      got = outcome(hc, p, candidate, torch::kFloat);
    } catch (const c10::Error& e) {
      // Not this candidate's problem: the dispatch would not take it here.
      ASSERT_THAT(e.what_without_backtrace(), HasSubstr("does not apply")) << p.what;
      continue;
    }
    ++ran;
    const auto want = outcome(hc, p, "aten", torch::kDouble);
    // A candidate may be off the double reference by as much as ATen's own float form is, in
    // each result (a gradient that is zero in exact arithmetic, such as a conv bias before a
    // batch-statistics BN, is float noise in both), or by the op's tolerance.
    const auto aten_float = candidate == "aten" ? got : outcome(hc, p, "aten", torch::kFloat);
    ASSERT_EQ(got.size(), want.size()) << p.what;
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].sizes(), want[i].sizes()) << p.what << " result " << i;
      const double bound = candidate == "aten"
                               ? 10 * hc.tolerance
                               : std::max(hc.tolerance, 3 * max_rel(aten_float[i], want[i]));
      EXPECT_LE(max_rel(got[i], want[i]), bound)
          << op << "/" << candidate << " on " << p.what << ": result " << i
          << (i == 0   ? " (output)"
              : i == 1 ? " (input gradient)"
                       : " (a parameter gradient)");
    }
  }
  EXPECT_GT(ran, 0) << op << "/" << candidate << " applied to none of the harness's problems";
}

INSTANTIATE_TEST_SUITE_P(Dispatched, KernelHarness, ::testing::ValuesIn(dispatched_candidates()),
                         [](const ::testing::TestParamInfo<OpCandidate>& info) {
                           return info.param.op + "_" + info.param.candidate;
                         });

}  // namespace
