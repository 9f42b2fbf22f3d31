#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "channel_test_util.h"
#include "dynattn/attention/squeeze_excitation.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {
// x: channel 0 = [[1,2],[3,4]] (mean 2.5), channel 1 = [[-1,0],[1,2]] (mean 0.5).
torch::Tensor tiny_input() {
  return torch::tensor({1.f, 2.f, 3.f, 4.f, -1.f, 0.f, 1.f, 2.f}).view({1, 2, 2, 2});
}

// r = 2 -> rd = 1. fc1: h = relu(z0 - z1 + 0.5) = 2.5; fc2: logits = (h, -0.6 h + 0.5) = (2.5, -1).
SqueezeExcitation tiny_se(const std::string& gate) {
  SqueezeExcitation se(SqueezeExcitationOptions(2).reduction(2).gate(gate));
  torch::NoGradGuard no_grad;
  se->fc1->weight.copy_(torch::tensor({1.f, -1.f}).view({1, 2, 1, 1}));
  se->fc1->bias.fill_(0.5);
  se->fc2->weight.copy_(torch::tensor({1.f, -0.6f}).view({2, 1, 1, 1}));
  se->fc2->bias.copy_(torch::tensor({0.f, 0.5f}));
  return se;
}
}  // namespace

TEST(SqueezeExcitation, HandCheckedSigmoidGate) {
  auto se = tiny_se("sigmoid");
  auto x = tiny_input();
  auto r = se->forward_with_maps(x);
  // sigmoid(2.5), sigmoid(-1)
  auto expected_gate = torch::tensor({0.92414182f, 0.26894143f}).view({1, 2, 1, 1});
  EXPECT_TRUE(torch::allclose(r.maps.at("gate"), expected_gate, 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(r.output, x * expected_gate, 1e-6, 1e-7));
  EXPECT_TRUE(torch::equal(se->forward(x), r.output));
}

TEST(SqueezeExcitation, HandCheckedHardSigmoidGate) {
  auto se = tiny_se("hard_sigmoid");
  // relu6(2.5 + 3) / 6 = 11/12, relu6(-1 + 3) / 6 = 1/3
  auto gate = se->gate(tiny_input());
  EXPECT_TRUE(torch::allclose(gate, torch::tensor({11.f / 12, 1.f / 3}).view({1, 2, 1, 1})));
  // Saturates at 0 below -3 and at 1 above 3, unlike the sigmoid.
  auto logits = torch::tensor({-4.f, -3.f, 0.f, 3.f, 3.5f});
  EXPECT_TRUE(torch::allclose(apply_channel_gate(logits, "hard_sigmoid", "SE"),
                              torch::tensor({0.f, 0.f, 0.5f, 1.f, 1.f})));
}

TEST(SqueezeExcitation, GateIsPerSampleAndEqualsOutputOverInput) {
  SqueezeExcitation se(SqueezeExcitationOptions(8).reduction(2));
  dynattn::test_util::randomize(*se, 1);
  auto x = torch::randn({3, 8, 5, 4}) + 3.0;  // away from 0, so the ratio is well defined
  auto r = se->forward_with_maps(x);
  ASSERT_EQ(r.maps.at("gate").sizes(), torch::IntArrayRef({3, 8, 1, 1}));
  EXPECT_TRUE(torch::allclose(r.output / x, r.maps.at("gate").expand_as(x), 1e-5, 1e-6));
  // One sample's gate does not depend on another sample.
  EXPECT_TRUE(torch::allclose(se->gate(x.narrow(0, 1, 1)), r.maps.at("gate").narrow(0, 1, 1)));
}

TEST(SqueezeExcitation, ReductionPoliciesAndParameterNames) {
  EXPECT_EQ(SqueezeExcitation(64)->rd_channels, 4);  // floor(64 / 16), the paper
  EXPECT_EQ(
      SqueezeExcitation(SqueezeExcitationOptions(64).reduction_policy("divisible"))->rd_channels,
      8);  // timm
  EXPECT_EQ(SqueezeExcitation(SqueezeExcitationOptions(64).rd_channels(5))->rd_channels, 5);
  SqueezeExcitation se(64);
  auto params = se->named_parameters();
  ASSERT_EQ(params.size(), 4u);
  EXPECT_EQ(params["fc1.weight"].sizes(), torch::IntArrayRef({4, 64, 1, 1}));
  EXPECT_EQ(params["fc1.bias"].sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(params["fc2.weight"].sizes(), torch::IntArrayRef({64, 4, 1, 1}));
  EXPECT_EQ(params["fc2.bias"].sizes(), torch::IntArrayRef({64}));
}

TEST(SqueezeExcitation, GradcheckDouble) {
  for (const char* gate : {"sigmoid", "hard_sigmoid"}) {
    SqueezeExcitation se(SqueezeExcitationOptions(6).reduction(2).gate(gate));
    se->to(torch::kDouble);
    dynattn::test_util::randomize(*se, 2);
    auto x = torch::randn({2, 6, 3, 3}, torch::kDouble).requires_grad_();
    EXPECT_GRADCHECK([&] { return se->forward(x); }, dynattn::test_util::with_parameters({x}, *se));
  }
}

TEST(SqueezeExcitation, ChannelsLastGivesTheSameOutput) {
  SqueezeExcitation se(16);
  auto x = torch::randn({2, 16, 7, 7});
  auto y = se->forward(x.contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(torch::allclose(y, se->forward(x), 1e-5, 1e-6));
}

TEST(SqueezeExcitation, MacsAreTheTwoOneByOneConvs) {
  SqueezeExcitation se(64);  // rd = 4
  auto x = torch::randn({1, 64, 7, 7});
  EXPECT_EQ(count_macs([&] { se->forward(x); }).macs, 2 * 64 * 4);
  auto batch = torch::randn({3, 64, 7, 7});
  EXPECT_EQ(count_macs([&] { se->forward(batch); }).macs, 3 * 2 * 64 * 4);
}

TEST(SqueezeExcitation, RejectsBadInput) {
  SqueezeExcitation se(8);
  EXPECT_THAT(error_of([&] {
                se->forward(torch::zeros({2, 8, 4}));
              }),
              HasSubstr("SE: expected a 4-D input [N,C,H,W] with C=8, got [2, 8, 4]"));
  EXPECT_THAT(error_of([&] {
                se->forward(torch::zeros({2, 4, 3, 3}));
              }),
              HasSubstr("SE: expected a 4-D input [N,C,H,W] with C=8, got [2, 4, 3, 3]"));
  EXPECT_THAT(error_of([&] {
                se->forward(torch::zeros({2, 8, 3, 3}, torch::kLong));
              }),
              HasSubstr("SE: expected a floating-point input"));
}

TEST(SqueezeExcitation, AttentionSlot) {
  auto m = create_attention("se:r=8", 64);
  auto* se = dynamic_cast<SqueezeExcitationImpl*>(m.ptr().get());
  ASSERT_NE(se, nullptr);
  EXPECT_EQ(se->rd_channels, 8);
  EXPECT_EQ(se->options.gate(), "sigmoid");
  EXPECT_NE(dynamic_cast<AttentionWithMaps*>(m.ptr().get()), nullptr);
  auto x = torch::randn({2, 64, 3, 3});
  EXPECT_TRUE(torch::equal(m.forward(x), se->forward(x)));

  auto timm = create_attention("se:policy=divisible,gate=hard_sigmoid", 64);
  EXPECT_EQ(timm.get<SqueezeExcitation>()->rd_channels, 8);
  EXPECT_EQ(timm.get<SqueezeExcitation>()->options.gate(), "hard_sigmoid");
  EXPECT_EQ(
      create_attention("se:policy=divisible,divisor=16", 512).get<SqueezeExcitation>()->rd_channels,
      32);
  EXPECT_EQ(create_attention("se:rd=3", 64).get<SqueezeExcitation>()->rd_channels, 3);
}

TEST(SqueezeExcitation, AttentionSlotRejectsBadOptions) {
  EXPECT_THAT(error_of([] { create_attention("se:r=0", 64); }),
              HasSubstr("SE: reduction ratio r must be positive, got 0"));
  EXPECT_THAT(error_of([] { create_attention("se:gate=tanh", 64); }),
              HasSubstr("SE: gate must be one of sigmoid, hard_sigmoid; got 'tanh'"));
  EXPECT_THAT(error_of([] { create_attention("se:policy=ceil", 64); }),
              HasSubstr("floor, divisible, explicit"));
  EXPECT_THAT(error_of([] { create_attention("se:policy=explicit", 64); }),
              HasSubstr("needs an explicit reduced width rd > 0"));
  EXPECT_THAT(error_of([] { create_attention("se:ratio=4", 64); }),
              HasSubstr("unknown option 'ratio' (known: r, rd, policy, divisor, gate)"));
  EXPECT_THAT(error_of([] { create_attention("se:r=x", 64); }), HasSubstr("expects a number"));
}

TEST(SqueezeExcitation, CloneIsIndependent) {
  SqueezeExcitation se(8);
  auto copy = std::dynamic_pointer_cast<SqueezeExcitationImpl>(se->clone());
  ASSERT_TRUE(copy);
  auto x = torch::randn({1, 8, 2, 2});
  EXPECT_TRUE(torch::equal(copy->forward(x), se->forward(x)));
  torch::NoGradGuard no_grad;
  copy->fc2->bias.add_(1.0);
  EXPECT_FALSE(torch::equal(copy->forward(x), se->forward(x)));
}
