// DeepRebirth merges of InceptionNet: the exact merges reproduce the original stage outputs on
// random weights and BN statistics, the strided merges have the right shapes and re-learning
// lowers their error, merged models rebuild from their spec, and misuse is named.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>

#include "dynattn/io/checkpoint.h"
#include "dynattn/models/inception_net.h"
#include "dynattn/models/registry.h"
#include "dynattn/reparam/deep_rebirth.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using dynattn::test_util::randomise_batch_norms;
using ::testing::HasSubstr;

namespace {
Model trained_like(const std::string& spec, uint64_t seed) {
  torch::manual_seed(seed);
  auto model = create_model(spec);
  randomise_batch_norms(*model.ptr());
  return model;
}

// |a - b| within 1e-5 of the output scale.
void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  EXPECT_LE((a - b).abs().max().item<double>(), 1e-5 * scale) << what;
}

bool contains(const std::vector<int64_t>& v, int64_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

constexpr const char* kSpec = "inception_net:width=0.25";
}  // namespace

// For every merge: stages without a re-learned step reproduce the original exactly, and in the
// stride-1 branch-merged modules the channels of branch1..branch3 do too (only branch4, whose
// pooling was dropped, differs).
TEST(DeepRebirth, ExactMergesEqualTheOriginalOnRandomWeights) {
  auto original = trained_like(kSpec, 3);
  const auto x = torch::randn({2, 1, 28, 28});
  torch::NoGradGuard no_grad;
  auto& orig = as_inception_net(original, "test");
  const auto orig_outs = orig.stage_outputs(x);
  for (const std::string merge : {"streamline", "branch", "all"}) {
    auto r = rebirth_merge(original, merge);
    EXPECT_EQ(r.merged.spec, "inception_net:deployed=true,merge=" + merge + ",width=0.25");
    auto& folded = as_inception_net(r.folded, "test");
    auto& merged = as_inception_net(r.merged, "test");
    const auto folded_outs = folded.stage_outputs(x);
    for (int64_t k = 0; k < InceptionNetImpl::kNumStages; ++k) {
      const std::string what = merge + " stage " + InceptionNetImpl::stage_names()[k];
      ASSERT_GT(orig_outs[k].abs().max().item<double>(), 0.1) << what << ": a non-trivial output";
      expect_close(folded_outs[k], orig_outs[k], what + " (BN folded)");
      const auto in = k == 0 ? x : orig_outs[k - 1];
      const auto y = merged.stage(k, in);
      if (!contains(r.relearn_stages, k)) {
        expect_close(y, orig_outs[k], what);
        continue;
      }
      if (k == 0 || (k == 2 && merge != "branch")) {
        EXPECT_EQ(y.sizes(), orig_outs[k].sizes()) << what << " (strided merge keeps the shape)";
        continue;
      }
      const auto& o = merged.modules_in_order()[k - 1]->options;
      const int64_t exact_channels = o.ch1x1() + o.ch3x3() + o.ch5x5();
      expect_close(y.narrow(1, 0, exact_channels), orig_outs[k].narrow(1, 0, exact_channels),
                   what + " branch1..branch3");
      const auto pooled = orig_outs[k].narrow(1, exact_channels, o.pool_proj());
      EXPECT_GT((y.narrow(1, exact_channels, o.pool_proj()) - pooled).abs().max().item<double>(),
                1e-3)
          << what << ": branch4 without its pooling is not the same (why it is re-learned)";
    }
    // Where everything is exact, so is the whole network.
    if (merge == "branch") {
      EXPECT_EQ(r.relearn_stages, (std::vector<int64_t>{1, 2, 3, 4}));
    } else {
      EXPECT_EQ(r.relearn_stages.front(), 0) << "the stem's pool merge is re-learned";
    }
  }
}

// The transfer is exact with BN kept too (BN statistics concatenated like the weights).
TEST(DeepRebirth, BranchMergeIsExactWithBatchNormKept) {
  auto original = trained_like(kSpec, 5);
  auto merged = create_model("inception_net:merge=branch,width=0.25");
  merged.ptr()->eval();
  const auto steps = transfer_rebirth_weights(as_inception_net(original, "test"),
                                              as_inception_net(merged, "test"));
  int64_t exact = 0;
  for (const auto& s : steps) exact += s.exact;
  EXPECT_EQ(exact, 4) << "one exact branch merge per module";
  torch::NoGradGuard no_grad;
  auto& a = *as_inception_net(original, "test").inception3a;
  auto& b = *as_inception_net(merged, "test").inception3a;
  const auto x = torch::randn({2, a.options.in_channels(), 14, 14});
  const int64_t n = a.options.ch1x1() + a.options.ch3x3() + a.options.ch5x5();
  expect_close(b.forward(x).narrow(1, 0, n), a.forward(x).narrow(1, 0, n), "inception3a");
}

