#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/core/memory_format.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

TEST(CifarResNet, OutputShapeAndBlockCount) {
  for (int64_t depth : {20, 32, 56}) {
    CifarResNet net(CifarResNetOptions().depth(depth));
    net->eval();
    auto y = net->forward(torch::randn({3, 1, 28, 28}));
    EXPECT_EQ(y.sizes(), torch::IntArrayRef({3, 10}));
    EXPECT_EQ(static_cast<int64_t>(net->blocks().size()), (depth - 2) / 2);
  }
}

// Hand count for ResNet-20 with projection shortcuts: convs 269,968 (stem 144; stage 1
// 6 x 2,304; stage 2 4,608 + 5 x 9,216 + 512; stage 3 18,432 + 5 x 36,864 + 2,048), BN 1,568
// (2 per channel), fc 650.
TEST(CifarResNet, ParameterCountMatchesHandCount) {
  CifarResNet net;
  EXPECT_EQ(count_parameters(*net), 272186);
  CifarResNet padded(CifarResNetOptions().shortcut("pad"));
  EXPECT_EQ(count_parameters(*padded), 272186 - 512 - 2048 - 64 - 128);
}

// Hand count per 28x28 image: stem 28*28*16*9 = 112,896; stage 1 6 x 28*28*16*16*9;
// stage 2 14*14*32*16*9 + 5 x 14*14*32*32*9 + 1x1 14*14*32*16; stage 3 likewise at 7x7 with
// 64 channels; fc 640. Total 31,021,952 ("about 31.0 M").
TEST(CifarResNet, MacsMatchHandCount) {
  CifarResNet net;
  net->eval();
  const int64_t expected =
      112896 + 6 * 1806336 + 903168 + 5 * 1806336 + 100352 + 903168 + 5 * 1806336 + 100352 + 640;
  EXPECT_EQ(expected, 31021952);
  auto one = count_macs([&] { net->forward(torch::randn({1, 1, 28, 28})); });
  EXPECT_EQ(one.macs, expected);
  auto four = count_macs([&] { net->forward(torch::randn({4, 1, 28, 28})); });
  EXPECT_EQ(four.macs, 4 * expected);
}

TEST(CifarResNet, BlocksStartAsIdentityWithZeroInitLast) {
  CifarResNet net;
  net->eval();
  auto x = torch::randn({2, 16, 28, 28});
  auto block = net->blocks()[1];
  EXPECT_TRUE(torch::allclose(block->forward(x), torch::relu(x)));
  EXPECT_EQ(block->residual(x).abs().max().item<float>(), 0.0f);
  CifarResNet plain(CifarResNetOptions().zero_init_last(false));
  plain->eval();
  EXPECT_GT(plain->blocks()[1]->residual(x).abs().max().item<float>(), 0.0f);
}

