#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/core/strings.h"
#include "test_util.h"

using dynattn::parse_int_list;
using dynattn::trim;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

TEST(Strings, TrimRemovesSurroundingWhitespaceOnly) {
  EXPECT_EQ(trim("  a b\t\r\n"), "a b");
  EXPECT_EQ(trim(" \t\n"), "");
  EXPECT_EQ(trim("x"), "x");
}

TEST(Strings, ParseIntList) {
  EXPECT_EQ(parse_int_list("1,2, 3", "t"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(parse_int_list("-4", "t"), (std::vector<int64_t>{-4}));
  EXPECT_EQ(parse_int_list("1/2/2", "t"), (std::vector<int64_t>{1, 2, 2}));
  for (const char* bad : {"", "1,,2", "1,a", "1.5", "2x", "1,"}) {
    EXPECT_THAT(error_of([&] { parse_int_list(bad, "option stages"); }),
                HasSubstr("option stages: expected a list of integers separated by"))
        << bad;
  }
}
