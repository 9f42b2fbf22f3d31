#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/io/checkpoint.h"
#include "dynattn/models/registry.h"
#include "dynattn/reparam/deploy.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

using dynattn::test_util::trained_looking;
TEST(Deploy, FoldsEveryConvBnPairOfAResNetExactly) {
  Model m = trained_looking("resnet20");
  const auto r = deploy(m, {2, 1, 28, 28});
  // stem + 9 blocks x 2 + 2 projections
  EXPECT_EQ(r.merged.size(), 21u);
  EXPECT_EQ(r.merged.front(), "conv1+bn1");
  EXPECT_EQ(r.merged[1], "layer1.0: conv1+bn1");
  EXPECT_LE(r.max_abs_diff, 1e-5 * std::max(1.0, r.output_scale));
  // BN weights and biases (2 x 784) go, conv biases (784) come.
  EXPECT_EQ(r.parameters_before, 272186);
  EXPECT_EQ(r.parameters_after, 272186 - 2 * 784 + 784);
  EXPECT_EQ(r.macs_after, r.macs_before) << "BN costs no MACs; the convs are unchanged";
  EXPECT_EQ(m.spec, "resnet20:deployed=true");
  for (const auto& p : m.ptr()->named_parameters())
    EXPECT_EQ(p.key().find("bn"), std::string::npos);
}

TEST(Deploy, IsIdempotentAndTheSpecRebuildsTheDeployedModel) {
  Model m = trained_looking("cbam_resnet20:width=8");
  const auto first = deploy(m, {1, 1, 28, 28});
  EXPECT_FALSE(first.merged.empty());
  const auto second = deploy(m, {1, 1, 28, 28});
  EXPECT_TRUE(second.merged.empty());
  EXPECT_EQ(second.max_abs_diff, 0.0);
  // A checkpoint of the deployed model loads into the structure its spec describes.
  Model rebuilt = create_model(m.spec);
  load_state_dict(*rebuilt.ptr(), state_dict(*m.ptr()), "deployed");
  rebuilt.ptr()->eval();
  const auto x = torch::randn({2, 1, 28, 28});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(rebuilt.forward(x), m.forward(x), 1e-6, 1e-6));
}

TEST(Deploy, NothingToMergeChangesNothing) {
  Model se = create_model_or_attention("se:channels=16");
  se.ptr()->eval();
  const auto r = deploy(se, {2, 16, 5, 5});
  EXPECT_TRUE(r.merged.empty());
  EXPECT_EQ(r.max_abs_diff, 0.0);
  EXPECT_EQ(r.parameters_after, r.parameters_before);
  EXPECT_EQ(se.spec, "se:channels=16");
}

TEST(Deploy, RefusesTrainingMode) {
  Model m = create_model("resnet20");
  EXPECT_THAT(error_of([&] {
                deploy(m, {1, 1, 28, 28});
              }),
              HasSubstr("deploy resnet20: the model is in training mode"));
}

TEST(Deploy, DeployedResNetInOneDnnLayoutGivesTheOrdinaryResult) {
  // Inference of a deployed ResNet runs in oneDNN layout (ops/onednn_chain.h); with autograd on
  // it takes the ordinary path. Both give the same logits, projection and "pad" shortcuts alike.
  for (const char* spec : {"resnet20", "resnet20:shortcut=pad,width=8"}) {
    Model m = trained_looking(spec);
    deploy(m, {1, 1, 28, 28});
    for (int64_t batch : {1, 4}) {
      const auto x = torch::randn({batch, 1, 28, 28});
      torch::Tensor fast;
      {
        torch::NoGradGuard no_grad;
        fast = m.forward(x);
      }
      const auto ordinary = m.forward(x).detach();
      EXPECT_LE((fast - ordinary).abs().max().item<double>(),
                1e-5 * std::max(1.0, ordinary.abs().max().item<double>()))
          << spec << " batch " << batch;
    }
  }
}