TEST(CifarResNet, PadShortcutSubsamplesAndZeroPads) {
  BasicBlock block(BasicBlockOptions(16, 32).stride(2).shortcut("pad"));
  auto x = torch::randn({1, 16, 8, 8});
  auto s = block->shortcut(x);
  ASSERT_EQ(s.sizes(), torch::IntArrayRef({1, 32, 4, 4}));
  EXPECT_TRUE(torch::equal(s.slice(1, 8, 24), x.slice(2, 0, 8, 2).slice(3, 0, 8, 2)));
  EXPECT_EQ(s.slice(1, 0, 8).abs().sum().item<float>(), 0.0f);
  // The input's layout is kept: a gated (out-of-place) residual sum follows it.
  const auto cl = x.contiguous(torch::MemoryFormat::ChannelsLast);
  const auto s_cl = block->shortcut(cl);
  EXPECT_TRUE(s_cl.is_contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(torch::equal(s_cl, s));
}

TEST(CifarResNet, ChannelsLastGivesTheSameOutput) {
  CifarResNet net;
  net->eval();
  auto x = torch::randn({4, 1, 28, 28});
  auto ref = net->forward(x);
  to_memory_format(*net, torch::MemoryFormat::ChannelsLast);
  auto y = net->forward(x.contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(torch::allclose(ref, y, 1e-4, 1e-5));
}

TEST(CifarResNet, CloneIsDeep) {
  CifarResNet net;
  auto copy = std::dynamic_pointer_cast<CifarResNetImpl>(net->clone());
  ASSERT_TRUE(copy);
  torch::NoGradGuard g;
  copy->fc->weight.add_(1.0);
  EXPECT_FALSE(torch::equal(copy->fc->weight, net->fc->weight));
  EXPECT_EQ(copy->blocks().size(), net->blocks().size());
}

TEST(CifarResNet, BadOptionsAndInputsAreRejected) {
  EXPECT_THAT(error_of([] { CifarResNet(CifarResNetOptions().depth(21)); }),
              HasSubstr("depth must be 6n+2"));
  EXPECT_THAT(error_of([] { CifarResNet(CifarResNetOptions().shortcut("none")); }),
              HasSubstr("shortcut must be"));
  CifarResNet net;
  EXPECT_THAT(error_of([&] {
                net->forward(torch::randn({2, 3, 28, 28}));
              }),
              HasSubstr("expected input [N,1,H,W]"));
}

TEST(Registry, CreatesResNetsBySpec) {
  auto m = create_model("resnet32:width=8");
  EXPECT_EQ(m.spec, "resnet32:width=8");
  auto net = std::dynamic_pointer_cast<CifarResNetImpl>(m.ptr());
  ASSERT_TRUE(net);
  EXPECT_EQ(net->options.depth(), 32);
  EXPECT_EQ(net->options.base_width(), 8);
  m.ptr()->eval();
  EXPECT_EQ(m.forward(torch::randn({1, 1, 28, 28})).sizes(), torch::IntArrayRef({1, 10}));
  std::vector<std::string> names;
  for (const auto& info : list_models()) names.push_back(info.name);
  EXPECT_THAT(names, ::testing::IsSupersetOf({"resnet20", "resnet32", "resnet56", "resnet110"}));
}

TEST(Registry, ErrorsNameTheProblem) {
  EXPECT_THAT(error_of([] { create_model("resnet21"); }),
              ::testing::AllOf(HasSubstr("unknown model 'resnet21'"), HasSubstr("resnet20")));
  EXPECT_THAT(error_of([] { create_model("resnet20:widht=8"); }),
              ::testing::AllOf(HasSubstr("model resnet20"), HasSubstr("unknown option 'widht'")));
  EXPECT_THAT(error_of([] { create_model("resnet20:attn=sse"); }),
              ::testing::AllOf(HasSubstr("unknown attention 'sse'"), HasSubstr("none")));
  EXPECT_THAT(error_of([] { create_model("resnet20:width=x"); }), HasSubstr("expects an integer"));
}

TEST(AttentionSlot, NoneIsEmptyAndCustomTypesPlugIn) {
  EXPECT_TRUE(create_attention("none", 16).is_empty());
  register_attention({"test_scale", "multiplies by a constant", [](int64_t, const OptionMap& o) {
                        o.check_known({"k"});
                        const double k = o.get_double("k", 2.0);
                        return torch::nn::AnyModule(
                            torch::nn::Functional([k](const torch::Tensor& x) { return x * k; }));
                      }});
  CifarResNet net(CifarResNetOptions().attention("test_scale:k=0").zero_init_last(false));
  net->eval();
  // With the slot zeroing every residual, each block reduces to relu(shortcut(x)).
  auto x = torch::randn({1, 16, 8, 8});
  EXPECT_TRUE(torch::allclose(net->blocks()[0]->forward(x), torch::relu(x)));
  EXPECT_THAT(error_of([] { create_attention("test_scale:q=1", 8); }),
              HasSubstr("unknown option 'q'"));
}
