#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/dynamic/dynamic_output.h"
#include "dynattn/dynamic/execution.h"
#include "dynattn/dynamic/gate.h"
#include "dynattn/profile/mac_counter.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {
const torch::Device kCpu(torch::kCPU);

// A small branch with parameters: conv3x3 + ReLU + conv1x1 (no batch statistics, so mask and
// compact agree in training mode too).
struct Branch {
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(4, 6, 3).padding(1)};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(6, 4, 1)};
  torch::Tensor operator()(const torch::Tensor& x) { return conv2(conv1(x).relu()); }
  std::vector<torch::Tensor> parameters() const {
    auto p = conv1->parameters();
    for (const auto& q : conv2->parameters()) p.push_back(q);
    return p;
  }
};

// A grad that autograd left undefined (the work never ran) counts as zero.
torch::Tensor grad_or_zero(const torch::Tensor& p) {
  return p.grad().defined() ? p.grad().clone() : torch::zeros_like(p);
}

struct Run {
  torch::Tensor out, grad_x, grad_base, grad_weight;
  std::vector<torch::Tensor> grad_params;
};

Run run_mode(Branch& branch, const torch::Tensor& x0, const torch::Tensor& base0,
             const torch::Tensor& weight0, const GateDecision& proto, Combine combine,
             ExecutionMode mode, const torch::Tensor& upstream) {
  for (auto& p : branch.parameters()) p.mutable_grad() = torch::Tensor();
  auto x = x0.clone().requires_grad_(true);
  auto base = base0.clone().requires_grad_(true);
  GateDecision d = proto;
  torch::Tensor weight;
  if (weight0.defined()) {
    weight = weight0.clone().requires_grad_(true);
    d.weight = weight;
  }
  auto r =
      execute_gated([&](const torch::Tensor& in) { return branch(in); }, x, base, d, combine, mode);
  (r.output * upstream).sum().backward();
  Run run;
  run.out = r.output.detach();
  run.grad_x = grad_or_zero(x);
  run.grad_base = grad_or_zero(base);
  if (weight.defined()) run.grad_weight = grad_or_zero(weight);
  for (const auto& p : branch.parameters()) run.grad_params.push_back(grad_or_zero(p));
  return run;
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  EXPECT_TRUE(torch::allclose(a, b, 1e-5, 1e-5))
      << what << ": max |diff| " << (a - b).abs().max().item<double>();
}
}  // namespace

TEST(RowSelection, FromAHostMaskKnowsItsCountAndRows) {
  const auto mask = torch::tensor({1, 0, 1, 1, 0}).to(torch::kBool);
  const auto s = RowSelection::from_mask(mask, kCpu);
  EXPECT_EQ(s.batch(), 5);
  EXPECT_EQ(s.active(), 3);
  EXPECT_DOUBLE_EQ(s.fraction(), 0.6);
  EXPECT_TRUE(torch::equal(s.indices(), torch::tensor({0, 2, 3}, torch::kLong)));
  EXPECT_TRUE(torch::equal(s.host_mask(), mask));
  EXPECT_TRUE(RowSelection::all(4, kCpu).all_active());
  EXPECT_TRUE(RowSelection::none(4, kCpu).none_active());
  EXPECT_FALSE(RowSelection::none(4, kCpu).indices().defined()) << "nothing made on the device";
  EXPECT_TRUE(
      torch::equal(RowSelection::none(4, kCpu).host_mask(), torch::zeros({4}, torch::kBool)));
  // Any 0/1 dtype works.
  EXPECT_EQ(RowSelection::from_mask(torch::tensor({0.0, 1.0}), kCpu).active(), 1);
}

TEST(RowSelection, GatherAndScatterShortcutTheEdgeCases) {
  const auto x = torch::randn({3, 2});
  const auto all = RowSelection::all(3, kCpu);
  EXPECT_TRUE(gather_rows(x, all).is_same(x)) << "nothing to gather when every row is active";
  const auto none = RowSelection::none(3, kCpu);
  EXPECT_TRUE(scatter_add_rows(x, torch::zeros({0, 2}), none).is_same(x));
  EXPECT_TRUE(scatter_rows(x, torch::zeros({0, 2}), none).is_same(x));
  const auto some = RowSelection::from_mask(torch::tensor({false, true, false}), kCpu);
  const auto v = torch::ones({1, 2});
  EXPECT_TRUE(torch::equal(gather_rows(x, some), x.slice(0, 1, 2)));
  auto expected = x.clone();
  expected[1].add_(1);
  EXPECT_TRUE(torch::allclose(scatter_add_rows(x, v, some), expected));
  expected = x.clone();
  expected[1].fill_(1);
  EXPECT_TRUE(torch::equal(scatter_rows(x, v, some), expected));
}

