#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "dynattn/dynamic/stochastic_depth.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/reparam/deploy.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

using dynattn::test_util::trained_looking;
namespace {
CifarResNet resnet_of(const Model& m) {
  return CifarResNet(std::dynamic_pointer_cast<CifarResNetImpl>(m.ptr()));
}

torch::Tensor grad_or_zero(const torch::Tensor& p) {
  return p.grad().defined() ? p.grad() : torch::zeros_like(p);
}

void expect_schedule(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "block " << i;
}
}  // namespace

TEST(StochasticDepthSchedule, Values) {
  // The paper: p_l = 1 - (l / L)(1 - p_L), l = 1..L.
  expect_schedule(survival_schedule("linear", 4, 0.5), {0.875, 0.75, 0.625, 0.5});
  const auto r110 = survival_schedule("linear", 54, 0.5);
  EXPECT_NEAR(r110.front(), 1.0 - 0.5 / 54, 1e-12);
  EXPECT_NEAR(r110.back(), 0.5, 1e-12);
  expect_schedule(survival_schedule("uniform", 3, 0.8), {0.8, 0.8, 0.8});
  // timm: drop rates linspace(0, 1 - p_L, L): block 0 never drops.
  expect_schedule(survival_schedule("timm", 5, 0.5), {1.0, 0.875, 0.75, 0.625, 0.5});
  expect_schedule(survival_schedule("timm", 1, 0.5), {1.0});
  expect_schedule(survival_schedule("none", 2, 0.5), {1.0, 1.0});
  expect_schedule(survival_schedule("linear", 2, 1.0), {1.0, 1.0});
}

TEST(StochasticDepthSchedule, ErrorsNameTheOption) {
  EXPECT_THAT(error_of([] { survival_schedule("linear", 3, 0.0); }),
              HasSubstr("survival probability (option sd_p) must be in (0, 1], got 0"));
  EXPECT_THAT(error_of([] { create_model("resnet20:sd=linear,sd_p=1.5"); }),
              HasSubstr("(option sd_p) must be in (0, 1], got 1.5"));
  EXPECT_THAT(
      error_of([] { create_model("resnet20:sd=cosine"); }),
      HasSubstr("unknown schedule 'cosine' (option sd; known: none, linear, uniform, timm)"));
  EXPECT_THAT(error_of([] { create_model("resnet20:sd=linear,sd_mode=layer"); }),
              HasSubstr("unknown mode 'layer' (option sd_mode; known: batch, sample)"));
  EXPECT_THAT(error_of([] { create_model("resnet20:sd=linear,sd_exec=sparse"); }),
              HasSubstr("stochastic depth option sd_exec: unknown execution mode 'sparse'"));
  EXPECT_THAT(error_of([] { create_model("resnet20:sd=linear,sd_test=half"); }),
              HasSubstr("unknown test-time convention 'half' (option sd_test"));
}

TEST(StochasticDepth, SpecOptionsReachTheGates) {
  Model m = create_model("resnet56:sd=timm,sd_p=0.8,sd_mode=sample,sd_exec=compact");
  EXPECT_EQ(m.spec, "resnet56:sd=timm,sd_exec=compact,sd_mode=sample,sd_p=0.8");
  auto net = resnet_of(m);
  const auto& gates = net->stochastic_depth_gates();
  ASSERT_EQ(gates.size(), 27u);
  EXPECT_EQ(gates.front().name(), "layer1.0");
  EXPECT_EQ(gates.back().name(), "layer3.8");
  EXPECT_DOUBLE_EQ(gates.front().survival(), 1.0);
  EXPECT_NEAR(gates.back().survival(), 0.8, 1e-12);
  EXPECT_EQ(gates.back().granularity(), DropGranularity::kSample);
  EXPECT_EQ(gates.back().test_time(), TestTimeScaling::kIdentity);
  EXPECT_EQ(net->execution_mode(), ExecutionMode::kCompact);
  net->set_execution_mode(ExecutionMode::kMask);
  auto copy = std::dynamic_pointer_cast<CifarResNetImpl>(net->clone());
  EXPECT_EQ(copy->execution_mode(), ExecutionMode::kMask);
  // The paper's convention is the default of per-batch dropping.
  EXPECT_EQ(resnet_of(create_model("resnet20:sd=linear"))->stochastic_depth_gates()[0].test_time(),
            TestTimeScaling::kScale);
}

