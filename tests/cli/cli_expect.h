// Expectations and fixtures shared by the CLI tests (tests/cli/*.cpp): the real Fashion-MNIST
// files, how a successful or failed run must look, and JSON readers for what a run wrote.
#pragma once
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_runner.h"

namespace dynattn::cli_test {

const std::string kFashionMnist = "/usr/share/datasets/fashion-mnist";
const std::vector<std::string> kFashionMnistFiles = {
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz"};

bool have_fashion_mnist() {
  for (const auto& f : kFashionMnistFiles) {
    if (!std::filesystem::exists(kFashionMnist + "/" + f)) return false;
  }
  return true;
}

#define REQUIRE_FASHION_MNIST()                                              \
  do {                                                                       \
    if (!have_fashion_mnist()) {                                             \
      GTEST_SKIP() << "Fashion-MNIST not found in " << kFashionMnist         \
                   << " (install the Debian package dataset-fashion-mnist)"; \
    }                                                                        \
  } while (0)

// A failed run must exit normally (no signal, no abort) with 1 (a run-time error) or one of
// CLI11's usage codes, and must not print a C++ backtrace.
void expect_clean_failure(const CommandResult& r) {
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_TRUE(r.exit_code == 1 || is_cli11_usage_code(r.exit_code)) << r.describe();
  EXPECT_THAT(r.err, ::testing::Not(::testing::HasSubstr("Exception raised from"))) << r.describe();
  EXPECT_THAT(r.err, ::testing::Not(::testing::HasSubstr("terminate called"))) << r.describe();
}

// A run-time error: exit code 1 and "dynattn: error: ..." on stderr.
void expect_runtime_error(const CommandResult& r) {
  expect_clean_failure(r);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_THAT(r.err, ::testing::HasSubstr("error")) << r.describe();
}

// A command-line usage error: CLI11's exit code and a message naming the option.
void expect_usage_error(const CommandResult& r, const std::string& option) {
  expect_clean_failure(r);
  EXPECT_TRUE(is_cli11_usage_code(r.exit_code)) << r.describe();
  EXPECT_THAT(r.err, ::testing::HasSubstr(option)) << r.describe();
}

nlohmann::json read_json(const std::string& path) {
  return nlohmann::json::parse(read_file(path));
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(nlohmann::json::parse(line));
  }
  return lines;
}

void expect_success(const CommandResult& r) {
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
}

}  // namespace dynattn::cli_test
