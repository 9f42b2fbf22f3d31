// Slow end-to-end tests of the dynattn executable: short training runs on Fashion-MNIST with a
// resume and an evaluation, the NaN stop (exit code 2, last good checkpoint kept), and
// benchmarks with --compare-malloc and of a trained checkpoint. Each run starts a fresh process.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "cli_expect.h"
#include "cli_runner.h"
#include "dynattn/models/registry.h"

using namespace dynattn::cli_test;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

namespace {

int count_lines_starting_with(const std::string& text, const std::string& prefix) {
  int n = 0;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) n += line.rfind(prefix, 0) == 0 ? 1 : 0;
  return n;
}

const std::regex kNanOrInf("NaN|infinite");

int64_t parameter_count(const std::string& spec) {
  auto model = dynattn::create_model(spec);
  int64_t n = 0;
  for (const auto& p : model.ptr()->parameters()) n += p.numel();
  return n;
}

}  // namespace

// Train one epoch (three batches), resume to a second, then evaluate the checkpoint.
TEST(SlowCli, TrainResumeAndEvaluateOnFashionMnist) {
  REQUIRE_FASHION_MNIST();
  TempDir tmp;
  const std::string run = tmp / "run";
  const std::vector<std::string> train{
      "train", "--model", "resnet20", "--max-batches", "3", "--batch", "32", "--out", run};

  // Epoch 1.
  auto args = train;
  args.insert(args.end(), {"--epochs", "1"});
  auto r = run_dynattn(args);
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "checkpoint.json",
                        "metrics.jsonl", "test.json"}) {
    EXPECT_TRUE(fs::is_regular_file(run + "/" + f)) << f << "\n" << r.describe();
  }
  EXPECT_THAT(r.out, HasSubstr("test accuracy")) << r.describe();
  const auto meta1 = read_json(run + "/checkpoint.json");
  EXPECT_EQ(meta1["epoch"].get<int64_t>(), 1) << meta1.dump(2);
  EXPECT_EQ(meta1["model"].get<std::string>(), "resnet20") << meta1.dump(2);
  auto metrics = read_jsonl(run + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["epoch"].get<int64_t>(), 1) << metrics[0].dump();
  const auto test1 = read_json(run + "/test.json");
  EXPECT_GE(test1["test_accuracy"].get<double>(), 0.0) << test1.dump(2);
  EXPECT_LE(test1["test_accuracy"].get<double>(), 1.0) << test1.dump(2);

  // Epoch 2, resumed.
  args = train;
  args.insert(args.end(), {"--epochs", "2", "--resume"});
  r = run_dynattn(args);
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  EXPECT_TRUE(std::regex_search(r.err, std::regex("resuming .* from epoch 1")))
      << "expected 'resuming ... from epoch 1' on stderr\n"
      << r.describe();
  EXPECT_THAT(r.out, HasSubstr("test accuracy")) << r.describe();
  const auto meta2 = read_json(run + "/checkpoint.json");
  EXPECT_EQ(meta2["epoch"].get<int64_t>(), 2) << meta2.dump(2);
  metrics = read_jsonl(run + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 2u);
  EXPECT_EQ(metrics[0]["epoch"].get<int64_t>(), 1) << metrics[0].dump();
  EXPECT_EQ(metrics[1]["epoch"].get<int64_t>(), 2) << metrics[1].dump();
  const auto test2 = read_json(run + "/test.json");

  // Evaluate it.
  const std::string eval_json = tmp / "eval.json";
  r = run_dynattn({"eval", "--checkpoint", run, "--json", eval_json});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  const auto j = read_json(eval_json);
  EXPECT_EQ(j["epoch"].get<int64_t>(), 2) << j.dump(2);
  EXPECT_EQ(j["count"].get<int64_t>(), 10000) << j.dump(2);
  const double accuracy = j["accuracy"].get<double>();
  EXPECT_GE(accuracy, 0.0);
  EXPECT_LE(accuracy, 1.0);
  // Same weights, same test set as the evaluation at the end of training.
  EXPECT_NEAR(accuracy, test2["test_accuracy"].get<double>(), 5e-4) << test2.dump(2);

  ASSERT_TRUE(j["confusion"].is_array()) << j.dump(2);
  ASSERT_EQ(j["confusion"].size(), 10u) << j.dump(2);
  int64_t total = 0, diagonal = 0;
  for (size_t row = 0; row < 10; ++row) {
    ASSERT_EQ(j["confusion"][row].size(), 10u) << j.dump(2);
    int64_t row_sum = 0;
    for (size_t col = 0; col < 10; ++col) {
      const int64_t v = j["confusion"][row][col].get<int64_t>();
      EXPECT_GE(v, 0);
      row_sum += v;
      if (row == col) diagonal += v;
    }
    EXPECT_EQ(row_sum, 1000) << "Fashion-MNIST's test set has 1000 images per class, row " << row;
    total += row_sum;
  }
  EXPECT_EQ(total, 10000);
  EXPECT_NEAR(accuracy, diagonal / 10000.0, 1e-9);

  ASSERT_EQ(j["per_class_accuracy"].size(), 10u) << j.dump(2);
  ASSERT_EQ(j["classes"].size(), 10u) << j.dump(2);
  for (size_t c = 0; c < 10; ++c) {
    const double a = j["per_class_accuracy"][c].get<double>();
    EXPECT_NEAR(a, j["confusion"][c][c].get<int64_t>() / 1000.0, 1e-9) << "class " << c;
  }
  EXPECT_EQ(j["classes"][0], "T-shirt/top");
  EXPECT_EQ(j["classes"][9], "Ankle boot");

  EXPECT_THAT(r.out, HasSubstr("test accuracy")) << r.describe();
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(class\s+accuracy)"))) << r.describe();
  for (const auto& name : j["classes"]) {
    EXPECT_TRUE(std::regex_search(
        r.out, std::regex(std::regex_replace(name.get<std::string>(),
                                             std::regex(R"([/\\^$.|?*+()\[\]{}])"), R"(\$&)") +
                          R"(\s+\d+\.\d+%)")))
        << "per-class line for " << name << "\n"
        << r.describe();
  }
  EXPECT_THAT(r.out, HasSubstr("confusion matrix")) << r.describe();
  // Ten matrix rows: a name, the class index, then ten counts.
  int matrix_rows = 0;
  std::istringstream out(r.out);
  std::string line;
  const std::regex matrix_row(R"(^.{9} +\d( +\d+){10}\s*$)");
  while (std::getline(out, line)) matrix_rows += std::regex_match(line, matrix_row) ? 1 : 0;
  EXPECT_EQ(matrix_rows, 10) << r.describe();
}