// E[training output] = test-time output for a linear branch, in every semantics and mode: the
// mean over many draws (fixed seed) against a bound of six standard deviations of that mean.
TEST(StochasticDepth, TestTimeOutputIsTheMeanOfTrainingOutputs) {
  struct Case {
    DropGranularity granularity;
    TestTimeScaling test_time;
    ExecutionMode mode;
  };
  const std::vector<Case> cases = {
      {DropGranularity::kBatch, TestTimeScaling::kScale, ExecutionMode::kMask},
      {DropGranularity::kBatch, TestTimeScaling::kIdentity, ExecutionMode::kCompact},
      {DropGranularity::kSample, TestTimeScaling::kIdentity, ExecutionMode::kMask},
      {DropGranularity::kSample, TestTimeScaling::kIdentity, ExecutionMode::kCompact},
      {DropGranularity::kSample, TestTimeScaling::kScale, ExecutionMode::kCompact},
  };
  const double p = 0.3;
  const int draws = 4000;
  torch::manual_seed(3);
  const auto w = torch::randn({6, 6}, torch::kDouble);
  const auto x = torch::randn({5, 6}, torch::kDouble);
  auto branch = [&](const torch::Tensor& in) { return in.matmul(w); };
  const double f_max = branch(x).abs().max().item<double>();
  for (const auto& c : cases) {
    StochasticDepthGate gate("toy", p, c.granularity, c.test_time, c.mode);
    auto sum = torch::zeros_like(x);
    for (int i = 0; i < draws; ++i) sum += gate.run(branch, x, x, /*training=*/true).output;
    const auto mean = sum / draws;
    const auto test = gate.run(branch, x, x, /*training=*/false).output;
    const bool inverted = c.test_time == TestTimeScaling::kIdentity;
    EXPECT_TRUE(torch::allclose(test, x + branch(x) * (inverted ? 1.0 : p)));
    const double sigma = std::sqrt(p * (1 - p) / draws) / (inverted ? p : 1.0) * f_max;
    const double diff = (mean - test).abs().max().item<double>();
    EXPECT_LE(diff, 6 * sigma) << "granularity " << static_cast<int>(c.granularity)
                               << ", test_time " << static_cast<int>(c.test_time);
    // ... while the other convention's test output is far off.
    const auto other = x + branch(x) * (inverted ? p : 1.0);
    EXPECT_GT((mean - other).abs().max().item<double>(), 10 * sigma);
  }
}

