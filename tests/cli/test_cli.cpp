// End-to-end tests of the dynattn executable: version and usage, the zoo, the start-up banner
// and thread settings, a short benchmark, and the error paths (exit code, a message that names
// the culprit and what was expected, never a crash). Each run starts a fresh process.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "cli_expect.h"
#include "cli_runner.h"
#include "dynattn/core/version.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/png.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/models/registry.h"

using namespace dynattn::cli_test;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

namespace {

// The cheapest real benchmark: one batch size, a few timed runs, no conv-peak measurement.
std::vector<std::string> quick_bench(std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"bench", "--model",    "resnet20", "--batch",
                                "1",     "--min-time", "0.01",     "--no-peak"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// The message says that a positive value was expected (not only a range of raw doubles).
void expect_says_positive(const CommandResult& r) {
  static const std::regex positive("positive|at least 1|>= ?1|greater than 0|> ?0",
                                   std::regex::icase);
  EXPECT_TRUE(std::regex_search(r.err, positive))
      << "the message should say that a positive value is expected\n"
      << r.describe();
}

std::string banner_line(const std::string& err) {
  std::istringstream in(err);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find("LibTorch") != std::string::npos) return line;
  }
  return "";
}

// An untrained ResNet-20 saved as a checkpoint, the way `dynattn train` saves one.
void write_untrained_checkpoint(const std::string& dir) {
  torch::manual_seed(0);
  auto model = dynattn::create_model("resnet20");
  dynattn::save_checkpoint(dir, *model.ptr(), R"({"model": "resnet20", "epoch": 1})", {});
}

// An untrained checkpoint and a tiny data directory (16 train, 20 test images): `eval` on
// them is a complete, cheap run.
struct TinyRun {
  TempDir ckpt, data;
  TinyRun() {
    write_untrained_checkpoint(ckpt.path());
    write_tiny_fashion_mnist(data.path(), 16, 20);
  }
  std::vector<std::string> eval_args(std::vector<std::string> extra = {}) const {
    std::vector<std::string> args{"eval", "--checkpoint", ckpt.path(), "--data", data.path()};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
};

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

// ---- version and usage ----

TEST(CliBasics, VersionPrintsTheVersion) {
  auto r = run_dynattn({"--version"});
  ASSERT_TRUE(r.exited) << r.describe();
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr(dynattn::version())) << r.describe();
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(\d+\.\d+\.\d+)"))) << r.describe();
}

TEST(CliBasics, NoSubcommandIsAUsageError) {
  auto r = run_dynattn({});
  expect_clean_failure(r);
  EXPECT_NE(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("subcommand")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("--help")) << r.describe();
}

// ---- zoo ----

// Also: a global option after the subcommand (fallthrough) is accepted.
TEST(CliZoo, ListsResnet20WithParametersAndMacsAsTextAndJson) {
  TempDir tmp;
  const std::string json_path = tmp / "zoo.json";
  auto r = run_dynattn({"zoo", "--threads", "1", "--json", json_path});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(resnet20\s+272186\s+31\.02 M)")))
      << r.describe();
  for (const char* name : {"resnet32", "resnet56", "resnet110"}) {
    EXPECT_THAT(r.out, HasSubstr(name)) << r.describe();
  }

  const auto j = nlohmann::json::parse(read_file(json_path));
  ASSERT_TRUE(j.contains("models") && j["models"].is_array()) << j.dump(2);
  const nlohmann::json* r20 = nullptr;
  for (const auto& m : j["models"]) {
    if (m.value("name", "") == "resnet20") r20 = &m;
  }
  ASSERT_NE(r20, nullptr) << j.dump(2);
  EXPECT_EQ((*r20)["parameters"].get<int64_t>(), 272186);
  EXPECT_EQ((*r20)["macs_per_image"].get<int64_t>(), 31021952);
  EXPECT_NEAR((*r20)["macs_per_image"].get<int64_t>() / 1e6, 31.02, 0.005);
}

// ---- start-up banner and threads ----
// A cheap successful run: evaluating an untrained checkpoint on 20 synthetic test images.

TEST(CliBanner, NamesLibTorchThreadsAndBlas) {
  TinyRun tiny;
  auto r = run_dynattn(tiny.eval_args(), {{"OMP_NUM_THREADS", std::nullopt}});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const std::string banner = banner_line(r.err);
  ASSERT_FALSE(banner.empty()) << "no start-up banner on stderr\n" << r.describe();
  const std::string libtorch =
      "LibTorch " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  EXPECT_THAT(banner, HasSubstr(libtorch)) << r.describe();
  EXPECT_THAT(banner, HasSubstr(dynattn::version())) << r.describe();
  EXPECT_TRUE(std::regex_search(banner, std::regex(R"(threads [1-9][0-9]*)"))) << r.describe();
  EXPECT_THAT(banner, HasSubstr("BLAS")) << r.describe();
  EXPECT_THAT(banner, HasSubstr("GFLOP/s")) << r.describe();
  EXPECT_THAT(banner, HasSubstr("malloc tuned")) << r.describe();
  EXPECT_THAT(r.out, Not(HasSubstr("LibTorch"))) << "the banner belongs on stderr\n"
                                                 << r.describe();
  EXPECT_THAT(r.out, HasSubstr("on 20 images")) << r.describe();
}