// The row helpers work on each sample's block of memory: results keep the work's layout
// (channels-last included) and values and gradients equal ATen's index_select / index_add /
// index_copy, for dense and non-dense inputs alike.
TEST(RowSelection, GatherAndScatterKeepTheLayoutAndMatchATen) {
  torch::manual_seed(3);
  const auto cl = torch::MemoryFormat::ChannelsLast;
  const auto some = RowSelection::from_mask(torch::tensor({true, false, true, true, false}), kCpu);
  const auto idx = some.indices();
  const auto opts = torch::TensorOptions(torch::kDouble);
  const std::vector<std::pair<std::string, std::function<torch::Tensor(torch::Tensor)>>> layouts = {
      {"contiguous", [](torch::Tensor t) { return t.contiguous(); }},
      {"channels-last", [&](torch::Tensor t) { return t.contiguous(cl); }},
      {"permuted", [](torch::Tensor t) { return t.transpose(2, 3).contiguous().transpose(2, 3); }},
      {"non-dense", [](torch::Tensor t) {
         return torch::cat({t, t}, 3).slice(3, 0, 8, 2);
       }}};
  for (const auto& [x_name, x_layout] : layouts) {
    for (const auto& [v_name, v_layout] : layouts) {
      const std::string what = "x " + x_name + ", values " + v_name;
      const auto x0 = x_layout(torch::randn({5, 3, 4, 4}, opts)).detach().requires_grad_();
      const auto v0 = v_layout(torch::randn({3, 3, 4, 4}, opts)).detach().requires_grad_();
      const auto g = torch::randn({5, 3, 4, 4}, opts);
      const auto gv = torch::randn({3, 3, 4, 4}, opts);
      auto grads = [&](const torch::Tensor& out, const torch::Tensor& up) {
        return torch::autograd::grad({out}, {x0, v0}, {up}, true, false, true);
      };
      // gather
      const auto y = gather_rows(x0, some);
      EXPECT_TRUE(torch::equal(y, x0.index_select(0, idx))) << what;
      if (x_name == "channels-last") EXPECT_TRUE(y.is_contiguous(cl)) << what;
      const auto gy = torch::autograd::grad({y}, {x0}, {gv})[0];
      const auto gy_ref = torch::autograd::grad({x0.index_select(0, idx)}, {x0}, {gv})[0];
      EXPECT_TRUE(torch::equal(gy, gy_ref)) << what << ": gather gradient";
      // scatter-add, with alpha
      const auto s = scatter_add_rows(x0, v0, some, 0.5);
      EXPECT_TRUE(torch::allclose(s, x0.index_add(0, idx, v0, 0.5))) << what;
      if (v_name != "non-dense" && v_name != "permuted")
        EXPECT_EQ(s.suggest_memory_format(), v0.suggest_memory_format()) << what;
      auto gs = grads(s, g), gs_ref = grads(x0.index_add(0, idx, v0, 0.5), g);
      EXPECT_TRUE(torch::allclose(gs[0], gs_ref[0]) && torch::allclose(gs[1], gs_ref[1]))
          << what << ": scatter-add gradients";
      // scatter (replace)
      const auto r = scatter_rows(x0, v0, some);
      EXPECT_TRUE(torch::equal(r, x0.index_copy(0, idx, v0))) << what;
      auto gr = grads(r, g), gr_ref = grads(x0.index_copy(0, idx, v0), g);
      EXPECT_TRUE(torch::equal(gr[0], gr_ref[0]) && torch::equal(gr[1], gr_ref[1]))
          << what << ": scatter gradients";
    }
  }
  // Rows of a matrix (BranchyNet's logits) go through the same path.
  const auto logits = torch::randn({5, 10});
  EXPECT_TRUE(torch::equal(gather_rows(logits, some), logits.index_select(0, idx)));
}

TEST(RowSelection, ErrorsNameTheExpectation) {
  const auto some = RowSelection::from_mask(torch::tensor({false, true, true}), kCpu);
  EXPECT_THAT(error_of([&] {
                scatter_add_rows(torch::zeros({3, 2}), torch::zeros({1, 2}), some);
              }),
              HasSubstr("scatter_add_rows: expected 2 rows of values (one per active row), got 1"));
  EXPECT_THAT(error_of([&] {
                gather_rows(torch::zeros({4, 2}), some);
              }),
              HasSubstr("gather_rows: the selection is for 3 rows, the tensor has 4"));
  EXPECT_THAT(error_of([&] {
                RowSelection::from_mask(torch::zeros({2, 2}), kCpu);
              }),
              HasSubstr("RowSelection: expected a mask [N]"));
}

