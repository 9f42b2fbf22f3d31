// RepVGG: the three-branch block fuses exactly into one 3x3 conv (random shapes, groups, strides
// and BN statistics), the families have the paper's shapes, and deploy() turns a whole RepVGG
// into its plain form.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>

#include "dynattn/core/compat.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/key_map.h"
#include "dynattn/models/registry.h"
#include "dynattn/models/repvgg.h"
#include "dynattn/ops/onednn_chain.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/reparam/deploy.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using dynattn::test_util::randomise_batch_norms;
using ::testing::HasSubstr;

namespace {
double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}
}  // namespace

TEST(RepVGGBlock, FusesIntoOneConvExactlyOverRandomConfigurations) {
  std::mt19937 rng(7);
  auto pick = [&](std::vector<int64_t> v) { return v[rng() % v.size()]; };
  for (int trial = 0; trial < 40; ++trial) {
    torch::manual_seed(trial);
    const int64_t groups = pick({1, 1, 2, 4});
    const int64_t in = groups * pick({1, 2, 3});
    const int64_t out = trial % 3 == 0 ? in : groups * pick({1, 2, 4});
    const int64_t stride = pick({1, 1, 2});
    RepVGGBlock block(RepVGGBlockOptions(in, out).stride(stride).groups(groups));
    randomise_batch_norms(*block);
    const bool has_identity = in == out && stride == 1;
    EXPECT_EQ(!block->rbr_identity.is_empty(), has_identity);
    const auto x = torch::randn({2, in, pick({5, 8, 9}), pick({6, 7})});
    torch::NoGradGuard no_grad;
    const auto before = block(x);
    const auto merged = block->reparameterize();
    ASSERT_EQ(merged.size(), 1u);
    const auto after = block(x);
    ASSERT_EQ(after.sizes(), before.sizes());
    EXPECT_LE(max_diff(after, before), 1e-5 * std::max(1.0, before.abs().max().item<double>()))
        << "in=" << in << " out=" << out << " stride=" << stride << " groups=" << groups;
    EXPECT_TRUE(block->options.deployed());
    EXPECT_TRUE(block->reparameterize().empty()) << "a second merge finds nothing";
    std::vector<std::string> names;
    for (const auto& p : block->named_parameters()) names.push_back(p.key());
    EXPECT_THAT(names, ::testing::ElementsAre("rbr_reparam.weight", "rbr_reparam.bias"));
  }
}

TEST(RepVGGBlock, FusedKernelHasKnownValues) {
  // One channel: 3x3 kernel zero, 1x1 kernel 2, BN scales gamma/sqrt(var + eps) chosen so the
  // fused kernel is 2 * 0.5 (1x1 branch) + 1 * 4 (identity) at the centre, bias from the betas.
  RepVGGBlock block(RepVGGBlockOptions(1, 1));
  torch::NoGradGuard no_grad;
  block->rbr_dense->conv->weight.zero_();
  block->rbr_1x1->conv->weight.fill_(2.0);
  for (auto* bn : {block->rbr_dense->bn.get(), block->rbr_1x1->bn.get(), block->rbr_identity.get()})
    bn->options.eps(0.0);
  block->rbr_dense->bn->bias.fill_(0.5);
  block->rbr_1x1->bn->weight.fill_(0.5);
  block->rbr_1x1->bn->bias.fill_(0.25);
  block->rbr_identity->weight.fill_(4.0);
  block->rbr_identity->running_mean.fill_(1.0);  // bias - mean * 4 = -4
  block->eval();
  const auto [kernel, bias] = block->equivalent_kernel_bias();
  auto expected = torch::zeros({1, 1, 3, 3}, torch::kDouble);
  expected[0][0][1][1] = 2 * 0.5 + 4.0;
  EXPECT_TRUE(torch::allclose(kernel, expected)) << kernel;
  EXPECT_NEAR(bias.item<double>(), 0.5 + 0.25 - 4.0, 1e-12);
}