TEST(CliBanner, ThreadsOptionBeforeTheSubcommand) {
  TinyRun tiny;
  std::vector<std::string> args{"--threads", "1"};
  for (const auto& a : tiny.eval_args()) args.push_back(a);
  auto r = run_dynattn(args, {{"OMP_NUM_THREADS", "2"}});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(banner_line(r.err), HasSubstr("| threads 1 |")) << r.describe();
}

// The root app uses fallthrough: global options may follow the subcommand.
TEST(CliBanner, ThreadsOptionAfterTheSubcommand) {
  TinyRun tiny;
  auto r = run_dynattn(tiny.eval_args({"--threads", "1"}), {{"OMP_NUM_THREADS", "2"}});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(banner_line(r.err), HasSubstr("| threads 1 |")) << r.describe();
}

TEST(CliBanner, OmpNumThreadsIsTheDefault) {
  TinyRun tiny;
  auto r = run_dynattn(tiny.eval_args(), {{"OMP_NUM_THREADS", "1"}});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(banner_line(r.err), HasSubstr("| threads 1 |")) << r.describe();
}

TEST(CliBanner, InvalidOmpNumThreadsIsAnError) {
  auto r = run_dynattn({"zoo"}, {{"OMP_NUM_THREADS", "abc"}});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("OMP_NUM_THREADS")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("abc")) << r.describe();
  EXPECT_THAT(r.out, Not(HasSubstr("resnet20"))) << r.describe();
}

TEST(CliBanner, QuietSuppressesTheBanner) {
  TinyRun tiny;
  auto r = run_dynattn(tiny.eval_args({"--quiet", "--threads", "1"}));
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(banner_line(r.err), "") << r.describe();
  EXPECT_THAT(r.out, HasSubstr("test accuracy")) << r.describe();
}

// ---- bench ----

TEST(CliBench, WritesJsonWithParametersMacsAndBatchTimings) {
  TempDir tmp;
  const std::string json_path = tmp / "bench.json";
  auto r = run_dynattn({"bench", "--model", "resnet20", "--batch", "1,2", "--min-time", "0.05",
                        "--no-peak", "--threads", "1", "--json", json_path});
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("272186 parameters")) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("31.02 M MACs per image")) << r.describe();

  const auto j = nlohmann::json::parse(read_file(json_path));
  EXPECT_EQ(j["model"], "resnet20") << j.dump(2);
  EXPECT_EQ(j["parameters"].get<int64_t>(), 272186) << j.dump(2);
  EXPECT_EQ(j["macs_per_image"].get<int64_t>(), 31021952) << j.dump(2);
  EXPECT_EQ(j["threads"].get<int>(), 1) << j.dump(2);
  EXPECT_EQ(j["channels_last"].get<bool>(), false) << j.dump(2);
  ASSERT_TRUE(j["batches"].is_array()) << j.dump(2);
  ASSERT_EQ(j["batches"].size(), 2u) << j.dump(2);
  for (size_t i = 0; i < 2; ++i) {
    const auto& b = j["batches"][i];
    EXPECT_EQ(b["batch"].get<int64_t>(), static_cast<int64_t>(i + 1)) << b.dump(2);
    EXPECT_GT(b["median_ms"].get<double>(), 0.0) << b.dump(2);
    EXPECT_GE(b["p90_ms"].get<double>(), b["median_ms"].get<double>()) << b.dump(2);
    EXPECT_GT(b["iterations"].get<int64_t>(), 0) << b.dump(2);
    EXPECT_GT(b["images_per_sec"].get<double>(), 0.0) << b.dump(2);
  }
}

TEST(CliBench, ChannelsLastIsAccepted) {
  TempDir tmp;
  const std::string json_path = tmp / "bench.json";
  auto r = run_dynattn(
      quick_bench({"--channels-last", "--quiet", "--threads", "1", "--json", json_path}));
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("(channels-last)")) << r.describe();
  const auto j = nlohmann::json::parse(read_file(json_path));
  EXPECT_EQ(j["channels_last"].get<bool>(), true) << j.dump(2);
  EXPECT_EQ(j["macs_per_image"].get<int64_t>(), 31021952) << j.dump(2);
}

// ---- eval (the full-size run is in slow_cli.cpp) ----