// A learning rate of 1e30 blows the weights up within the first epoch: exit code 2, a message
// naming NaN or infinity and the epoch, no checkpoint. Fixed seed and one thread: the same
// stop, at the same batch, every run.
TEST(SlowCli, NanLossInTheFirstEpochStopsWithExitCode2) {
  REQUIRE_FASHION_MNIST();
  TempDir tmp;
  std::string first_message;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const std::string out = tmp / ("run" + std::to_string(attempt));
    auto r = run_dynattn({"--threads", "1", "train", "--model", "resnet20", "--epochs", "2",
                          "--max-batches", "3", "--batch", "32", "--lr", "1e30", "--seed", "0",
                          "--out", out});
    ASSERT_TRUE(r.exited) << r.describe();
    EXPECT_EQ(r.exit_code, 2) << r.describe();
    EXPECT_THAT(r.err, HasSubstr("training stopped")) << r.describe();
    EXPECT_TRUE(std::regex_search(r.err, kNanOrInf)) << r.describe();
    EXPECT_THAT(r.err, HasSubstr("epoch 1")) << r.describe();
    EXPECT_THAT(r.err, HasSubstr("no checkpoint")) << r.describe();
    EXPECT_FALSE(fs::exists(out + "/checkpoint.json")) << r.describe();
    EXPECT_FALSE(fs::exists(out + "/model.safetensors")) << r.describe();
    EXPECT_FALSE(fs::exists(out + "/test.json")) << r.describe();
    EXPECT_THAT(r.out, Not(HasSubstr("test accuracy"))) << r.describe();

    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.err, m, std::regex("training stopped: [^\n]*")))
        << r.describe();
    const std::string message = m.str();
    if (attempt == 0) {
      first_message = message;
    } else {
      EXPECT_EQ(message, first_message) << "the same stop every run";
    }
  }
}