TEST(RepVGGBlock, IdentityKernelIsGroupAware) {
  // With 4 channels in 2 groups, channel 3 reads index 1 of its group.
  RepVGGBlock block(RepVGGBlockOptions(4, 4).groups(2));
  torch::NoGradGuard no_grad;
  block->rbr_dense->conv->weight.zero_();
  block->rbr_1x1->conv->weight.zero_();
  block->eval();
  const auto kernel = block->equivalent_kernel_bias().first;
  ASSERT_EQ(kernel.sizes(), (std::vector<int64_t>{4, 2, 3, 3}));
  for (int64_t c = 0; c < 4; ++c)
    for (int64_t i = 0; i < 2; ++i)
      EXPECT_NEAR(kernel[c][i][1][1].item<double>(), i == c % 2 ? 1.0 / std::sqrt(1 + 1e-5) : 0,
                  1e-9);
}

TEST(RepVGGBlock, RefusesToFuseInTrainingMode) {
  RepVGGBlock block(RepVGGBlockOptions(4, 4));
  EXPECT_THAT(error_of([&] { block->reparameterize(); }), HasSubstr("training mode"));
  EXPECT_FALSE(block->options.deployed()) << "nothing changed";
  EXPECT_FALSE(block->rbr_dense.is_empty());
}

TEST(RepVGGBlock, BadOptionsAreNamed) {
  EXPECT_THAT(error_of([] { RepVGGBlock(RepVGGBlockOptions(6, 8).groups(4)); }),
              HasSubstr("RepVGGBlock: groups=4 must divide in_channels=6"));
  EXPECT_THAT(error_of([] { RepVGGBlock(RepVGGBlockOptions(0, 8)); }), HasSubstr("RepVGGBlock"));
}

TEST(RepVGG, FamiliesHaveThePapersWidthsDepthsAndGroups) {
  struct Case {
    std::string name;
    std::vector<int64_t> depths, widths;
  };
  for (const auto& c :
       std::vector<Case>{{"repvgg_a0", {1, 2, 4, 14, 1}, {48, 48, 96, 192, 1280}},
                         {"repvgg_a1", {1, 2, 4, 14, 1}, {64, 64, 128, 256, 1280}},
                         {"repvgg_b0", {1, 4, 6, 16, 1}, {64, 64, 128, 256, 1280}}}) {
    Model m = create_model(c.name);
    auto* net = m.ptr()->as<RepVGGImpl>();
    ASSERT_NE(net, nullptr) << c.name;
    EXPECT_EQ(net->stage0->options.out_channels(), c.widths[0]) << c.name;
    for (size_t s = 0; s < 4; ++s) {
      EXPECT_EQ(static_cast<int64_t>(net->stages[s]->size()), c.depths[s + 1]) << c.name;
      EXPECT_EQ(net->stages[s]->ptr(0)->as<RepVGGBlockImpl>()->options.out_channels(),
                c.widths[s + 1])
          << c.name;
    }
  }
  // g4: the official layers 2, 4, 6, ... (counted over stages 1-4 from 1) have 4 groups.
  Model g4 = create_model("repvgg_a0g4");
  const auto blocks = g4.ptr()->as<RepVGGImpl>()->blocks();
  ASSERT_EQ(blocks.size(), 22u);
  EXPECT_EQ(blocks[0]->options.groups(), 1);  // stage0
  for (size_t layer = 1; layer < blocks.size(); ++layer)
    EXPECT_EQ(blocks[layer]->options.groups(), layer % 2 == 0 ? 4 : 1) << "layer " << layer;
  // 28x28 -> 28 (stem, stride 1) -> 14 -> 7 -> 4 -> 2 -> logits.
  torch::NoGradGuard no_grad;
  EXPECT_EQ(g4.forward(torch::randn({2, 1, 28, 28})).sizes(), (std::vector<int64_t>{2, 10}));
}

TEST(RepVGG, DeployMergesEveryBlockAndTheSpecRebuildsIt) {
  torch::manual_seed(3);
  Model m = create_model("repvgg_a0g2:classes=7");
  randomise_batch_norms(*m.ptr());
  const auto r = deploy(m, {2, 1, 28, 28});
  EXPECT_EQ(r.merged.size(), 22u);
  EXPECT_EQ(r.merged.front(), "stage0: rbr_dense+rbr_1x1 -> rbr_reparam");
  EXPECT_EQ(r.merged[2], "stage1.1: rbr_dense+rbr_1x1+rbr_identity -> rbr_reparam");
  EXPECT_LE(r.max_abs_diff, 1e-5 * std::max(1.0, r.output_scale));
  EXPECT_LT(r.macs_after, r.macs_before) << "the 1x1 branches are gone";
  EXPECT_LT(r.parameters_after, r.parameters_before);
  EXPECT_THAT(m.spec, HasSubstr("deployed=true"));
  EXPECT_THAT(m.spec, HasSubstr("classes=7"));
  for (const auto& p : m.ptr()->named_parameters())
    EXPECT_THAT(p.key(), ::testing::AnyOf(HasSubstr("rbr_reparam"), HasSubstr("linear")));
  // Idempotent; and a checkpoint of it loads into what its spec builds.
  EXPECT_TRUE(deploy(m, {1, 1, 28, 28}).merged.empty());
  Model rebuilt = create_model(m.spec);
  load_state_dict(*rebuilt.ptr(), state_dict(*m.ptr()), "deployed");
  rebuilt.ptr()->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 1, 28, 28});
  EXPECT_TRUE(torch::equal(rebuilt.forward(x), m.forward(x)));
}