// The paper's per-mini-batch gate: a dropped block's forward is not executed (the MAC counter
// does not see it) and no gradient reaches its parameters.
TEST(StochasticDepth, PerBatchGateReallySkipsDroppedBlocks) {
  torch::manual_seed(0);
  Model m = create_model("resnet20:sd=uniform,sd_p=0.5");
  auto net = resnet_of(m);
  const auto x = torch::randn({4, 1, 28, 28});
  net->eval();
  DynamicOutput full;
  {
    torch::NoGradGuard no_grad;
    full = net->forward_dynamic(x);
  }
  EXPECT_TRUE(full.executed.all().item<bool>()) << "test time runs every block (scaled by p)";
  EXPECT_EQ(full.counted_macs, count_macs([&] { m.forward(x); }).macs);
  net->train();
  DynamicOutput out;
  std::vector<bool> kept;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    torch::manual_seed(seed);
    for (auto& p : net->parameters()) p.mutable_grad() = torch::Tensor();
    out = net->forward_dynamic(x);
    kept.clear();
    for (int64_t g = 0; g < out.executed.size(1); ++g) {
      const auto column = out.executed.select(1, g);
      EXPECT_TRUE(column.all().item<bool>() || !column.any().item<bool>())
          << "one decision per mini-batch";
      kept.push_back(column.all().item<bool>());
    }
    const auto n_kept = std::count(kept.begin(), kept.end(), true);
    if (n_kept > 0 && n_kept < static_cast<int64_t>(kept.size())) break;
  }
  int64_t expected = full.counted_macs;
  for (size_t g = 0; g < kept.size(); ++g) {
    if (kept[g]) {
      EXPECT_EQ(out.gate_macs[g], full.gate_macs[g]);
    } else {
      EXPECT_EQ(out.gate_macs[g], 0) << out.gates[g];
      expected -= full.gate_macs[g];
    }
  }
  EXPECT_EQ(out.counted_macs, expected);
  out.output.pow(2).mean().backward();
  auto blocks = net->blocks();
  for (size_t g = 0; g < blocks.size(); ++g) {
    for (const auto& p : blocks[g]->conv1->parameters()) {
      EXPECT_EQ(p.grad().defined(), static_cast<bool>(kept[g])) << out.gates[g];
    }
    for (const auto& p : blocks[g]->bn2->parameters()) {
      EXPECT_EQ(p.grad().defined(), static_cast<bool>(kept[g])) << out.gates[g];
    }
  }
}

// timm's drop path in compact mode gives mask mode's outputs and gradients; BatchNorm in eval
// mode (in training mode compact normalises over the kept rows only, see dynamic/execution.h).
TEST(StochasticDepth, DropPathCompactEqualsMaskWithGradients) {
  const auto x0 = torch::randn({6, 1, 28, 28});
  const auto upstream = torch::randn({6, 10});
  struct Result {
    DynamicOutput out;
    torch::Tensor grad_x;
    std::vector<torch::Tensor> grads;
  };
  auto run = [&](const std::string& exec) {
    torch::manual_seed(1);
    Model m = create_model("resnet20:sd=linear,sd_p=0.5,sd_mode=sample,sd_exec=" + exec);
    auto net = resnet_of(m);
    net->train();
    for (auto& module : net->modules())
      if (module->as<torch::nn::BatchNorm2d>()) module->eval();
    auto x = x0.clone().requires_grad_(true);
    torch::manual_seed(7);
    Result r;
    r.out = net->forward_dynamic(x);
    (r.out.output * upstream).sum().backward();
    r.grad_x = x.grad();
    for (const auto& p : net->parameters()) r.grads.push_back(grad_or_zero(p));
    return r;
  };
  const auto mask = run("mask");
  const auto compact = run("compact");
  EXPECT_TRUE(torch::equal(mask.out.executed, compact.out.executed));
  EXPECT_FALSE(mask.out.executed.all().item<bool>()) << "some rows must drop some blocks";
  EXPECT_TRUE(torch::allclose(compact.out.output, mask.out.output, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(compact.grad_x, mask.grad_x, 1e-5, 1e-5));
  ASSERT_EQ(compact.grads.size(), mask.grads.size());
  for (size_t i = 0; i < mask.grads.size(); ++i)
    EXPECT_TRUE(torch::allclose(compact.grads[i], mask.grads[i], 1e-5, 1e-5)) << "parameter " << i;
  // Mask computes every block for every row; compact only what each row uses.
  const int64_t n = x0.size(0);
  EXPECT_EQ(mask.out.macs.min().item<int64_t>(), mask.out.macs.max().item<int64_t>());
  for (int64_t i = 0; i < n; ++i) {
    int64_t expected = mask.out.macs[i].item<int64_t>();
    for (size_t g = 0; g < mask.out.gates.size(); ++g)
      if (!mask.out.executed[i][static_cast<int64_t>(g)].item<bool>())
        expected -= mask.out.gate_macs[g] / n;
    EXPECT_EQ(compact.out.macs[i].item<int64_t>(), expected) << "sample " << i;
  }
}

TEST(StochasticDepth, EvalUsesTheTestTimeSemantics) {
  const auto x = torch::randn({3, 1, 28, 28});
  torch::NoGradGuard no_grad;
  // Drop path (timm): the identity at test, i.e. the plain network.
  Model timm = trained_looking("resnet20:sd=linear,sd_mode=sample");
  Model plain = create_model("resnet20");
  load_state_dict(*plain.ptr(), state_dict(*timm.ptr()), "test");
  plain.ptr()->eval();
  EXPECT_TRUE(torch::equal(timm.forward(x), plain.forward(x)));
  // The paper: every residual multiplied by its p_l, computed here by hand.
  Model paper = trained_looking("resnet20:sd=linear");
  auto net = resnet_of(paper);
  auto h = torch::relu(net->bn1(net->conv1(x)));
  auto blocks = net->blocks();
  for (size_t i = 0; i < blocks.size(); ++i) {
    const double p = 1.0 - (static_cast<double>(i + 1) / 9.0) * 0.5;
    h = torch::relu(blocks[i]->shortcut(h) + p * blocks[i]->residual(h));
  }
  const auto reference = net->fc(h.mean({2, 3}));
  EXPECT_TRUE(torch::allclose(paper.forward(x), reference, 1e-5, 1e-5));
  EXPECT_FALSE(torch::allclose(plain.forward(x), reference, 1e-3, 1e-3));
}

TEST(StochasticDepth, DeployTurnsThePapersScalingIntoTheWeights) {
  Model m = trained_looking("resnet20:sd=linear");
  const auto x = torch::randn({2, 1, 28, 28});
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = m.forward(x);
  }
  const auto r = deploy(m, {2, 1, 28, 28});
  EXPECT_LE(r.max_abs_diff, 1e-5 * std::max(1.0, r.output_scale));
  EXPECT_EQ(m.spec, "resnet20:deployed=true,sd=linear,sd_test=identity");
  EXPECT_EQ(r.merged.front(), "conv1+bn1");
  EXPECT_THAT(r.merged[1], HasSubstr("layer1.0: bn2 * p_l (0.9444"));
  EXPECT_EQ(r.merged.size(), 21u + 9u);
  // A checkpoint of the result reloads with the identity at test.
  Model rebuilt = create_model(m.spec);
  load_state_dict(*rebuilt.ptr(), state_dict(*m.ptr()), "deployed");
  rebuilt.ptr()->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(rebuilt.forward(x), before, 1e-5, 1e-5));
  EXPECT_TRUE(deploy(m, {2, 1, 28, 28}).merged.empty()) << "idempotent";
}