// One good epoch, then a resumed second epoch at lr 1e30: the run stops in epoch 2 with exit
// code 2 and the epoch-1 checkpoint stays, intact and usable.
TEST(SlowCli, NanLossInTheSecondEpochKeepsTheFirstCheckpoint) {
  TempDir data, tmp;
  write_tiny_fashion_mnist(data.path(), 96, 20);
  const std::string run = tmp / "run";
  const std::vector<std::string> common{"--threads", "1",         "train",   "--model", "resnet20",
                                        "--data",    data.path(), "--batch", "32",      "--seed",
                                        "0",         "--out",     run};
  auto args = common;
  args.insert(args.end(), {"--epochs", "1"});
  auto r = run_dynattn(args);
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  const std::string weights_before = read_file(run + "/model.safetensors");

  args = common;
  args.insert(args.end(), {"--epochs", "2", "--resume", "--lr", "1e30"});
  r = run_dynattn(args);
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("training stopped")) << r.describe();
  EXPECT_TRUE(std::regex_search(r.err, kNanOrInf)) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("epoch 2")) << r.describe();
  EXPECT_TRUE(std::regex_search(r.err, std::regex(R"(checkpoint \(epoch 1\) is kept)")))
      << r.describe();
  EXPECT_EQ(read_json(run + "/checkpoint.json")["epoch"].get<int64_t>(), 1);
  EXPECT_EQ(read_jsonl(run + "/metrics.jsonl").size(), 1u);
  EXPECT_TRUE(read_file(run + "/model.safetensors") == weights_before)
      << "the epoch-1 weights must stay untouched";

  r = run_dynattn({"--quiet", "eval", "--checkpoint", run, "--data", data.path()});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  EXPECT_THAT(r.out, HasSubstr("epoch 1")) << r.describe();
}

TEST(SlowCli, BenchComparesAllocatorPolicies) {
  TempDir tmp;
  const std::string json_path = tmp / "bench.json";
  auto r = run_dynattn({"bench", "--model", "resnet20", "--batch", "1", "--min-time", "0.05",
                        "--no-peak", "--threads", "1", "--compare-malloc", "--json", json_path});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  EXPECT_THAT(r.out, HasSubstr("same run with --malloc default")) << r.describe();
  // The child's results are printed once, by the parent, not also by the child itself.
  EXPECT_EQ(count_lines_starting_with(r.out, "model resnet20:"), 1) << r.describe();
  const auto j = read_json(json_path);
  EXPECT_EQ(j["malloc"], "tuned") << j.dump(2);
  ASSERT_TRUE(j.contains("compare_malloc") && j["compare_malloc"].is_object()) << j.dump(2);
  const auto& other = j["compare_malloc"];
  EXPECT_EQ(other["malloc"], "default") << j.dump(2);
  EXPECT_EQ(other["model"], "resnet20") << j.dump(2);
  EXPECT_EQ(other["threads"].get<int>(), 1) << "the child gets the same --threads\n" << j.dump(2);
  EXPECT_EQ(other["parameters"].get<int64_t>(), 272186) << j.dump(2);
  ASSERT_TRUE(other["batches"].is_array()) << j.dump(2);
  ASSERT_EQ(other["batches"].size(), 1u) << j.dump(2);
  EXPECT_EQ(other["batches"][0]["batch"].get<int64_t>(), 1) << j.dump(2);
  EXPECT_GT(other["batches"][0]["median_ms"].get<double>(), 0.0) << j.dump(2);
  EXPECT_GE(other["batches"][0]["p90_ms"].get<double>(),
            other["batches"][0]["median_ms"].get<double>())
      << j.dump(2);
  ASSERT_EQ(j["batches"].size(), 1u) << j.dump(2);
  EXPECT_GT(j["batches"][0]["median_ms"].get<double>(), 0.0) << j.dump(2);
}

