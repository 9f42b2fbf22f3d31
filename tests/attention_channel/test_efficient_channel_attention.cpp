#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "channel_test_util.h"
#include "dynattn/attention/efficient_channel_attention.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

TEST(EfficientChannelAttention, AdaptiveKernelSizeFollowsTheFormula) {
  // t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1 (official ECANet code).
  EXPECT_EQ(eca_kernel_size(16), 3);        // t = int(2.5) = 2 -> 3
  EXPECT_EQ(eca_kernel_size(64), 3);        // t = int(3.5) = 3
  EXPECT_EQ(eca_kernel_size(256), 5);       // t = int(4.5) = 4 -> 5
  EXPECT_EQ(eca_kernel_size(512), 5);       // t = 5
  EXPECT_EQ(eca_kernel_size(2048), 7);      // t = 6 -> 7
  EXPECT_EQ(eca_kernel_size(4), 1);         // t = 1 (timm would clamp to 3)
  EXPECT_EQ(eca_kernel_size(64, 1, 1), 7);  // gamma 1: t = 7
  EXPECT_EQ(eca_kernel_size(64, 2, 3), 5);  // beta 3: t = int(4.5) -> 5
  for (int64_t c : {16, 64, 256}) {
    const auto t = static_cast<int64_t>(std::abs((std::log2(static_cast<double>(c)) + 1) / 2));
    EXPECT_EQ(EfficientChannelAttention(c)->kernel_size, t % 2 ? t : t + 1) << "C=" << c;
  }
}

TEST(EfficientChannelAttention, ConvShapeAndName) {
  EfficientChannelAttention eca(256);
  auto params = eca->named_parameters();
  ASSERT_EQ(params.size(), 1u);
  EXPECT_EQ(params["conv.weight"].sizes(), torch::IntArrayRef({1, 1, 5}));
  EXPECT_EQ(EfficientChannelAttention(EfficientChannelAttentionOptions(256).kernel_size(9))
                ->conv->weight.size(2),
            9);
}

TEST(EfficientChannelAttention, HandCheckedGate) {
  EfficientChannelAttention eca(EfficientChannelAttentionOptions(4).kernel_size(3));
  {
    torch::NoGradGuard no_grad;
    eca->conv->weight.copy_(torch::tensor({0.5f, -1.f, 0.25f}).view({1, 1, 3}));
  }
  // Channel means 1, 2, 3, 4 (each 2x2 map is its mean +- 1).
  auto x = torch::tensor({1.f, 2.f, 3.f, 4.f}).view({1, 4, 1, 1}) +
           torch::tensor({1.f, -1.f, -1.f, 1.f}).view({1, 1, 2, 2});
  // Cross-correlation with zero padding: y_i = 0.5 z_{i-1} - z_i + 0.25 z_{i+1}
  //   = (-0.5, -0.75, -1, -2.5); gate = sigmoid(y).
  auto r = eca->forward_with_maps(x);
  auto expected = torch::tensor({0.37754068f, 0.32082129f, 0.26894143f, 0.07585818f});
  EXPECT_TRUE(torch::allclose(r.maps.at("gate"), expected.view({1, 4, 1, 1}), 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(r.output, x * expected.view({1, 4, 1, 1}), 1e-6, 1e-7));
  EXPECT_TRUE(torch::equal(eca->forward(x), r.output));
}

TEST(EfficientChannelAttention, GateEqualsOutputOverInput) {
  EfficientChannelAttention eca(32);
  auto x = torch::randn({2, 32, 4, 4}) + 3.0;
  auto r = eca->forward_with_maps(x);
  ASSERT_EQ(r.maps.at("gate").sizes(), torch::IntArrayRef({2, 32, 1, 1}));
  EXPECT_TRUE(torch::allclose(r.output / x, r.maps.at("gate").expand_as(x), 1e-5, 1e-6));
}

TEST(EfficientChannelAttention, GradcheckDouble) {
  EfficientChannelAttention eca(EfficientChannelAttentionOptions(8).kernel_size(3));
  eca->to(torch::kDouble);
  dynattn::test_util::randomize(*eca, 3);
  auto x = torch::randn({2, 8, 3, 2}, torch::kDouble).requires_grad_();
  EXPECT_GRADCHECK([&] { return eca->forward(x); }, dynattn::test_util::with_parameters({x}, *eca));
}

TEST(EfficientChannelAttention, ChannelsLastGivesTheSameOutput) {
  EfficientChannelAttention eca(64);
  auto x = torch::randn({2, 64, 7, 7});
  EXPECT_TRUE(torch::allclose(eca->forward(x.contiguous(torch::MemoryFormat::ChannelsLast)),
                              eca->forward(x), 1e-5, 1e-6));
}

TEST(EfficientChannelAttention, MacsAreOneConvPerChannel) {
  EfficientChannelAttention eca(64);  // k = 3
  auto x = torch::randn({2, 64, 7, 7});
  EXPECT_EQ(count_macs([&] { eca->forward(x); }).macs, 2 * 64 * 3);
}

TEST(EfficientChannelAttention, RejectsBadInputAndOptions) {
  EfficientChannelAttention eca(8);
  EXPECT_THAT(error_of([&] {
                eca->forward(torch::zeros({1, 7, 2, 2}));
              }),
              HasSubstr("ECA: expected a 4-D input [N,C,H,W] with C=8"));
  EXPECT_THAT(error_of([&] {
                eca->forward(torch::zeros({1, 8, 2, 2}, torch::kInt));
              }),
              HasSubstr("ECA: expected a floating-point input"));
  EXPECT_THAT(error_of([] { create_attention("eca:k=4", 64); }),
              HasSubstr("ECA: kernel size k must be odd and positive (or 0 for the adaptive "
                        "size), got 4"));
  EXPECT_THAT(error_of([] { create_attention("eca:gamma=0", 64); }),
              HasSubstr("ECA: gamma must be finite and non-zero"));
  EXPECT_THAT(error_of([] { create_attention("eca:r=4", 64); }),
              HasSubstr("unknown option 'r' (known: k, gamma, beta)"));
}

TEST(EfficientChannelAttention, AttentionSlot) {
  EXPECT_EQ(create_attention("eca", 256).get<EfficientChannelAttention>()->kernel_size, 5);
  EXPECT_EQ(create_attention("eca:k=7", 16).get<EfficientChannelAttention>()->kernel_size, 7);
  EXPECT_EQ(create_attention("eca:gamma=1", 64).get<EfficientChannelAttention>()->kernel_size, 7);
  EXPECT_EQ(create_attention("eca:beta=3", 64).get<EfficientChannelAttention>()->kernel_size, 5);
}