TEST(ExecutionMode, ParsesAndNamesTheContextOnError) {
  EXPECT_EQ(parse_execution_mode("mask", "x"), ExecutionMode::kMask);
  EXPECT_EQ(parse_execution_mode("compact", "x"), ExecutionMode::kCompact);
  EXPECT_STREQ(execution_mode_name(ExecutionMode::kCompact), "compact");
  EXPECT_THAT(error_of([] { parse_execution_mode("sparse", "model m option sd_exec"); }),
              HasSubstr("model m option sd_exec: unknown execution mode 'sparse' (known: mask, "
                        "compact)"));
}

// The shared execution rule: compact gives mask's outputs and gradients (input, base, the
// work's parameters, the per-row weight) for random decisions, all-active and none-active
// included, for both ways of combining.
TEST(ExecuteGated, CompactEqualsMaskWithGradients) {
  torch::manual_seed(0);
  Branch branch;
  const int64_t n = 7;
  int cases = 0;
  for (int trial = 0; trial < 12; ++trial) {
    const auto x = torch::randn({n, 4, 5, 5});
    const auto base = torch::randn({n, 4, 5, 5});
    const auto upstream = torch::randn({n, 4, 5, 5});
    torch::Tensor mask;
    if (trial == 0) {
      mask = torch::ones({n}, torch::kBool);
    } else if (trial == 1) {
      mask = torch::zeros({n}, torch::kBool);
    } else {
      mask = torch::rand({n}) < 0.2 + 0.06 * trial;
    }
    const auto weight = trial % 3 == 2 ? torch::rand({n}) + 0.5 : torch::Tensor();
    GateDecision d;
    d.rows = RowSelection::from_mask(mask, kCpu);
    d.scale = trial % 2 == 0 ? 1.0 : 1.0 / 0.7;
    for (Combine combine : {Combine::kAdd, Combine::kReplace}) {
      const std::string what = "trial " + std::to_string(trial) + " (" +
                               std::to_string(d.rows.active()) + " of 7 rows), " +
                               (combine == Combine::kAdd ? "add" : "replace");
      const auto m = run_mode(branch, x, base, weight, d, combine, ExecutionMode::kMask, upstream);
      const auto c =
          run_mode(branch, x, base, weight, d, combine, ExecutionMode::kCompact, upstream);
      expect_close(c.out, m.out, what + ": output");
      expect_close(c.grad_x, m.grad_x, what + ": grad x");
      expect_close(c.grad_base, m.grad_base, what + ": grad base");
      if (weight.defined()) expect_close(c.grad_weight, m.grad_weight, what + ": grad weight");
      for (size_t i = 0; i < m.grad_params.size(); ++i)
        expect_close(c.grad_params[i], m.grad_params[i],
                     what + ": grad parameter " + std::to_string(i));
      ++cases;
    }
  }
  EXPECT_EQ(cases, 24);
}

TEST(ExecuteGated, MaskComputesEveryRowCompactOnlyTheSelected) {
  const auto mask = torch::tensor({true, false, true, false});
  GateDecision d;
  d.rows = RowSelection::from_mask(mask, kCpu);
  int64_t rows_seen = -1;
  auto fn = [&](const torch::Tensor& in) {
    rows_seen = in.size(0);
    return in * 2;
  };
  const auto x = torch::randn({4, 3});
  auto m = execute_gated(fn, x, x, d, Combine::kAdd, ExecutionMode::kMask);
  EXPECT_EQ(rows_seen, 4);
  EXPECT_TRUE(m.ran.all().item<bool>());
  EXPECT_TRUE(torch::equal(m.used, mask));
  auto c = execute_gated(fn, x, x, d, Combine::kAdd, ExecutionMode::kCompact);
  EXPECT_EQ(rows_seen, 2);
  EXPECT_TRUE(torch::equal(c.ran, mask));
  EXPECT_TRUE(torch::allclose(c.output, m.output));
}

TEST(ExecuteGated, ADroppedPerBatchDecisionRunsNothingInEitherMode) {
  GateDecision d;
  d.rows = RowSelection::none(3, kCpu);
  d.per_batch = true;
  int calls = 0;
  auto fn = [&](const torch::Tensor& in) {
    ++calls;
    return in;
  };
  const auto x = torch::randn({3, 2});
  for (auto mode : {ExecutionMode::kMask, ExecutionMode::kCompact}) {
    auto r = execute_gated(fn, x, x, d, Combine::kAdd, mode, /*count_macs=*/true);
    EXPECT_TRUE(r.output.is_same(x));
    EXPECT_FALSE(r.ran.any().item<bool>());
    EXPECT_EQ(r.macs, 0);
  }
  EXPECT_EQ(calls, 0);
  d.rows = RowSelection::from_mask(torch::tensor({true, false, true}), kCpu);
  EXPECT_THAT(error_of([&] { execute_gated(fn, x, x, d, Combine::kAdd, ExecutionMode::kMask); }),
              HasSubstr("a per-batch decision selects every row or none, this one 2 of 3"));
}