// A checkpoint trained by the CLI (a narrow ResNet-20 on tiny data, so it cannot be mistaken
// for the default model) is what `bench --checkpoint` measures.
TEST(SlowCli, BenchOfATrainedCheckpoint) {
  TempDir data, tmp;
  write_tiny_fashion_mnist(data.path(), 64, 20);
  const std::string run = tmp / "run";
  auto r = run_dynattn({"--quiet", "--threads", "1", "train", "--model", "resnet20:width=8",
                        "--data", data.path(), "--epochs", "1", "--batch", "16", "--out", run});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  const std::string spec = read_json(run + "/checkpoint.json")["model"].get<std::string>();
  EXPECT_THAT(spec, HasSubstr("width=8"));
  const int64_t params = parameter_count(spec);
  ASSERT_NE(params, 272186);

  const std::string json_path = tmp / "bench.json";
  r = run_dynattn({"bench", "--checkpoint", run, "--batch", "1", "--min-time", "0.05", "--no-peak",
                   "--threads", "1", "--json", json_path});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  EXPECT_THAT(r.out, HasSubstr("model " + spec + ":")) << r.describe();
  EXPECT_THAT(r.out, HasSubstr(std::to_string(params) + " parameters")) << r.describe();
  const auto j = read_json(json_path);
  EXPECT_EQ(j["model"], spec) << j.dump(2);
  EXPECT_EQ(j["parameters"].get<int64_t>(), params) << j.dump(2);
  ASSERT_EQ(j["batches"].size(), 1u) << j.dump(2);
  EXPECT_GT(j["batches"][0]["median_ms"].get<double>(), 0.0) << j.dump(2);

  // --model and --checkpoint exclude each other.
  r = run_dynattn({"bench", "--checkpoint", run, "--model", "resnet20"});
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_TRUE(is_cli11_usage_code(r.exit_code)) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("--checkpoint")) << r.describe();
}

// --compare-malloc re-runs the bench in a child process: a checkpoint path with a space and a
// single quote must reach the child intact.
TEST(SlowCli, BenchCompareMallocPassesAwkwardPathsToTheChild) {
  TempDir data, tmp;
  write_tiny_fashion_mnist(data.path(), 32, 20);
  const std::string run = tmp / "run it's $HOME";
  auto r = run_dynattn({"--quiet", "--threads", "1", "train", "--model", "resnet20:width=8",
                        "--data", data.path(), "--epochs", "1", "--batch", "16", "--out", run});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  const std::string spec = read_json(run + "/checkpoint.json")["model"].get<std::string>();

  const std::string json_path = tmp / "bench.json";
  r = run_dynattn({"--quiet", "bench", "--checkpoint", run, "--batch", "1", "--min-time", "0.05",
                   "--no-peak", "--threads", "1", "--compare-malloc", "--json", json_path});
  ASSERT_NO_FATAL_FAILURE(expect_success(r));
  const auto j = read_json(json_path);
  ASSERT_TRUE(j.contains("compare_malloc")) << j.dump(2);
  EXPECT_EQ(j["compare_malloc"]["model"], spec) << j.dump(2);
  EXPECT_EQ(j["compare_malloc"]["malloc"], "default") << j.dump(2);
}