TEST(StochasticDepth, SurvivalScalingOfAFoldedModelScalesConv2) {
  Model m = trained_looking("resnet20:sd=linear");
  auto net = resnet_of(m);
  const auto x = torch::randn({2, 1, 28, 28});
  torch::NoGradGuard no_grad;
  const auto before = m.forward(x);
  for (auto& block : net->blocks()) block->reparameterize();  // conv+BN folded, scaling not
  EXPECT_TRUE(torch::allclose(m.forward(x), before, 1e-5, 1e-5));
  const auto scaled = net->fold_survival_scaling();
  ASSERT_EQ(scaled.size(), 9u);
  EXPECT_THAT(scaled[0], HasSubstr("layer1.0: conv2 * p_l"));
  EXPECT_EQ(net->options.stochastic_depth().test_time(), "identity");
  EXPECT_TRUE(torch::allclose(m.forward(x), before, 1e-5, 1e-5));
  EXPECT_TRUE(net->fold_survival_scaling().empty());
}

TEST(StochasticDepth, AttentionBlocksKeepTheScalingAtRunTime) {
  Model m = trained_looking("se_resnet20:width=8,sd=linear");
  const auto r = deploy(m, {2, 1, 28, 28});
  EXPECT_LE(r.max_abs_diff, 1e-5 * std::max(1.0, r.output_scale));
  EXPECT_EQ(m.spec, "se_resnet20:deployed=true,sd=linear,width=8");
  for (const auto& merge : r.merged) EXPECT_EQ(merge.find("p_l"), std::string::npos) << merge;
}