TEST(ExecuteGated, CountsTheMacsOfTheRowsThatRan) {
  torch::nn::Linear linear(8, 5);
  auto fn = [&](const torch::Tensor& in) { return linear(in); };
  const auto x = torch::randn({6, 8});
  const auto base = torch::zeros({6, 5});
  GateDecision d;
  d.rows = RowSelection::from_mask(torch::tensor({1, 1, 0, 0, 0, 1}), kCpu);
  torch::NoGradGuard no_grad;
  EXPECT_EQ(execute_gated(fn, x, base, d, Combine::kAdd, ExecutionMode::kMask, true).macs,
            6 * 8 * 5);
  EXPECT_EQ(execute_gated(fn, x, base, d, Combine::kAdd, ExecutionMode::kCompact, true).macs,
            3 * 8 * 5);
}

TEST(ExecutionTrace, SplitsCountedMacsPerSample) {
  torch::nn::Linear shared(4, 4), work(4, 4);
  const auto x = torch::randn({4, 4});
  ExecutionTrace trace(4, /*count_macs=*/true);
  MacCounter total;
  torch::NoGradGuard no_grad;
  auto h = shared(x);
  GateDecision d;
  d.rows = RowSelection::from_mask(torch::tensor({1, 0, 0, 1}), kCpu);
  auto r = execute_gated([&](const torch::Tensor& in) { return work(in); }, h, h, d, Combine::kAdd,
                         ExecutionMode::kCompact, true);
  trace.add("g0", r);
  trace.add("g1", execute_gated([&](const torch::Tensor& in) { return work(in); }, r.output,
                                r.output, GateDecision::always(4, kCpu), Combine::kAdd,
                                ExecutionMode::kCompact, true));
  const auto out = trace.finish(r.output, ExecutionMode::kCompact, total.macs());
  EXPECT_EQ(out.counted_macs, 4 * 16 + 2 * 16 + 4 * 16);
  EXPECT_TRUE(torch::equal(out.macs, torch::tensor({48, 32, 32, 48}, torch::kLong)));
  EXPECT_EQ(out.macs.sum().item<int64_t>(), out.counted_macs);
  EXPECT_EQ(out.gate_macs, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(out.gates, (std::vector<std::string>{"g0", "g1"}));
  EXPECT_TRUE(
      torch::equal(out.executed.select(1, 0), torch::tensor({1, 0, 0, 1}).to(torch::kBool)));
  EXPECT_TRUE(out.executed.select(1, 1).all().item<bool>());
}

TEST(ExecutionStats, FractionsHistogramsAndJson) {
  DynamicOutput out;
  out.output = torch::zeros({4, 2});
  out.gates = {"a", "b"};
  out.executed = torch::tensor({1, 1, 1, 0, 0, 0, 1, 0}).to(torch::kBool).view({4, 2});
  out.macs = torch::tensor({10, 20, 30, 40}, torch::kLong);
  out.exit_index = torch::tensor({0, 2, 2, 1}, torch::kLong);
  out.exits = 3;
  ExecutionStats stats;
  stats.record(out);
  stats.record(out);
  EXPECT_EQ(stats.samples(), 8);
  EXPECT_DOUBLE_EQ(stats.gates().at("a").fraction(), 0.75);
  EXPECT_DOUBLE_EQ(stats.gates().at("b").fraction(), 0.25);
  EXPECT_DOUBLE_EQ(stats.fraction_executed(), 0.5);
  EXPECT_DOUBLE_EQ(stats.mean_macs(), 25.0);
  EXPECT_EQ(stats.histograms().at("units_used"), (std::vector<int64_t>{2, 4, 2}));
  EXPECT_EQ(stats.histograms().at("exit"), (std::vector<int64_t>{2, 2, 4}));
  EXPECT_THAT(stats.to_json(), HasSubstr("\"fraction_executed\":0.5"));
  EXPECT_THAT(error_of([&] { stats.add_histogram("exit", torch::tensor({3}), 3); }),
              HasSubstr("histogram exit takes values in [0, 3), got [3, 3]"));
  stats.reset();
  EXPECT_EQ(stats.samples(), 0);
}
