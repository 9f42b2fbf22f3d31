#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/attention/attention_maps.h"
#include "test_util.h"

using dynattn::check_attention_input;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

TEST(CheckAttentionInput, AcceptsMatchingInput) {
  check_attention_input("SE", torch::zeros({2, 8, 3, 3}), 8);
  check_attention_input("NonLocal", torch::zeros({2, 8, 5}), 8, 1);
  check_attention_input("NonLocal", torch::zeros({2, 8, 2, 3, 3}), -1, 3);
}

TEST(CheckAttentionInput, NamesModuleExpectationAndActualShape) {
  EXPECT_EQ(error_of([] {
              check_attention_input("CBAM", torch::zeros({8, 32, 14, 14}), 64);
            }),
            "CBAM: expected a 4-D input [N,C,H,W] with C=64, got [8, 32, 14, 14]");
  EXPECT_THAT(error_of([] {
                check_attention_input("SE", torch::zeros({8, 32}), 32);
              }),
              HasSubstr("SE: expected a 4-D input [N,C,H,W] with C=32, got [8, 32]"));
  EXPECT_THAT(error_of([] {
                check_attention_input("NonLocal", torch::zeros({1, 4, 3, 3}), -1, 3);
              }),
              HasSubstr("5-D input [N,C,T,H,W]"));
  EXPECT_THAT(error_of([] {
                check_attention_input("ECA", torch::zeros({1, 4, 3, 3}, torch::kLong), 4);
              }),
              HasSubstr("ECA: expected a floating-point input, got Long"));
  EXPECT_THAT(error_of([] { check_attention_input("SE", torch::Tensor(), 4); }),
              HasSubstr("undefined"));
}

TEST(GatedOutput, MultipliesAndReportsTheGate) {
  const auto x = torch::randn({2, 3, 4, 4});
  const auto gate = torch::rand({2, 3, 1, 1});
  const auto out = dynattn::gated_output(x, gate);
  EXPECT_TRUE(out.output.equal(x * gate));
  ASSERT_EQ(out.maps.size(), 1u);
  EXPECT_TRUE(out.maps.at("gate").equal(gate));
}
