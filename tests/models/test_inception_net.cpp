// InceptionNet: shapes, torchvision parameter names, MACs by hand count, and the merged
// structures (what each `merge` keeps and removes), all buildable from their spec.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/models/inception_net.h"
#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

namespace {
std::vector<std::string> parameter_names(const torch::nn::Module& m) {
  std::vector<std::string> names;
  for (const auto& p : m.named_parameters()) names.push_back(p.key());
  return names;
}

InceptionNetImpl& as_inception(const Model& model) {
  auto* net = model.ptr()->as<InceptionNetImpl>();
  EXPECT_NE(net, nullptr) << model.spec;
  return *net;
}

int64_t count_max_pools(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& sub : m.modules()) n += sub->as<torch::nn::MaxPool2d>() != nullptr;
  return n;
}
}  // namespace

TEST(Inception, ModuleConcatenatesFourBranchesInOrder) {
  Inception block(InceptionOptions(8, 3, 4, 5, 2, 6, 7));
  block->eval();
  const auto x = torch::randn({2, 8, 9, 9});
  const auto y = block(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({2, 3 + 5 + 6 + 7, 9, 9}));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(y.narrow(1, 0, 3).equal(block->branch1(x)));
  EXPECT_TRUE(y.narrow(1, 3 + 5 + 6, 7).equal(block->branch4_seq->forward(x)));
  // Stride 2 (the pool after the module merged in): ceil(9 / 2) = 5 in every form.
  for (bool merged : {false, true}) {
    Inception strided(InceptionOptions(8, 3, 4, 5, 2, 6, 7).stride(2).merge_branches(merged));
    strided->eval();
    EXPECT_EQ(strided(x).sizes(), torch::IntArrayRef({2, 21, 5, 5})) << "merged=" << merged;
  }
}

TEST(InceptionNet, OutputShapeAndTorchvisionNames) {
  InceptionNet net;
  net->eval();
  EXPECT_EQ(net->forward(torch::randn({3, 1, 28, 28})).sizes(), torch::IntArrayRef({3, 10}));
  const auto names = parameter_names(*net);
  for (const char* name :
       {"conv1.conv.weight", "conv1.bn.weight", "inception3a.branch1.conv.weight",
        "inception3a.branch2.0.conv.weight", "inception3a.branch2.1.bn.bias",
        "inception3b.branch3.1.conv.weight", "inception4b.branch4.1.conv.weight", "fc.weight"})
    EXPECT_THAT(names, Contains(name));
  EXPECT_EQ(count_max_pools(*net), 2 + 4) << "maxpool1, maxpool3 and one per module";
  // Stage boundaries: 14x14 after the stem, 7x7 after inception3b.
  const auto outs = net->stage_outputs(torch::randn({1, 1, 28, 28}));
  ASSERT_EQ(outs.size(), 5u);
  EXPECT_EQ(outs[0].sizes(), torch::IntArrayRef({1, 96, 14, 14}));
  EXPECT_EQ(outs[2].sizes(), torch::IntArrayRef({1, 240, 7, 7}));
  EXPECT_EQ(outs[4].sizes(), torch::IntArrayRef({1, 256, 7, 7}));
}

// Hand count at width 0.5 (per 28x28 image):
//   conv1 28*28*96*9 = 677,376
//   inception3a 14*14*(96*(32+48+8+16) + 9*(48*64 + 8*16)) = 7,601,856
//   inception3b 14*14*(128*(64+64+16+32) + 9*(64*96 + 16*48)) = 16,608,256
//   inception4a 7*7*(240*(96+48+8+32) + 9*(48*104 + 8*24)) = 4,449,696
//   inception4b 7*7*(256*(80+56+12+32) + 9*(56*112 + 12*32)) = 5,193,312;  fc 2,560.
// Streamlined: conv1 5x5 at 14x14 (470,400); inception3b's 1x1 reductions at 14x14, its 5x5/2
// convs and the 3x3/2 convs of branch1 and branch4 at 7x7. Branch merging changes no MAC.
TEST(InceptionNet, MacsMatchHandCount) {
  const int64_t original = 677376 + 7601856 + 16608256 + 4449696 + 5193312 + 2560;
  EXPECT_EQ(original, 34533056);
  const int64_t stem = 14 * 14 * 96 * 25;
  const int64_t b3 =
      14 * 14 * 128 * (64 + 16) + 7 * 7 * 25 * (64 * 96 + 16 * 48) + 7 * 7 * 9 * 128 * (64 + 32);
  const int64_t streamlined = original - 677376 + stem - 16608256 + b3;
  for (const auto& [merge, expected] :
       std::vector<std::pair<std::string, int64_t>>{{"none", original},
                                                    {"branch", original},
                                                    {"streamline", streamlined},
                                                    {"all", streamlined}}) {
    auto model = create_model("inception_net:merge=" + merge);
    model.ptr()->eval();
    EXPECT_EQ(count_macs([&] {
                model.forward(torch::randn({1, 1, 28, 28}));
              }).macs,
              expected)
        << merge;
  }
}

