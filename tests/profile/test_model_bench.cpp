#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/profile/model_bench.h"

using namespace dynattn;

namespace {
ModelBenchOptions quick() {
  return ModelBenchOptions().warmup(1).min_iters(3).min_seconds(0.0);
}
}  // namespace

// What `dynattn bench` reports, without asserting any time: counts, consistency, side effects.
TEST(ModelBench, ReportsCountsAndConsistentTimings) {
  auto model = create_model("resnet20");
  const auto r = benchmark_model(model, quick().batches({1, 4}));
  EXPECT_EQ(r.parameters, 272186);
  EXPECT_EQ(r.macs_per_image, 31021952);
  ASSERT_EQ(r.timings.size(), 2u);
  for (const auto& t : r.timings) {
    EXPECT_GE(t.stats.iterations, 3);
    EXPECT_GT(t.stats.median_ms, 0.0);
    EXPECT_LE(t.stats.min_ms, t.stats.median_ms);
    EXPECT_LE(t.stats.median_ms, t.stats.p90_ms);
    EXPECT_NEAR(t.images_per_sec, t.batch * 1000.0 / t.stats.median_ms, 1e-6 * t.images_per_sec);
    EXPECT_NEAR(t.gflops, 2.0 * r.macs_per_image * t.images_per_sec / 1e9, 1e-6 * t.gflops);
  }
  EXPECT_EQ(r.timings[1].batch, 4);
  EXPECT_FALSE(model.ptr()->is_training()) << "benchmarked in eval mode";
}

TEST(ModelBench, ChannelsLastAndAttentionModelsCountTheirOwnMacs) {
  auto plain = create_model("resnet20");
  auto se = create_model("se_resnet20");
  const auto a = benchmark_model(plain, quick().batches({2}).channels_last(true));
  const auto b = benchmark_model(se, quick().batches({2}));
  EXPECT_EQ(a.macs_per_image, 31021952) << "layout does not change the work";
  EXPECT_GT(b.macs_per_image, a.macs_per_image);
  EXPECT_GT(b.parameters, a.parameters);
}

TEST(ModelBench, TrainStepChangesTheWeights) {
  auto model = create_model("resnet20");
  const auto before = model.ptr()->parameters()[0].clone();
  const auto t = benchmark_train_step(model, 4, quick());
  EXPECT_EQ(t.batch, 4);
  EXPECT_GT(t.images_per_sec, 0.0);
  EXPECT_TRUE(model.ptr()->is_training());
  EXPECT_FALSE(model.ptr()->parameters()[0].equal(before));
}
