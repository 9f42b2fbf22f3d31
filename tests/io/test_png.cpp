#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "dynattn/io/atomic_file.h"
#include "dynattn/io/png.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {
std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("dynattn-png-" + name)).string();
}
}  // namespace

TEST(Png, GreyAndRgbRoundTripExactly) {
  const auto grey = torch::randint(0, 256, {5, 7}, torch::kUInt8);
  const auto rgb = torch::randint(0, 256, {4, 3, 3}, torch::kUInt8);
  const std::string a = temp_path("grey.png"), b = temp_path("rgb.png");
  write_png(a, grey);
  write_png(b, rgb);
  EXPECT_TRUE(read_png(a).equal(grey));
  EXPECT_TRUE(read_png(b).equal(rgb));
  // A PNG starts with its 8-byte signature.
  EXPECT_EQ(read_file(a).substr(1, 3), "PNG");
  std::filesystem::remove(a);
  std::filesystem::remove(b);
}

TEST(Png, ErrorsNameTheFileAndTheProblem) {
  EXPECT_THAT(error_of([] {
                encode_png(torch::zeros({4, 4}), "x.png");
              }),
              HasSubstr("x.png: a PNG needs a uint8 image [H,W] or [H,W,3], got Float"));
  EXPECT_THAT(error_of([] {
                encode_png(torch::zeros({4, 4, 2}, torch::kUInt8), "y.png");
              }),
              HasSubstr("y.png"));
  const std::string bad = temp_path("bad.png");
  write_file_atomic(bad, "not an image");
  EXPECT_THAT(error_of([&] { read_png(bad); }), HasSubstr("not a PNG file"));
  const std::string truncated = temp_path("truncated.png");
  write_file_atomic(truncated, encode_png(torch::zeros({8, 8}, torch::kUInt8)).substr(0, 40));
  EXPECT_THAT(error_of([&] { read_png(truncated); }), HasSubstr("corrupt PNG"));
  std::filesystem::remove(bad);
  std::filesystem::remove(truncated);
}