TEST(RepVGG, DeployedMacsAreThePlainConvStack) {
  // Deployed: one 3x3 conv per block; train form adds the 1x1 branch (1/9 of the 3x3 MACs).
  Model train = create_model("repvgg_a0");
  Model plain = create_model("repvgg_a0:deployed=true");
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 1, 28, 28});
  const int64_t macs_train = count_macs([&] { train.forward(x); }).macs;
  const int64_t macs_plain = count_macs([&] { plain.forward(x); }).macs;
  EXPECT_GT(macs_train, macs_plain);
  EXPECT_LT(macs_train, macs_plain * 10 / 9 + macs_plain / 100);
}

TEST(RepVGG, TimmKeyMapRenamesByobNetNames) {
  const auto& map = get_key_map("timm");
  EXPECT_EQ(rename_key("stages.2.3.conv_kxk.bn.running_mean", map),
            "stage3.3.rbr_dense.bn.running_mean");
  EXPECT_EQ(rename_key("stem.conv_1x1.conv.weight", map), "stage0.rbr_1x1.conv.weight");
  EXPECT_EQ(rename_key("stages.0.1.identity.weight", map), "stage1.1.rbr_identity.weight");
  EXPECT_EQ(rename_key("stages.3.0.reparam_conv.bias", map), "stage4.0.rbr_reparam.bias");
  EXPECT_EQ(rename_key("head.fc.weight", map), "linear.weight");
}

TEST(RepVGG, BadSpecsAreNamed) {
  EXPECT_THAT(error_of([] { create_model("repvgg_a0:strides=1/2"); }),
              HasSubstr("strides needs 5 entries"));
  EXPECT_THAT(error_of([] { create_model("repvgg_a0:groups=0"); }), HasSubstr("groups"));
  EXPECT_THAT(error_of([] {
                Model m = create_model("repvgg_a0");
                m.forward(torch::randn({1, 3, 28, 28}));
              }),
              HasSubstr("RepVGG: expected input [N, 1, H, W]"));
}

TEST(RepVGG, OneDnnChainGivesTheOrdinaryResult) {
  // The deployed stack in oneDNN layout (inference) == the same convs on ordinary tensors.
  torch::manual_seed(11);
  Model m = create_model("repvgg_a0g2");
  randomise_batch_norms(*m.ptr());
  deploy(m, {1, 1, 28, 28});
  for (int64_t batch : {1, 3}) {
    const auto x = torch::randn({batch, 1, 28, 28});
    torch::Tensor chain, ordinary;
    {
      torch::NoGradGuard no_grad;
      ASSERT_TRUE(onednn_chain_applicable(x) || !at::hasMKLDNN());
      chain = m.forward(x);
    }
    ordinary = m.forward(x).detach();  // autograd on: the ordinary path
    EXPECT_LE(max_diff(chain, ordinary), 1e-5 * std::max(1.0, ordinary.abs().max().item<double>()));
  }
  // Loading new weights invalidates the cached oneDNN weights.
  Model other = create_model("repvgg_a0g2:deployed=true");
  load_state_dict(*other.ptr(), state_dict(*m.ptr()), "copy");
  other.ptr()->eval();
  const auto x = torch::randn({2, 1, 28, 28});
  torch::NoGradGuard no_grad;
  const auto before = other.forward(x);
  {
    for (auto& p : other.ptr()->parameters()) p.mul_(0.5);
  }
  EXPECT_GT(max_diff(other.forward(x), before), 1e-3) << "stale cached weights";
}
