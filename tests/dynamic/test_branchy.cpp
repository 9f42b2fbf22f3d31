#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "branchy_test_util.h"
#include "dynattn/dynamic/branchy.h"
#include "dynattn/dynamic/branchy_calibration.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/models/registry.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/train/trainer.h"
#include "gradcheck.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

using dynattn::test_util::trained_looking;
using namespace dynattn::branchy_test;

TEST(BranchyEntropy, KnownValues) {
  const auto p = torch::tensor({0.2, 0.3, 0.5}, torch::kDouble);
  const double want = -(0.2 * std::log(0.2) + 0.3 * std::log(0.3) + 0.5 * std::log(0.5));
  EXPECT_NEAR(softmax_entropy(p.log()).item<double>(), want, 1e-12);
  // Uniform over K: log K; invariant to a shift of the logits.
  EXPECT_NEAR(softmax_entropy(torch::full({4}, 3.0, torch::kDouble)).item<double>(), std::log(4.0),
              1e-12);
  EXPECT_NEAR(softmax_entropy(p.log() + 5).item<double>(), want, 1e-12);
  // Confident: close to 0. Batched over rows.
  const auto batched = softmax_entropy(torch::tensor({{30.0, 0.0}, {0.0, 0.0}}, torch::kDouble));
  EXPECT_LT(batched[0].item<double>(), 1e-10);
  EXPECT_NEAR(batched[1].item<double>(), std::log(2.0), 1e-12);
}

TEST(BranchyEntropy, Gradcheck) {
  torch::manual_seed(0);
  auto x = torch::randn({3, 5}, torch::kDouble).requires_grad_();
  EXPECT_GRADCHECK([&] { return softmax_entropy(x); }, {x});
}

TEST(BranchyLoss, JointLossIsTheWeightedSum) {
  torch::manual_seed(1);
  std::vector<torch::Tensor> logits{torch::randn({6, 10}), torch::randn({6, 10}),
                                    torch::randn({6, 10})};
  const auto labels = torch::randint(0, 10, {6}, torch::kLong);
  const std::vector<double> w{1.0, 0.3, 0.5};
  double want = 0.0;
  for (size_t n = 0; n < 3; ++n) {
    // CE by hand: mean over rows of -log softmax at the label.
    const auto lp = torch::log_softmax(logits[n], 1);
    want += w[n] * -lp.gather(1, labels.view({6, 1})).mean().item<double>();
  }
  EXPECT_NEAR(branchy_joint_loss(logits, labels, w).item<double>(), want, 1e-5);
  EXPECT_THAT(error_of([&] { branchy_joint_loss(logits, labels, {1.0}); }),
              HasSubstr("3 exits but 1 exit weights"));
}

TEST(BranchyResNet, DefaultsFollowThePaper) {
  Model m = create_model("branchy_resnet56");
  auto net = branchy_of(m);
  EXPECT_EQ(net->side_exits(), 2);
  EXPECT_EQ(net->exit_after_blocks(), (std::vector<int64_t>{9, 18}));
  EXPECT_EQ(net->exit_weights(), (std::vector<double>{1.0, 0.3, 0.3}));
  EXPECT_EQ(net->thresholds(), (std::vector<double>{0.0, 0.0}));
  EXPECT_EQ(net->execution_mode(), ExecutionMode::kCompact);
  Model mid = create_model("branchy_resnet20:exits=1.1/2.0/3.1,exit_weights=1/1/1/1");
  EXPECT_EQ(branchy_of(mid)->exit_after_blocks(), (std::vector<int64_t>{2, 4, 8}));
  // Parameter names: the backbone's under "backbone.", heads under "exits.<i>.".
  const auto params = m.ptr()->named_parameters();
  EXPECT_TRUE(params.contains("backbone.layer1.0.conv1.weight"));
  EXPECT_TRUE(params.contains("exits.1.conv.weight"));
  EXPECT_EQ(params["exits.1.conv.weight"].size(1), 32);  // after stage 2: 32 channels
}