TEST(InceptionNet, MergedStructuresKeepStageShapesAndDropLayers) {
  const auto x = torch::randn({2, 1, 28, 28});
  auto reference = create_model("inception_net:width=0.25");
  reference.ptr()->eval();
  const auto ref_outs = as_inception(reference).stage_outputs(x);
  for (const std::string merge : {"streamline", "branch", "all"}) {
    auto model = create_model("inception_net:width=0.25,merge=" + merge);
    model.ptr()->eval();
    auto& net = as_inception(model);
    const auto outs = net.stage_outputs(x);
    for (size_t k = 0; k < outs.size(); ++k)
      EXPECT_EQ(outs[k].sizes(), ref_outs[k].sizes()) << merge << " stage " << k;
    const bool streamline = merge != "branch", branches = merge != "streamline";
    EXPECT_EQ(net.maxpool1.is_empty(), streamline);
    EXPECT_EQ(net.maxpool3.is_empty(), streamline);
    EXPECT_EQ(net.conv1->options.stride(), streamline ? 2 : 1);
    EXPECT_EQ(net.conv1->options.kernel_size(), streamline ? 5 : 3);
    EXPECT_EQ(net.inception3b->options.stride(), streamline ? 2 : 1);
    EXPECT_EQ(count_max_pools(*net.inception3a), branches ? 0 : 1) << merge;
    const auto names = parameter_names(net);
    if (branches) {
      EXPECT_THAT(names, Contains("inception3a.reduce.conv.weight"));
      EXPECT_THAT(names, Contains("inception3a.branch2.conv.weight"));
      EXPECT_THAT(names, Not(Contains("inception3a.branch1.conv.weight")));
    }
    if (streamline && branches) {
      EXPECT_THAT(names, Contains("inception3b.downsample.conv.weight"));
      EXPECT_THAT(names, Not(Contains("inception3a.downsample.conv.weight")));
    }
  }
}

TEST(InceptionNet, SpecSelectsTheMergeAndDeployedForm) {
  auto model = create_model("inception_net:merge=all,deployed=true,width=0.25");
  EXPECT_EQ(model.spec, "inception_net:deployed=true,merge=all,width=0.25");
  auto& net = as_inception(model);
  EXPECT_EQ(net.options.merge_name(), "all");
  EXPECT_TRUE(net.options.deployed());
  EXPECT_TRUE(net.conv1->bn.is_empty());
  std::vector<std::string> names;
  for (const auto& info : list_models()) names.push_back(info.name);
  EXPECT_THAT(names, Contains("inception_net"));
}

TEST(InceptionNet, BadOptionsAreRejectedNamingThem) {
  EXPECT_THAT(error_of([] { create_model("inception_net:merge=pool"); }),
              ::testing::AllOf(HasSubstr("merge must be none, streamline, branch or all"),
                               HasSubstr("'pool'")));
  EXPECT_THAT(error_of([] { create_model("inception_net:width=0"); }),
              HasSubstr("width must be positive"));
  EXPECT_THAT(error_of([] { create_model("inception_net:depth=3"); }),
              HasSubstr("unknown option 'depth'"));
  InceptionNet net;
  EXPECT_THAT(error_of([&] {
                net->forward(torch::randn({1, 3, 28, 28}));
              }),
              HasSubstr("expected input [N, 1, H, W]"));
  EXPECT_THAT(error_of([&] {
                net->stage(7, torch::randn({1, 1, 28, 28}));
              }),
              HasSubstr("stage index must be in [0, 5)"));
}
