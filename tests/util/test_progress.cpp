#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "dynattn/util/progress.h"

using dynattn::ProgressBar;

namespace {
std::string read_all(std::FILE* f) {
  std::rewind(f);
  std::string out;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  return out;
}
}  // namespace

TEST(ProgressBar, FormatsDurations) {
  EXPECT_EQ(ProgressBar::format_duration(0), "0:00");
  EXPECT_EQ(ProgressBar::format_duration(65), "1:05");
  EXPECT_EQ(ProgressBar::format_duration(3723), "1:02:03");
  EXPECT_EQ(ProgressBar::format_duration(-1), "?");
}

// Not a terminal: plain lines, throttled, and always a final line.
TEST(ProgressBar, PlainLinesWhenNotATerminal) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("epoch 1/3", 100, f, /*interactive=*/0, /*log_interval_s=*/3600);
    EXPECT_FALSE(bar.interactive());
    for (int i = 1; i <= 100; ++i) bar.update(i, i * 10, "loss 0.5");
    bar.finish(1000, "loss 0.4");
  }
  const std::string out = read_all(f);
  std::fclose(f);
  EXPECT_EQ(out.find('\r'), std::string::npos);
  EXPECT_EQ(out.find("\033["), std::string::npos);
  // One line at the first update (then throttled) and the final one.
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 2) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("epoch 1/3 100/100 (100%)  loss 0.4"));
  EXPECT_THAT(out, ::testing::HasSubstr("img/s"));
  EXPECT_THAT(out, ::testing::HasSubstr("took"));
}

TEST(ProgressBar, RedrawsOneLineOnATerminal) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("eval", 4, f, /*interactive=*/1);
    bar.update(2, 20, "acc 90%");
    bar.finish(40, "acc 91%");
  }
  const std::string out = read_all(f);
  std::fclose(f);
  EXPECT_THAT(out, ::testing::HasSubstr("\r\033[Keval [############............] 2/4"));
  EXPECT_THAT(out, ::testing::HasSubstr("[########################] 4/4  acc 91%"));
  EXPECT_EQ(out.back(), '\n');
}