TEST(BranchyResNet, ErrorsNameTheOption) {
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:thresholds=0.1"); }),
              HasSubstr("option thresholds needs one threshold per side exit (2, option exits), "
                        "got 1"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exits=4"); }),
              HasSubstr("exit '4' after stage 4, but the network has stages 1..3"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exits=1.3"); }),
              HasSubstr("after block 3 of stage 1, but stages have blocks 0..2"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exits=3"); }),
              HasSubstr("is after the last block, where the last exit already is"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exits=2/1"); }),
              HasSubstr("in network order without repeats"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exits=x"); }),
              HasSubstr("expected 's' (after stage s) or 's.b'"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exit_weights=1/1"); }),
              HasSubstr("exit_weights needs one weight per exit including the last (3), got 2"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:thresholds=0.1/x"); }),
              HasSubstr("option thresholds: expected a list of numbers"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:thresholds=0.1/-1"); }),
              HasSubstr("threshold (option thresholds) must be >= 0, got -1"));
  EXPECT_THAT(error_of([] { create_model("branchy_resnet20:exec=sparse"); }),
              HasSubstr("BranchyNet option exec: unknown execution mode 'sparse'"));
}

TEST(BranchyResNet, CompactEqualsMask) {
  Model m = trained_looking("branchy_resnet20:exits=1.1/2/3.0", 7);
  auto net = branchy_of(m);
  const auto x = small_input(16);
  const auto cost = net->exit_macs({1, 12, 12});
  ASSERT_EQ(cost.size(), 4u);
  torch::manual_seed(11);
  std::vector<std::vector<double>> cases{{0, 0, 0}, {kInf, kInf, kInf}, {0, kInf, 0}, {kInf, 0, 0}};
  for (double q : {0.2, 0.5, 0.8}) cases.push_back(mid_thresholds(*net, x, q));
  for (int i = 0; i < 4; ++i) {
    const auto r = torch::rand({3}) * 2.3;
    cases.push_back({r[0].item<double>(), r[1].item<double>(), r[2].item<double>()});
  }
  for (const auto& t : cases) {
    SCOPED_TRACE(::testing::PrintToString(t));
    net->set_thresholds(t);
    const auto mask = run(*net, x, ExecutionMode::kMask);
    const auto compact = run(*net, x, ExecutionMode::kCompact);
    EXPECT_TRUE(torch::allclose(mask.output, compact.output, 1e-4, 1e-5));
    EXPECT_TRUE(torch::equal(mask.exit_index, compact.exit_index));
    EXPECT_TRUE(torch::equal(mask.executed, compact.executed));
    EXPECT_EQ(compact.exits, 4);
    // Compact: each sample pays for the prefix up to its exit; mask: every row for everything.
    const auto want = torch::tensor(cost, torch::kLong).index_select(0, mask.exit_index);
    EXPECT_TRUE(torch::equal(compact.macs, want));
    int64_t everything = 0;
    for (auto g : mask.gate_macs) everything += g;
    EXPECT_TRUE(torch::equal(mask.macs, torch::full({16}, everything / 16, torch::kLong)));
    EXPECT_EQ(compact.counted_macs, compact.macs.sum().item<int64_t>());
  }
}

TEST(BranchyResNet, ThresholdZeroIsThePlainNetwork) {
  Model m = trained_looking("branchy_resnet20", 7);
  auto net = branchy_of(m);
  const auto x = small_input();
  torch::NoGradGuard no_grad;
  const auto plain = net->backbone->forward(x);
  for (auto mode : {ExecutionMode::kMask, ExecutionMode::kCompact}) {
    const auto out = run(*net, x, mode);
    EXPECT_TRUE(torch::allclose(out.output, plain, 1e-5, 1e-6));
    EXPECT_TRUE(torch::equal(out.exit_index, torch::full({12}, 2, torch::kLong)));
    EXPECT_TRUE(torch::allclose(net->forward(x), plain, 1e-5, 1e-6));
  }
}

TEST(BranchyResNet, WithoutSideExitsIsThePlainNetwork) {
  Model m = trained_looking("branchy_resnet20:exits=none", 7);
  auto net = branchy_of(m);
  EXPECT_EQ(net->side_exits(), 0);
  EXPECT_EQ(net->exit_weights(), (std::vector<double>{1.0}));
  const auto x = small_input();
  torch::NoGradGuard no_grad;
  const auto plain = net->backbone->forward(x);
  for (auto mode : {ExecutionMode::kMask, ExecutionMode::kCompact}) {
    const auto out = run(*net, x, mode);
    EXPECT_TRUE(torch::allclose(out.output, plain, 1e-5, 1e-6));
    EXPECT_TRUE(torch::equal(out.exit_index, torch::zeros({12}, torch::kLong)));
    EXPECT_EQ(out.exits, 1);
  }
  const auto cost = net->exit_macs({1, 12, 12});
  ASSERT_EQ(cost.size(), 1u);
  EXPECT_EQ(cost[0], count_macs([&] { net->backbone->forward(x.slice(0, 0, 1)); }).macs);
}

TEST(BranchyResNet, ThresholdInfinityLeavesAtTheFirstExit) {
  Model m = trained_looking("branchy_resnet20:thresholds=inf/inf", 7);
  auto net = branchy_of(m);
  const auto x = small_input();
  torch::NoGradGuard no_grad;
  const auto first = net->forward_exits(x).front();
  for (auto mode : {ExecutionMode::kMask, ExecutionMode::kCompact}) {
    const auto out = run(*net, x, mode);
    EXPECT_TRUE(torch::allclose(out.output, first, 1e-5, 1e-6));
    EXPECT_TRUE(torch::equal(out.exit_index, torch::zeros({12}, torch::kLong)));
    // Only the stem, stage 1 and the first head ran in compact mode.
    if (mode == ExecutionMode::kCompact)
      EXPECT_EQ(out.executed.sum(0).gt(0).sum().item<int64_t>(), 2);
  }
}

TEST(BranchyResNet, PerSampleMacsEqualTheCountedPrefix) {
  Model m = trained_looking("branchy_resnet20:exits=1.1/2", 7);
  auto net = branchy_of(m);
  const auto x = small_input(1);
  torch::NoGradGuard no_grad;
  auto blocks = net->backbone->blocks();
  // The prefixes by hand: stem, blocks, the exit's head.
  auto prefix = [&](int64_t upto_blocks, const std::function<torch::Tensor(torch::Tensor)>& head) {
    return count_macs([&] {
             auto h = net->backbone->bn1(conv2d_forward(*net->backbone->conv1, x)).relu();
             for (int64_t i = 0; i < upto_blocks; ++i)
               h = blocks[static_cast<size_t>(i)]->forward(h);
             head(h);
           })
        .macs;
  };
  const auto head = [&](size_t i) {
    return [&, i](torch::Tensor h) { return net->exits->ptr<ExitHeadImpl>(i)->forward(h); };
  };
  const auto cost = net->exit_macs({1, 12, 12});
  // Exit 1 also paid for exit 0's head, the last exit for both heads.
  const int64_t head0 = prefix(2, head(0)) - prefix(2, [](torch::Tensor h) { return h; });
  const int64_t head1 = prefix(6, head(1)) - prefix(6, [](torch::Tensor h) { return h; });
  EXPECT_EQ(cost[0], prefix(2, head(0)));
  EXPECT_EQ(cost[1], prefix(6, head(1)) + head0);
  EXPECT_EQ(cost[2], prefix(9,
                            [&](torch::Tensor h) {
                              return net->backbone->fc(h.mean({2, 3}));
                            }) +
                         head0 + head1);
  // The full network alone, as a whole-model counter sees it.
  EXPECT_EQ(cost[2] - head0 - head1, count_macs([&] { net->backbone->forward(x); }).macs);
  EXPECT_GT(head0, 0);
}

TEST(BranchyResNet, CheckpointKeepsThresholds) {
  Model m = create_model("branchy_resnet20:thresholds=0.125/0.5,exec=mask");
  const auto dir = std::filesystem::temp_directory_path() / "dynattn_test_branchy_ckpt";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  save_checkpoint(dir.string(), *m.ptr(), nlohmann::json{{"model", m.spec}, {"epoch", 0}}.dump(),
                  {});
  Model back = load_checkpoint_model(dir.string());
  EXPECT_EQ(back.spec, m.spec);
  EXPECT_EQ(branchy_of(back)->thresholds(), (std::vector<double>{0.125, 0.5}));
  EXPECT_EQ(branchy_of(back)->execution_mode(), ExecutionMode::kMask);
  std::filesystem::remove_all(dir);
}

TEST(BranchyResNet, TrainerUsesTheJointLoss) {
  Model m = create_model("branchy_resnet20:exit_width=8");
  torch::manual_seed(2);
  InMemoryDataset data(torch::rand({16, 1, 12, 12}), torch::randint(0, 10, {16}, torch::kLong));
  auto net = branchy_of(m);
  // Before the step, in training mode (BN batch statistics over the same 16 images).
  auto copy = std::dynamic_pointer_cast<BranchyResNetImpl>(net->clone());
  copy->train();
  const auto want = copy->training_loss(data.images(), data.labels(), 0.0).first.item<double>();
  const auto plain =
      torch::nn::functional::cross_entropy(copy->forward(data.images()), data.labels())
          .item<double>();
  const auto result = train_model(
      m, data, nullptr,
      TrainOptions().epochs(1).batch_size(16).progress(0).optimizer(OptimizerOptions().lr(0.01)));
  ASSERT_EQ(result.history.size(), 1u);
  EXPECT_NEAR(result.history[0].train_loss, want, 1e-4);
  EXPECT_GT(std::abs(want - plain), 0.1);
  // clone() keeps the weights the forward uses: the copy computes what the original does.
  torch::NoGradGuard no_grad;
  auto again = std::dynamic_pointer_cast<BranchyResNetImpl>(net->clone());
  net->eval();
  again->eval();
  const auto probe = torch::rand({4, 1, 12, 12});
  EXPECT_TRUE(torch::allclose(net->forward(probe), again->forward(probe)));
  // The joint loss reaches the heads and the backbone.
  for (const auto& p : m.ptr()->named_parameters())
    if (p.key() == "exits.0.fc.weight" || p.key() == "backbone.conv1.weight")
      EXPECT_TRUE(p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0)
          << p.key();
}

namespace {
// One side exit, four samples: entropies 0.1, 0.2, 1.0, 2.0; the side exit is right on the
// first two, the last exit on the first three; leaving early costs 10 MACs, the last exit 30.
ExitScores hand_made_scores() {
  ExitScores s;
  s.entropy = torch::tensor({{0.1f, 0.2f, 1.0f, 2.0f}});
  s.correct = torch::tensor({1, 1, 0, 0, 1, 1, 1, 0}, torch::kBool).view({2, 4});
  s.exit_macs = {10, 30};
  return s;
}
}  // namespace

TEST(BranchyCalibration, ApplyThresholds) {
  const auto s = hand_made_scores();
  auto r = apply_thresholds(s, {0.5});
  EXPECT_DOUBLE_EQ(r.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(r.mean_macs, 20.0);
  EXPECT_EQ(r.exit_histogram, (std::vector<int64_t>{2, 2}));
  r = apply_thresholds(s, {kInf});
  EXPECT_DOUBLE_EQ(r.accuracy, 0.5);
  EXPECT_DOUBLE_EQ(r.mean_macs, 10.0);
  EXPECT_THAT(error_of([&] {
                apply_thresholds(s, {0.1, 0.2});
              }),
              HasSubstr("2 thresholds given, the model has 1 side exits"));
}

TEST(BranchyCalibration, PicksThresholdsMeetingTheTarget) {
  const auto s = hand_made_scores();
  // No accuracy drop allowed: the cheapest at 75% lets the two confident samples leave.
  auto c = calibrate_thresholds(s, CalibrationOptions().max_accuracy_drop(0.0));
  EXPECT_TRUE(c.met);
  EXPECT_DOUBLE_EQ(c.last_exit.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(c.chosen.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(c.chosen.mean_macs, 20.0);
  EXPECT_GT(c.chosen.thresholds[0], 0.2);
  EXPECT_LE(c.chosen.thresholds[0], 1.0);
  // 25 points allowed: everyone leaves early.
  c = calibrate_thresholds(s, CalibrationOptions().max_accuracy_drop(25.0));
  EXPECT_DOUBLE_EQ(c.chosen.mean_macs, 10.0);
  // A MAC budget: the most accurate within it.
  c = calibrate_thresholds(s, CalibrationOptions().target_macs(20.0));
  EXPECT_TRUE(c.met);
  EXPECT_DOUBLE_EQ(c.chosen.accuracy, 0.75);
  EXPECT_DOUBLE_EQ(c.chosen.mean_macs, 20.0);
  c = calibrate_thresholds(s, CalibrationOptions().target_macs(16.0));
  EXPECT_DOUBLE_EQ(c.chosen.mean_macs, 10.0);
  c = calibrate_thresholds(s, CalibrationOptions().target_macs(5.0));
  EXPECT_FALSE(c.met);
  // The front: cheapest first, accuracy rising.
  ASSERT_EQ(c.front.size(), 2u);
  EXPECT_DOUBLE_EQ(c.front[0].mean_macs, 10.0);
  EXPECT_DOUBLE_EQ(c.front[1].accuracy, 0.75);
  EXPECT_THAT(error_of([&] { calibrate_thresholds(s, CalibrationOptions()); }),
              HasSubstr("give exactly one target"));
}

TEST(BranchyCalibration, ThresholdListsRoundTrip) {
  EXPECT_EQ(format_thresholds({0.05, 0.2, kInf}), "0.05/0.2/inf");
  const double odd = 0.1234567891234;
  EXPECT_EQ(parse_threshold_lists(format_thresholds({odd, 0.0}), "t")[0],
            (std::vector<double>{odd, 0.0}));
  const auto lists = parse_threshold_lists("0.1/0.2; 0/inf", "thresholds");
  ASSERT_EQ(lists.size(), 2u);
  EXPECT_EQ(lists[1], (std::vector<double>{0.0, kInf}));
}

TEST(BranchyCalibration, PredictionsMatchTheInference) {
  Model m = trained_looking("branchy_resnet20", 7);
  auto net = branchy_of(m);
  torch::manual_seed(4);
  InMemoryDataset data(torch::rand({40, 1, 12, 12}), torch::randint(0, 10, {40}, torch::kLong));
  const auto scores = score_exits(*net, data, ScoreOptions().batch_size(16));
  ASSERT_EQ(scores.samples(), 40);
  const auto c = calibrate_thresholds(
      scores, CalibrationOptions().target_macs(0.5 * (scores.exit_macs[0] + scores.exit_macs[2])));
  net->set_thresholds(c.chosen.thresholds);
  for (auto mode : {ExecutionMode::kMask, ExecutionMode::kCompact}) {
    net->set_execution_mode(mode);
    const auto ev = evaluate_branchy(*net, data, ScoreOptions().batch_size(16));
    EXPECT_EQ(ev.count, 40);
    EXPECT_NEAR(ev.accuracy, c.chosen.accuracy, 1e-12);
    EXPECT_EQ(ev.exit_histogram, c.chosen.exit_histogram);
    if (mode == ExecutionMode::kCompact) {
      EXPECT_NEAR(ev.macs_mean, c.chosen.mean_macs, 1e-6 * c.chosen.mean_macs);
      EXPECT_LE(ev.macs_min, ev.macs_max);
    }
  }
}
