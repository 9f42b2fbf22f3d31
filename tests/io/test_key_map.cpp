#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/io/checkpoint.h"
#include "dynattn/io/key_map.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {

// The shape of a CBAM module: channel.fc1/fc2 (1x1 convs), spatial.conv + spatial.bn.
struct ToyCbam : torch::nn::Module {
  ToyCbam() {
    auto channel = register_module("channel", std::make_shared<torch::nn::Module>());
    channel->register_module("fc1", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 2, 1)));
    channel->register_module("fc2", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 8, 1)));
    auto spatial = register_module("spatial", std::make_shared<torch::nn::Module>());
    spatial->register_module("conv",
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 1, 7).bias(false)));
    spatial->register_module("bn", torch::nn::BatchNorm2d(1));
  }
};

KeyMap test_map() {
  return {"test", "", {{"a.b", "x"}, {"p", "phi"}}};
}

}  // namespace

TEST(KeyMap, RenamesWholeSegmentRunsAnywhereButTheLastSegment) {
  const KeyMap m = test_map();
  EXPECT_EQ(rename_key("a.b.weight", m), "x.weight");
  EXPECT_EQ(rename_key("layer1.0.a.b.bias", m), "layer1.0.x.bias");
  EXPECT_EQ(rename_key("aa.b.weight", m), "aa.b.weight") << "segments match whole";
  EXPECT_EQ(rename_key("p.weight", m), "phi.weight");
  EXPECT_EQ(rename_key("conv.p", m), "conv.p") << "a tensor's own name is never renamed";
  EXPECT_EQ(rename_key("a.b.p.weight", m), "x.phi.weight") << "every rule applies once";
}

TEST(KeyMap, OfficialCbamNamesLoadIntoOurs) {
  ToyCbam target;
  torch::manual_seed(1);
  NamedTensors official = {
      {"ChannelGate.mlp.1.weight", torch::randn({2, 8})},  // Linear
      {"ChannelGate.mlp.1.bias", torch::randn({2})},
      {"ChannelGate.mlp.3.weight", torch::randn({8, 2})},
      {"ChannelGate.mlp.3.bias", torch::randn({8})},
      {"SpatialGate.spatial.conv.weight", torch::randn({1, 2, 7, 7})},
      {"SpatialGate.spatial.bn.weight", torch::randn({1})},
      {"SpatialGate.spatial.bn.bias", torch::randn({1})},
      {"SpatialGate.spatial.bn.running_mean", torch::randn({1})},
      {"SpatialGate.spatial.bn.running_var", torch::rand({1})},
      {"SpatialGate.spatial.bn.num_batches_tracked", torch::tensor(int64_t{3})},
  };
  const auto mapped = apply_key_map(official, get_key_map("cbam-official"), target, "cbam.st");
  load_state_dict(target, mapped, "cbam.st");
  const auto ours = state_dict(target);
  auto find = [&](const std::string& k) {
    for (const auto& kv : ours)
      if (kv.first == k) return kv.second;
    return torch::Tensor();
  };
  EXPECT_TRUE(find("channel.fc1.weight").equal(official[0].second.reshape({2, 8, 1, 1})));
  EXPECT_TRUE(find("channel.fc2.bias").equal(official[3].second));
  EXPECT_TRUE(find("spatial.conv.weight").equal(official[4].second));
  EXPECT_TRUE(find("spatial.bn.running_var").equal(official[8].second));
}

TEST(KeyMap, KeysTheTargetAlreadyHasAreKeptWhenTheRenameMatchesNothing) {
  ToyCbam target;
  // "timm" renames a segment "p" and "t"; our keys contain neither, timm's spatial.conv.conv does.
  NamedTensors timm = {{"spatial.conv.conv.weight", torch::zeros({1, 2, 7, 7})},
                       {"channel.fc1.weight", torch::zeros({2, 8, 1, 1})}};
  const auto mapped = apply_key_map(timm, get_key_map("timm"), target, "timm.st");
  ASSERT_EQ(mapped.size(), 2u);
  EXPECT_EQ(mapped[0].first, "spatial.conv.weight");
  EXPECT_EQ(mapped[1].first, "channel.fc1.weight");
}

TEST(KeyMap, ErrorsNameTheFileTheMapAndEveryUnmatchedKey) {
  ToyCbam target;
  NamedTensors bad = {{"ChannelGate.mlp.5.weight", torch::zeros({1})},
                      {"head.weight", torch::zeros({1})}};
  const std::string msg =
      error_of([&] { apply_key_map(bad, get_key_map("cbam-official"), target, "w.safetensors"); });
  EXPECT_THAT(msg, HasSubstr("w.safetensors: with key map 'cbam-official'"));
  EXPECT_THAT(msg, HasSubstr("ChannelGate.mlp.5.weight"));
  EXPECT_THAT(msg, HasSubstr("head.weight"));

  NamedTensors twice = {{"spatial.conv.conv.weight", torch::zeros({1, 2, 7, 7})},
                        {"spatial.conv.weight", torch::zeros({1, 2, 7, 7})}};
  EXPECT_THAT(error_of([&] { apply_key_map(twice, get_key_map("timm"), target, "t.st"); }),
              HasSubstr("two tensors map onto 'spatial.conv.weight'"));
  EXPECT_THAT(error_of([] { get_key_map("timmm"); }),
              ::testing::AllOf(HasSubstr("unknown key map 'timmm'"), HasSubstr("cbam-official")));
  EXPECT_THAT(error_of([] {
                register_key_map({"half", "", {{"a", ""}}});
              }),
              HasSubstr("needs both sides"));
}