TEST(CliEval, WritesAccuracyPerClassAndConfusionAsJson) {
  TinyRun tiny;
  TempDir out;
  const std::string json_path = out / "eval.json";
  auto r = run_dynattn(tiny.eval_args({"--quiet", "--threads", "1", "--json", json_path}));
  ASSERT_TRUE(r.exited) << r.describe();
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("test accuracy")) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("confusion matrix")) << r.describe();
  EXPECT_THAT(r.out, HasSubstr(json_path)) << r.describe();
  const auto j = nlohmann::json::parse(read_file(json_path));
  EXPECT_EQ(j["model"], "resnet20") << j.dump(2);
  EXPECT_EQ(j["epoch"].get<int64_t>(), 1) << j.dump(2);
  EXPECT_EQ(j["count"].get<int64_t>(), 20) << j.dump(2);
  EXPECT_GE(j["accuracy"].get<double>(), 0.0) << j.dump(2);
  EXPECT_LE(j["accuracy"].get<double>(), 1.0) << j.dump(2);
  ASSERT_EQ(j["per_class_accuracy"].size(), 10u) << j.dump(2);
  ASSERT_EQ(j["confusion"].size(), 10u) << j.dump(2);
  int64_t total = 0;
  for (size_t row = 0; row < 10; ++row) {
    ASSERT_EQ(j["confusion"][row].size(), 10u) << j.dump(2);
    int64_t row_sum = 0;
    for (const auto& v : j["confusion"][row]) row_sum += v.get<int64_t>();
    EXPECT_EQ(row_sum, 2) << "two synthetic images per class; row " << row;
    total += row_sum;
  }
  EXPECT_EQ(total, 20);
}

// ---- error paths ----

TEST(CliErrors, UnknownModelListsTheKnownModels) {
  auto r = run_dynattn({"--quiet", "train", "--model", "resnet21"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("resnet21")) << r.describe();
  for (const char* known : {"resnet20", "resnet32", "resnet56", "resnet110"}) {
    EXPECT_THAT(r.err, HasSubstr(known)) << r.describe();
  }
}

TEST(CliErrors, UnknownModelOptionListsTheKnownOptions) {
  auto r = run_dynattn({"--quiet", "bench", "--model", "resnet20:widht=8"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("widht")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("width")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("resnet20")) << r.describe();
}

TEST(CliErrors, TrainWithMissingDataNamesTheFileAndHintsAtData) {
  auto r = run_dynattn({"--quiet", "train", "--data", "/nonexistent", "--epochs", "1"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/train-images-idx3-ubyte.gz")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("--data")) << r.describe();
}

TEST(CliErrors, EvalWithMissingDataNamesTheFileAndHintsAtData) {
  TempDir ckpt;
  write_untrained_checkpoint(ckpt.path());
  auto r = run_dynattn({"--quiet", "eval", "--checkpoint", ckpt.path(), "--data", "/nonexistent"});
  expect_runtime_error(r);
  EXPECT_TRUE(std::regex_search(
      r.err, std::regex(R"(/nonexistent/(train|t10k)-(images-idx3|labels-idx1)-ubyte)")))
      << r.describe();
  EXPECT_THAT(r.err, HasSubstr("--data")) << r.describe();
}

// Three real files next to the first 1000 bytes of the training images' gzip.
TEST(CliErrors, TruncatedGzipNamesTheFile) {
  REQUIRE_FASHION_MNIST();
  TempDir data;
  for (size_t i = 1; i < kFashionMnistFiles.size(); ++i) {
    fs::create_symlink(kFashionMnist + "/" + kFashionMnistFiles[i], data / kFashionMnistFiles[i]);
  }
  const std::string truncated = data / kFashionMnistFiles[0];
  write_file(truncated, read_file(kFashionMnist + "/" + kFashionMnistFiles[0]).substr(0, 1000));
  auto r = run_dynattn({"--quiet", "train", "--data", data.path(), "--epochs", "1"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr(truncated)) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("truncated")) << r.describe();
}

// The test labels' gzip with garbage in the middle of its compressed stream.
TEST(CliErrors, CorruptGzipNamesTheFile) {
  REQUIRE_FASHION_MNIST();
  TempDir data, ckpt;
  write_untrained_checkpoint(ckpt.path());
  for (size_t i = 0; i + 1 < kFashionMnistFiles.size(); ++i) {
    fs::create_symlink(kFashionMnist + "/" + kFashionMnistFiles[i], data / kFashionMnistFiles[i]);
  }
  const std::string corrupt = data / kFashionMnistFiles[3];
  std::string bytes = read_file(kFashionMnist + "/" + kFashionMnistFiles[3]);
  ASSERT_GT(bytes.size(), 2000u);
  for (size_t i = 200; i < 1200; ++i) bytes[i] = static_cast<char>(0xA5 ^ (i * 7));
  write_file(corrupt, bytes);
  auto r = run_dynattn({"--quiet", "eval", "--checkpoint", ckpt.path(), "--data", data.path()});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr(corrupt)) << r.describe();
  EXPECT_THAT(r.out, Not(HasSubstr("test accuracy"))) << r.describe();
}

TEST(CliErrors, EvalOfMissingCheckpointNamesThePath) {
  auto r = run_dynattn({"--quiet", "eval", "--checkpoint", "/nonexistent/dir"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/dir")) << r.describe();
}

TEST(CliErrors, EvalOfGarbageWeightsNamesTheFile) {
  TempDir ckpt;
  write_file(ckpt / "model.safetensors", std::string(4096, '\x5a') + "not a safetensors file");
  write_file(ckpt / "checkpoint.json", R"({"model": "resnet20", "epoch": 1})");
  auto r = run_dynattn({"--quiet", "eval", "--checkpoint", ckpt.path()});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr(ckpt / "model.safetensors")) << r.describe();
}

// The results cannot be written: the error names the path and nothing is left behind (no
// directory created, no temporary file).
TEST(CliErrors, EvalJsonIntoMissingDirectoryNamesThePath) {
  TinyRun tiny;
  TempDir out;
  const auto ckpt_files = list_dir(tiny.ckpt.path());
  const std::string json_path = out / "missing/eval.json";
  auto r = run_dynattn(tiny.eval_args({"--quiet", "--threads", "1", "--json", json_path}));
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr(json_path)) << r.describe();
  EXPECT_FALSE(fs::exists(out / "missing")) << r.describe();
  EXPECT_TRUE(list_dir(out.path()).empty()) << r.describe();
  EXPECT_EQ(list_dir(tiny.ckpt.path()), ckpt_files) << r.describe();
}

TEST(CliErrors, ZeroBatchIsRejected) {
  TempDir ckpt;  // never read: the option is checked first
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"train", "--batch", "0"},
           {"bench", "--batch", "1,0"},
           {"eval", "--checkpoint", ckpt.path(), "--batch", "0"}}) {
    auto r = run_dynattn(args);
    expect_usage_error(r, "--batch");
    expect_says_positive(r);
    EXPECT_EQ(banner_line(r.err), "") << "rejected before any work\n" << r.describe();
  }
}

