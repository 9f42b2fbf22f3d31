#include <gtest/gtest.h>

#include "dynattn/core/options_string.h"

using dynattn::OptionMap;
using dynattn::parse_named_options;

TEST(OptionsString, ParsesNameAndTypedValues) {
  auto n = parse_named_options("resnet20:width=16, attn=se ,p=0.5,nesterov=true", "model");
  EXPECT_EQ(n.name, "resnet20");
  EXPECT_EQ(n.options.get_int("width", 0), 16);
  EXPECT_EQ(n.options.get_string("attn", ""), "se");
  EXPECT_DOUBLE_EQ(n.options.get_double("p", 0), 0.5);
  EXPECT_TRUE(n.options.get_bool("nesterov", false));
  EXPECT_EQ(n.options.get_int("missing", 7), 7);
  EXPECT_EQ(n.to_string(), "resnet20:attn=se,nesterov=true,p=0.5,width=16");
}

TEST(OptionsString, NameWithoutOptions) {
  auto n = parse_named_options("none", "attention");
  EXPECT_EQ(n.name, "none");
  EXPECT_TRUE(n.options.empty());
}

TEST(OptionsString, ErrorsNameContextAndKey) {
  auto n = parse_named_options("resnet20:width=abc", "model");
  try {
    n.options.get_int("width", 0);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("model resnet20"), std::string::npos) << msg;
    EXPECT_NE(msg.find("width"), std::string::npos) << msg;
    EXPECT_NE(msg.find("integer"), std::string::npos) << msg;
  }
  EXPECT_THROW(parse_named_options("resnet20:width", "model"), c10::Error);
  EXPECT_THROW(parse_named_options("resnet20:a=1,a=2", "model"), c10::Error);
  EXPECT_THROW(parse_named_options(":a=1", "model"), c10::Error);
  EXPECT_THROW(n.options.get_bool("width", false), c10::Error);
}

TEST(OptionsString, UnknownKeysAreRejected) {
  auto m = OptionMap::parse("widht=16", "model resnet20");
  try {
    m.check_known({"width", "attn"});
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("widht"), std::string::npos) << msg;
    EXPECT_NE(msg.find("width, attn"), std::string::npos) << msg;
  }
}

TEST(OptionsString, BracketsNestOptionStrings) {
  auto n = parse_named_options("resnet20:attn=[cbam:r=8,kernel=7],depth=20", "model");
  EXPECT_EQ(n.options.get_string("attn", ""), "cbam:r=8,kernel=7");
  EXPECT_EQ(n.options.get_int("depth", 0), 20);
  EXPECT_EQ(n.to_string(), "resnet20:attn=[cbam:r=8,kernel=7],depth=20");
  EXPECT_EQ(parse_named_options(n.to_string(), "model").to_string(), n.to_string());
  EXPECT_THROW(parse_named_options("resnet20:attn=[cbam:r=8", "model"), c10::Error);
  EXPECT_THROW(parse_named_options("resnet20:attn=cbam]", "model"), c10::Error);
}
