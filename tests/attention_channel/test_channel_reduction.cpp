#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/attention/channel_reduction.h"
#include "test_util.h"

using dynattn::make_divisible;
using dynattn::reduced_channels;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

// Expected values from timm.layers.helpers.make_divisible, evaluated in Python.
TEST(MakeDivisible, MatchesTimm) {
  EXPECT_EQ(make_divisible(4), 8);               // below the divisor: raised to min_value = divisor
  EXPECT_EQ(make_divisible(64.0 / 16), 8);       // SE's C = 64, r = 16 in timm
  EXPECT_EQ(make_divisible(11), 16);             // 8 would lose > 10% of 11
  EXPECT_EQ(make_divisible(11, 8, 0, 0.0), 8);   // round_limit 0: plain rounding
  EXPECT_EQ(make_divisible(12, 8, 0, 0.9), 16);  // halves round up
  EXPECT_EQ(make_divisible(37), 40);
  EXPECT_EQ(make_divisible(33), 32);
  EXPECT_EQ(make_divisible(100, 8, 0, 0.0), 104);
  EXPECT_EQ(make_divisible(3, 4, 16), 16);       // explicit min_value
  EXPECT_EQ(make_divisible(1.5, 1, 0, 0.0), 2);  // timm's CBAM width for C = 24, r = 16
  EXPECT_EQ(make_divisible(0.5, 1, 0, 0.0), 1);
}

TEST(MakeDivisible, RejectsBadArguments) {
  EXPECT_THAT(error_of([] { make_divisible(4, 0); }), HasSubstr("divisor must be positive"));
  EXPECT_THAT(error_of([] { make_divisible(-1); }), HasSubstr("finite and >= 0"));
}

TEST(ReducedChannels, FloorIsThePapersWidth) {
  EXPECT_EQ(reduced_channels(64, 16), 4);
  EXPECT_EQ(reduced_channels(16, 16), 1);
  EXPECT_EQ(reduced_channels(40, 16), 2);  // floor(2.5)
  EXPECT_EQ(reduced_channels(8, 16), 1);   // never 0 (the official code's C // r would be)
  EXPECT_EQ(reduced_channels(64, 2.5), 25);
}

TEST(ReducedChannels, DivisibleIsTimms) {
  EXPECT_EQ(reduced_channels(64, 16, "divisible"), 8);
  EXPECT_EQ(reduced_channels(256, 16, "divisible"), 16);
  EXPECT_EQ(reduced_channels(176, 16, "divisible"), 8);    // 11 rounds to 8: round_limit 0
  EXPECT_EQ(reduced_channels(40, 16, "divisible", 1), 3);  // 2.5 rounds half up
}

TEST(ReducedChannels, ExplicitWidthWins) {
  EXPECT_EQ(reduced_channels(64, 16, "explicit", 8, 5), 5);
  EXPECT_EQ(reduced_channels(64, 16, "floor", 8, 5), 5);
  EXPECT_EQ(reduced_channels(64, 16, "divisible", 8, 5), 5);
}

TEST(ReducedChannels, ErrorsNameTheModuleAndTheExpectation) {
  EXPECT_THAT(error_of([] { reduced_channels(64, 0, "floor", 8, 0, "SE"); }),
              HasSubstr("SE: reduction ratio r must be positive, got 0"));
  EXPECT_THAT(
      error_of([] { reduced_channels(64, 16, "ceil", 8, 0, "SE"); }),
      HasSubstr("SE: reduction policy must be one of floor, divisible, explicit; got 'ceil'"));
  EXPECT_THAT(
      error_of([] { reduced_channels(64, 16, "explicit", 8, 0, "CBAM"); }),
      HasSubstr("CBAM: reduction policy 'explicit' needs an explicit reduced width rd > 0"));
  EXPECT_THAT(error_of([] { reduced_channels(64, 16, "floor", 8, -2, "BAM"); }),
              HasSubstr("BAM: explicit reduced width rd must be positive"));
  EXPECT_THAT(error_of([] { reduced_channels(64, 16, "divisible", 0); }),
              HasSubstr("divisor must be positive"));
  EXPECT_THAT(error_of([] { reduced_channels(0, 16); }), HasSubstr("channels must be positive"));
}