TEST(CliErrors, NegativeLearningRateIsRejected) {
  auto r = run_dynattn({"train", "--lr", "-1"});
  expect_usage_error(r, "--lr");
  EXPECT_THAT(r.err, HasSubstr("-1")) << r.describe();
  expect_says_positive(r);
}

TEST(CliErrors, UnknownOptimizerIsRejected) {
  auto r = run_dynattn({"train", "--optimizer", "rmsprop"});
  expect_usage_error(r, "--optimizer");
  EXPECT_THAT(r.err, HasSubstr("rmsprop")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("sgd")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("adamw")) << r.describe();
}

TEST(CliErrors, NegativeMinTimeNamesTheOption) {
  auto r = run_dynattn({"--quiet", "bench", "--batch", "1", "--min-time", "-1", "--no-peak"});
  expect_clean_failure(r);
  EXPECT_NE(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("--min-time")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("-1")) << r.describe();
}

TEST(CliErrors, UnknownDeviceNamesTheOption) {
  auto r = run_dynattn({"--quiet", "bench", "--device", "gpu"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("--device")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("gpu")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("cuda")) << r.describe();
}

// `forward` runs a model with given weights on a tensor file: the result equals the library's.
TEST(Cli, ForwardRunsAModelOnATensorFile) {
  TempDir dir;
  torch::manual_seed(3);
  auto model = dynattn::create_model("resnet20");
  {
    torch::NoGradGuard no_grad;  // BN statistics that matter, so eval mode is visible
    for (auto& b : model.ptr()->named_buffers()) {
      if (b.key().find("running_var") != std::string::npos) b.value().uniform_(0.5, 1.5);
    }
    for (auto& p : model.ptr()->named_parameters()) {
      if (p.key().find("bn2.weight") != std::string::npos) p.value().fill_(0.5);
    }
  }
  dynattn::write_safetensors(dir / "w.safetensors", dynattn::state_dict(*model.ptr()));
  const auto x = torch::randn({2, 1, 28, 28});
  dynattn::write_safetensors(dir / "x.safetensors", {{"img", x}});
  const auto r = run_dynattn({"--threads", "1", "forward", "--model", "resnet20", "--weights",
                              dir / "w.safetensors", "--input", dir / "x.safetensors",
                              "--input-key", "img", "--output", dir / "y.safetensors"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto out = dynattn::read_safetensors(dir / "y.safetensors");
  ASSERT_NE(out.find("y"), nullptr);
  model.ptr()->eval();
  torch::NoGradGuard no_grad;
  const auto expected = model.forward(x);
  EXPECT_TRUE(torch::allclose(*out.find("y"), expected, 1e-5, 1e-5)) << *out.find("y") << "\n"
                                                                     << expected;
  EXPECT_EQ(out.metadata.at("model"), "resnet20");
}

TEST(Cli, ForwardErrorsNameTheFileTheKeyOrTheModule) {
  TempDir dir;
  dynattn::write_safetensors(dir / "x.safetensors", {{"a", torch::zeros({1, 1, 28, 28})},
                                                     {"labels", torch::zeros({1}, torch::kLong)}});
  auto forward = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"forward", "--input", dir / "x.safetensors", "--output",
                                  dir / "y.safetensors"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_dynattn(args);
  };
  auto r = forward({"--model", "resnet20"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("no tensor 'x' (it holds: a, labels)"));
  r = forward({"--model", "resnet20", "--input-key", "labels"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("must be floating point"));
  r = forward({"--model", "resnet21", "--input-key", "a"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("unknown model or attention module 'resnet21'"));
  r = forward({"--model", "resnet20", "--input-key", "a", "--key-map", "timm"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("--key-map needs --weights"));
  dynattn::write_safetensors(dir / "w.safetensors", {{"head.weight", torch::zeros({10, 64})}});
  r = forward({"--model", "resnet20", "--input-key", "a", "--weights", dir / "w.safetensors"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("head.weight"));
  EXPECT_FALSE(fs::exists(dir / "y.safetensors")) << "nothing is written after an error";
}

// The README's example: weights of the CBAM authors' code, renamed by --key-map, give the
// reference output; --maps adds the channel and spatial maps.
TEST(Cli, ForwardImportsOfficialCbamWeights) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 has no torch (install python3-torch)";
  TempDir dir;
  const std::string make = "/usr/bin/python3 " DYNATTN_SOURCE_DIR
                           "/tests/interop/reference_attention.py --out " +
                           dir.path() + " >/dev/null";
  ASSERT_EQ(std::system(make.c_str()), 0);
  const auto r = run_dynattn({"forward", "--model", "cbam:channels=64", "--weights",
                              dir / "official_cbam.weights.safetensors", "--key-map",
                              "cbam-official", "--input", dir / "official_cbam.io.safetensors",
                              "--output", dir / "y.safetensors", "--maps"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto out = dynattn::read_safetensors(dir / "y.safetensors");
  const auto ref = dynattn::read_safetensors(dir / "official_cbam.io.safetensors");
  ASSERT_NE(out.find("y"), nullptr);
  EXPECT_LE((*out.find("y") - *ref.find("y")).abs().max().item<float>(), 1e-5f);
  ASSERT_NE(out.find("maps.spatial"), nullptr) << r.out;
  EXPECT_EQ(out.find("maps.spatial")->sizes(), torch::IntArrayRef({2, 1, 7, 7}));
  ASSERT_NE(out.find("maps.channel"), nullptr) << r.out;
}

// `visualize` draws one row per test image and one column per spatial map (CBAM: one per block).
TEST(Cli, VisualizeDrawsTheSpatialMapsOfACheckpoint) {
  TempDir ckpt, data, out;
  torch::manual_seed(0);
  auto model = dynattn::create_model("cbam_resnet20");
  dynattn::save_checkpoint(ckpt.path(), *model.ptr(), R"({"model": "cbam_resnet20", "epoch": 1})",
                           {});
  write_tiny_fashion_mnist(data.path(), 10, 20);
  auto r = run_dynattn({"--threads", "1", "visualize", "--checkpoint", ckpt.path(), "--data",
                        data.path(), "--out", out.path(), "--count", "4", "--scale", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto png = dynattn::read_png(out / "attention.png");
  // 4 rows and 1 + 9 columns of 56x56 cells with 2-pixel borders.
  EXPECT_EQ(png.sizes(), torch::IntArrayRef({4 * 58 + 2, 10 * 58 + 2, 3}));
  const auto j = nlohmann::json::parse(read_file(out / "attention.json"));
  EXPECT_EQ(j["columns"].size(), 10u);
  EXPECT_EQ(j["columns"][1], "layer1.0.attn.spatial");
  EXPECT_EQ(j["rows"].size(), 4u);
  EXPECT_EQ(j["rows"][1]["label"], "Trouser");

  // A model without spatial maps is refused with a reason, and nothing is written.
  TempDir plain, out2;
  write_untrained_checkpoint(plain.path());
  r = run_dynattn(
      {"visualize", "--checkpoint", plain.path(), "--data", data.path(), "--out", out2.path()});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("gives no spatial attention maps"));
  EXPECT_FALSE(fs::exists(out2 / "attention.png"));
}

// `deploy` writes a folded checkpoint that `eval` and `bench` accept, with the same predictions.
TEST(Cli, DeployWritesACheckpointThatEvalAndBenchAccept) {
  TinyRun run;
  TempDir out;
  const std::string deployed = out / "deployed";
  auto r = run_dynattn({"--threads", "1", "deploy", "--checkpoint", run.ckpt.path(), "--out",
                        deployed, "--json", out / "deploy.json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto report = nlohmann::json::parse(read_file(out / "deploy.json"));
  EXPECT_EQ(report["model"], "resnet20:deployed=true");
  EXPECT_EQ(report["merged"].size(), 21u);
  EXPECT_LT(report["max_abs_diff"].get<double>(), 1e-4);

  auto original = run_dynattn(run.eval_args({"--json", out / "a.json"}));
  auto folded = run_dynattn(
      {"eval", "--checkpoint", deployed, "--data", run.data.path(), "--json", out / "b.json"});
  ASSERT_EQ(original.exit_code, 0) << original.describe();
  ASSERT_EQ(folded.exit_code, 0) << folded.describe();
  const auto a = nlohmann::json::parse(read_file(out / "a.json"));
  const auto b = nlohmann::json::parse(read_file(out / "b.json"));
  EXPECT_EQ(a["confusion"], b["confusion"]);
  EXPECT_NEAR(a["loss"].get<double>(), b["loss"].get<double>(), 1e-4);
  r = run_dynattn(
      {"bench", "--checkpoint", deployed, "--batch", "1", "--min-time", "0.01", "--no-peak"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("resnet20:deployed=true"));
}

// `deploy --model --weights --key-map`: weights of the RepVGG authors' code (Python re-
// implementation, tests/interop/reference_repvgg.py) become a plain-conv checkpoint.
TEST(Cli, DeployImportsRepVGGWeightsThroughAKeyMap) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 has no torch (install python3-torch)";
  TempDir dir;
  const std::string cmd = "/usr/bin/python3 " DYNATTN_SOURCE_DIR
                          "/tests/interop/reference_repvgg.py --out " +
                          dir.path() + " >/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const std::string weights = dir / "timm_repvgg_a0g4.weights.safetensors";
  auto r =
      run_dynattn({"--threads", "1", "deploy", "--model", "repvgg_a0g4", "--weights", weights,
                   "--key-map", "timm", "--out", dir / "plain", "--json", dir / "deploy.json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto report = nlohmann::json::parse(read_file(dir / "deploy.json"));
  EXPECT_EQ(report["model"], "repvgg_a0g4:deployed=true");
  EXPECT_EQ(report["merged"].size(), 22u);
  // The deployed checkpoint gives the reference output.
  r = run_dynattn({"forward", "--model", "repvgg_a0g4:deployed=true", "--weights",
                   dir / "plain/model.safetensors", "--input",
                   dir / "timm_repvgg_a0g4.io.safetensors", "--output", dir / "y.safetensors"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const auto expected =
      *dynattn::read_safetensors(dir / "timm_repvgg_a0g4.io.safetensors").find("y");
  const auto y = *dynattn::read_safetensors(dir / "y.safetensors").find("y");
  EXPECT_LE((y - expected).abs().max().item<double>(),
            1e-5 * std::max(1.0, expected.abs().max().item<double>()));
  // Wrong combinations are named.
  r = run_dynattn({"deploy", "--model", "repvgg_a0", "--out", dir / "x"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("--model needs --weights"));
  r = run_dynattn({"deploy", "--out", dir / "x"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("either --checkpoint, or --model"));
}

TEST(Cli, BenchComparesAModelWithItsDeployedForm) {
  TempDir dir;
  auto r = run_dynattn({"--threads", "1", "bench", "--model", "resnet20:width=8", "--batch", "1,2",
                        "--min-time", "0.03", "--no-peak", "--compare-deployed", "--json",
                        dir / "b.json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("deployed speed-up"));
  const auto j = nlohmann::json::parse(read_file(dir / "b.json"));
  EXPECT_EQ(j["deployed"]["model"], "resnet20:deployed=true,width=8");
  ASSERT_EQ(j["deployed_speedup"].size(), 2u);
  EXPECT_GT(j["deployed_speedup"][1]["speedup"].get<double>(), 0.0);
  // Nothing to merge is an error, not a meaningless 1.0x.
  r = run_dynattn({"bench", "--model", "resnet20:deployed=true", "--batch", "1", "--min-time",
                   "0.01", "--no-peak", "--compare-deployed"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("nothing to merge"));
}

TEST(CliBench, KernelsOptionIsRecordedAndChecked) {
  TempDir dir;
  auto r = run_dynattn({"--kernels", "aten", "bench", "--model", "resnet20:width=8", "--batch", "1",
                        "--min-time", "0.01", "--no-peak", "--json", dir / "b.json"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(nlohmann::json::parse(read_file(dir / "b.json"))["kernels"], "aten");
  r = run_dynattn({"--kernels", "fast", "bench", "--batch", "1"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("--kernels"));
}

// `rebirth` on an untrained inception_net and tiny data: the whole pipeline (fold, merge,
// re-learn, fine-tune, measure) runs, reports every step, and writes a checkpoint that `eval`
// and `bench` accept.
TEST(Cli, RebirthMergesReportsAndWritesACheckpointThatEvalAndBenchAccept) {
  TempDir dir, data;
  write_tiny_fashion_mnist(data.path(), 16, 20);
  torch::manual_seed(0);
  auto model = dynattn::create_model("inception_net:width=0.25");
  fs::create_directories(dir / "trained");
  dynattn::save_checkpoint(dir / "trained", *model.ptr(),
                           R"({"model": "inception_net:width=0.25", "epoch": 1})", {});
  const std::string merged = dir / "merged";
  // Tiny settings: two re-learning steps, one fine-tuning epoch of two batches, one timed run.
  // clang-format off
  std::vector<std::string> args = {"--threads", "1", "rebirth", "--merge", "all",
      "--relearn-steps", "2", "--relearn-batch", "4", "--finetune-epochs", "1", "--batch", "8",
      "--bench-time", "0.01", "--bench-iters", "1"};
  // clang-format on
  for (const std::string& a :
       std::vector<std::string>{"--checkpoint", dir / "trained", "--out", merged, "--data",
                                data.path(), "--json", dir / "rebirth.json"})
    args.push_back(a);
  auto r = run_dynattn(args);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("re-learned"));
  const auto j = nlohmann::json::parse(read_file(dir / "rebirth.json"));
  EXPECT_EQ(j["model"], "inception_net:deployed=true,merge=all,width=0.25");
  for (const char* step : {"original", "folded", "merged", "relearned", "finetuned"})
    EXPECT_TRUE(j["accuracy"].contains(step)) << step;
  EXPECT_EQ(j["accuracy"]["folded"], j["accuracy"]["original"]) << "folding BN is exact";
  EXPECT_EQ(j["cost"]["original"]["layers"]["max_pool"], 6);
  EXPECT_EQ(j["cost"]["merged"]["layers"]["max_pool"], 0);
  EXPECT_EQ(j["cost"]["merged"]["layers"]["batch_norm"], 0);
  for (const char* form : {"original", "folded", "merged"}) {
    const auto& c = j["cost"][form];
    EXPECT_GT(c["peak_bytes_batch1"].get<int64_t>(), 0) << form;
    EXPECT_GT(c["peak_bytes_batch64"].get<int64_t>(), c["peak_bytes_batch1"].get<int64_t>())
        << form;
    EXPECT_GT(c["images_per_sec_batch64"].get<double>(), 0.0) << form;
  }
  int exact = 0, relearned = 0;
  for (const auto& s : j["steps"]) (s["exact"].get<bool>() ? exact : relearned)++;
  EXPECT_GT(exact, 0);
  EXPECT_GT(relearned, 0);
  ASSERT_EQ(j["relearn"]["stages"].size(), 5u);

  r = run_dynattn({"--threads", "1", "eval", "--checkpoint", merged, "--data", data.path()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_THAT(r.out, HasSubstr("inception_net:deployed=true,merge=all,width=0.25"));
  r = run_dynattn({"--threads", "1", "bench", "--checkpoint", merged, "--batch", "1", "--min-time",
                   "0.01", "--no-peak"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
}

TEST(CliErrors, RebirthNamesAnUnknownMergeAndACheckpointOfAnotherModel) {
  TinyRun tiny;  // a ResNet-20 checkpoint
  TempDir out;
  auto r = run_dynattn({"rebirth", "--checkpoint", tiny.ckpt.path(), "--out", out / "x", "--merge",
                        "pool", "--data", tiny.data.path()});
  expect_usage_error(r, "--merge");
  r = run_dynattn({"--quiet", "rebirth", "--checkpoint", tiny.ckpt.path(), "--out", out / "x",
                   "--merge", "all", "--data", tiny.data.path()});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("rebirth --checkpoint")) << r.describe();
  EXPECT_THAT(r.err, HasSubstr("is not an inception_net")) << r.describe();
  EXPECT_FALSE(fs::exists(out / "x")) << "nothing is written on failure";
}

// ---- BranchyNet: calibrate, eval and bench of early exits ----

namespace {
// An untrained branchy_resnet20 checkpoint and tiny data (40 train, 20 test images).
struct TinyBranchy {
  TempDir ckpt, data;
  TinyBranchy() {
    torch::manual_seed(0);
    auto model = dynattn::create_model("branchy_resnet20");
    dynattn::save_checkpoint(ckpt.path(), *model.ptr(),
                             nlohmann::json{{"model", model.spec}, {"epoch", 1}}.dump(), {});
    write_tiny_fashion_mnist(data.path(), 40, 20);
  }
};
}  // namespace

TEST(CliBranchy, CalibrateWritesThresholdsThatEvalAndBenchUse) {
  TinyBranchy tiny;
  TempDir out;
  const std::string calibrated = out / "calibrated", cal_json = out / "calibrate.json",
                    eval_json = out / "eval.json", bench_json = out / "bench.json";
  auto r = run_dynattn({"--quiet", "--threads", "1", "calibrate", "--checkpoint", tiny.ckpt.path(),
                        "--data", tiny.data.path(), "--val-split", "0.5", "--max-accuracy-drop",
                        "0.5", "--out", calibrated, "--json", cal_json});
  expect_success(r);
  EXPECT_THAT(r.out, HasSubstr("chosen thresholds")) << r.describe();
  const auto cal = nlohmann::json::parse(read_file(cal_json));
  EXPECT_EQ(cal["samples"].get<int64_t>(), 20) << cal.dump(2);
  EXPECT_TRUE(cal["met"].get<bool>()) << cal.dump(2);
  EXPECT_GE(cal["chosen"]["accuracy"].get<double>() + 0.005,
            cal["last_exit"]["accuracy"].get<double>())
      << cal.dump(2);
  const auto meta = nlohmann::json::parse(read_file(calibrated + "/checkpoint.json"));
  const auto spec = meta["model"].get<std::string>();
  EXPECT_THAT(spec, HasSubstr("thresholds=" + cal["chosen"]["thresholds_spec"].get<std::string>()));
  EXPECT_THAT(spec, HasSubstr("exec=compact"));

  r = run_dynattn({"--quiet", "--threads", "1", "eval", "--checkpoint", calibrated, "--data",
                   tiny.data.path(), "--json", eval_json, "--thresholds", "0/0;inf/inf"});
  expect_success(r);
  EXPECT_THAT(r.out, HasSubstr("early exits (compact mode)")) << r.describe();
  const auto ev = nlohmann::json::parse(read_file(eval_json));
  ASSERT_EQ(ev["branchy"]["runs"].size(), 2u) << ev.dump(2);
  EXPECT_EQ(ev["branchy"]["runs"][0]["exit_histogram"], nlohmann::json({0, 0, 20})) << ev.dump(2);
  EXPECT_EQ(ev["branchy"]["runs"][1]["exit_histogram"], nlohmann::json({20, 0, 0})) << ev.dump(2);
  const auto& exit_macs = ev["branchy"]["exit_macs"];
  EXPECT_DOUBLE_EQ(ev["branchy"]["runs"][1]["macs_mean"].get<double>(), exit_macs[0].get<double>());
  EXPECT_EQ(ev["branchy"]["runs"][0]["macs_max"].get<int64_t>(), exit_macs[2].get<int64_t>());

  r = run_dynattn({"--quiet",
                   "--threads",
                   "1",
                   "bench",
                   "--checkpoint",
                   calibrated,
                   "--data",
                   tiny.data.path(),
                   "--batch",
                   "1,4",
                   "--min-time",
                   "0.01",
                   "--images",
                   "8",
                   "--rounds",
                   "1",
                   "--thresholds",
                   "inf/inf",
                   "--json",
                   bench_json,
                   "--stream",
                   "--channels-last"});
  expect_success(r);
  const auto b = nlohmann::json::parse(read_file(bench_json));
  ASSERT_EQ(b["points"].size(), 1u) << b.dump(2);
  const auto& p = b["points"][0];
  EXPECT_EQ(p["exit_histogram"], nlohmann::json({8, 0, 0})) << b.dump(2);
  EXPECT_GT(p["mac_saving"].get<double>(), 1.5) << b.dump(2);
  ASSERT_EQ(p["batches"].size(), 2u) << b.dump(2);
  EXPECT_GT(p["batches"][1]["speedup"].get<double>(), 0.0) << b.dump(2);
  // BranchyStream: fed with batches of 4, not 1.
  EXPECT_FALSE(p["batches"][0].contains("stream_speedup")) << b.dump(2);
  EXPECT_GT(p["batches"][1]["stream_speedup"].get<double>(), 0.0) << b.dump(2);
  EXPECT_TRUE(b["channels_last"].get<bool>()) << b.dump(2);
}

TEST(CliBranchy, ErrorsNameTheOptionAndTheExpectation) {
  TinyBranchy tiny;
  auto r = run_dynattn(
      {"--quiet", "calibrate", "--checkpoint", tiny.ckpt.path(), "--data", tiny.data.path()});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("--max-accuracy-drop")) << r.describe();
  r = run_dynattn({"--quiet", "eval", "--checkpoint", tiny.ckpt.path(), "--data", tiny.data.path(),
                   "--thresholds", "0.5"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("needs 2 thresholds (one per side exit), got 1")) << r.describe();
  r = run_dynattn({"--quiet", "bench", "--model", "branchy_resnet20:exits=1/5"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("after stage 5, but the network has stages 1..3")) << r.describe();
}

TEST(CliBranchy, CalibrateAndThresholdsNeedAModelWithExits) {
  TempDir data, plain;
  write_tiny_fashion_mnist(data.path(), 40, 20);
  torch::manual_seed(0);
  auto model = dynattn::create_model("resnet20");
  dynattn::save_checkpoint(plain.path(), *model.ptr(), R"({"model": "resnet20", "epoch": 1})", {});
  auto r = run_dynattn({"--quiet", "calibrate", "--checkpoint", plain.path(), "--data", data.path(),
                        "--target-macs", "1e6"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("has no early exits")) << r.describe();
  r = run_dynattn({"--quiet", "eval", "--checkpoint", plain.path(), "--data", data.path(),
                   "--thresholds", "0.5"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("has no early exits")) << r.describe();
  r = run_dynattn({"--quiet", "bench", "--model", "resnet20", "--stream"});
  expect_runtime_error(r);
  EXPECT_THAT(r.err, HasSubstr("bench --stream: resnet20 has no early exits")) << r.describe();
}