// Before re-learning, a conv that absorbed the 3x3/2 pool after it is the original conv read at
// the pool windows' centres: its kernel sits at the centre of the larger strided one.
TEST(DeepRebirth, StridedMergeStartsAsTheOriginalConvAtTheWindowCentres) {
  auto original = trained_like(kSpec, 11);
  auto r = rebirth_merge(original, "streamline");
  auto& folded = as_inception_net(r.folded, "test");
  auto& merged = as_inception_net(r.merged, "test");
  EXPECT_EQ(merged.conv1->options.kernel_size(), 5);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 1, 28, 28});
  const auto full = folded.conv1(x);  // stride 1, before maxpool1
  const auto sampled = full.index({torch::indexing::Slice(), torch::indexing::Slice(),
                                   torch::indexing::Slice(0, torch::indexing::None, 2),
                                   torch::indexing::Slice(0, torch::indexing::None, 2)});
  expect_close(merged.conv1(x), sampled, "conv1");
  const auto y = merged.stage(0, x);
  EXPECT_EQ(y.sizes(), folded.stage(0, x).sizes());
  EXPECT_TRUE((y <= folded.stage(0, x) + 1e-5).all().item<bool>())
      << "a sample of the window never exceeds its max";
}

TEST(DeepRebirth, RelearningLowersTheErrorOfTheMergedStages) {
  auto original = trained_like(kSpec, 7);
  auto r = rebirth_merge(original, "all");
  ASSERT_EQ(r.relearn_stages, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  torch::manual_seed(0);
  const InMemoryDataset data(torch::rand({32, 1, 28, 28}), torch::zeros({32}, torch::kLong));
  const auto frozen_fc = as_inception_net(r.merged, "test").fc->weight.clone();
  const auto report = relearn_merged_stages(r.folded, r.merged, {0, 2}, data,
                                            RelearnOptions().steps(25).batch_size(16).lr(3e-3));
  ASSERT_EQ(report.size(), 2u);
  EXPECT_EQ(report[0].stage, "conv1");
  EXPECT_EQ(report[1].stage, "inception3b");
  for (const auto& s : report) {
    EXPECT_GT(s.mse_before, 0.0) << s.stage;
    EXPECT_LT(s.mse_after, s.mse_before) << s.stage;
    EXPECT_GT(s.target_mean_square, 0.0) << s.stage;
  }
  EXPECT_TRUE(as_inception_net(r.merged, "test").fc->weight.equal(frozen_fc))
      << "only the re-learned stages change";
  EXPECT_FALSE(r.merged.ptr()->is_training()) << "the mode is restored";
}

TEST(DeepRebirth, MergedCheckpointRebuildsFromItsSpec) {
  auto original = trained_like(kSpec, 9);
  auto r = rebirth_merge(original, "all");
  const auto dir =
      std::filesystem::temp_directory_path() / ("dynattn-rebirth-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  save_checkpoint(dir.string(), *r.merged.ptr(),
                  R"({"model": ")" + r.merged.spec + R"(", "epoch": 1})", {});
  auto loaded = load_checkpoint_model(dir.string());
  std::filesystem::remove_all(dir);
  EXPECT_EQ(loaded.spec, r.merged.spec);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 1, 28, 28});
  EXPECT_TRUE(loaded.forward(x).allclose(r.merged.forward(x)));
}

TEST(DeepRebirth, MisuseIsNamed) {
  auto original = trained_like(kSpec, 1);
  EXPECT_THAT(error_of([&] { rebirth_merge(original, "pool"); }),
              HasSubstr("merge must be streamline, branch or all, got 'pool'"));
  EXPECT_THAT(error_of([&] { rebirth_merge(original, "none"); }),
              HasSubstr("merge must be streamline, branch or all, got 'none'"));
  original.ptr()->train();
  EXPECT_THAT(error_of([&] { rebirth_merge(original, "all"); }),
              HasSubstr("training mode; call eval() first"));
  auto resnet = create_model("resnet20:width=8");
  resnet.ptr()->eval();
  EXPECT_THAT(error_of([&] { rebirth_merge(resnet, "all"); }),
              HasSubstr("model 'resnet20:width=8' is not an inception_net"));
  auto merged = create_model("inception_net:merge=branch,width=0.25");
  merged.ptr()->eval();
  EXPECT_THAT(error_of([&] { rebirth_merge(merged, "all"); }),
              HasSubstr("already merged (merge=branch)"));
  auto wider = create_model("inception_net:merge=all");
  EXPECT_THAT(error_of([&] {
                transfer_rebirth_weights(as_inception_net(original, "test"),
                                         as_inception_net(wider, "test"));
              }),
              HasSubstr("differ in width"));
  original.ptr()->eval();
  const InMemoryDataset data(torch::rand({4, 1, 28, 28}), torch::zeros({4}, torch::kLong));
  auto r = rebirth_merge(original, "streamline");
  EXPECT_THAT(error_of([&] { relearn_merged_stages(r.folded, r.merged, {5}, data, {}); }),
              HasSubstr("stage index must be in [0, 5), got 5"));
}
