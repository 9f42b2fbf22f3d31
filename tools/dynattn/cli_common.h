// Shared pieces of the dynattn CLI: global options, runtime set-up, and small printing and
// JSON helpers used by more than one subcommand.
#pragma once
#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "dynattn/core/options_string.h"
#include "dynattn/core/runtime.h"
#include "dynattn/data/dataset.h"
#include "dynattn/models/registry.h"

namespace dynattn {
class BranchyResNetImpl;
}

namespace dynattn::cli {

struct GlobalOptions {
  int threads = 0;               // 0: OMP_NUM_THREADS, else every core
  std::string malloc = "tuned";  // allocator policy
  std::string device = "cpu";
  bool quiet = false;
  std::string kernels = "dynattn";    // "aten": ATen's own CPU kernel choices (ops/conv2d.h)
  std::string winograd = "measured";  // oneDNN conv stacks: never, measured, always
};

// Applies threads and the allocator policy, logs the runtime banner (and the reference-BLAS
// warning) to stderr. Returns the thread count in effect.
int setup_runtime(const GlobalOptions& g);

torch::Device parse_device(const std::string& text);

// Fashion-MNIST as train/test datasets, with `val_fraction` of train held out when > 0.
struct FashionMnistSplits {
  InMemoryDataset train, val, test;
};
FashionMnistSplits load_fashion_mnist_splits(const std::string& root, double val_fraction,
                                             uint64_t seed);

// Option checks whose messages say what is expected (CLI11's own print a range from 0 to
// DBL_MAX, which reads as if 0 were allowed).
inline const CLI::Validator kPositive(
    [](std::string& v) -> std::string {
      try {
        return std::stod(v) > 0 ? "" : "must be a positive number, got " + v;
      } catch (const std::exception&) {
        return "must be a positive number, got '" + v + "'";
      }
    },
    "POSITIVE");
inline const CLI::Validator kNonNegative(
    [](std::string& v) -> std::string {
      try {
        return std::stod(v) >= 0 ? "" : "must be zero or positive, got " + v;
      } catch (const std::exception&) {
        return "must be zero or positive, got '" + v + "'";
      }
    },
    "NON-NEGATIVE");

// `--attn SPEC` next to `--model`: the model spec with its attention slot set to SPEC
// ("resnet20" + "cbam:r=8" -> "resnet20:attn=[cbam:r=8]"). An empty SPEC leaves it alone.
inline std::string model_with_attention(const std::string& model, const std::string& attention) {
  if (attention.empty()) return model;
  NamedOptions spec = parse_named_options(model, "model");
  TORCH_CHECK(!spec.options.has("attn"), "--attn ", attention, ": the model spec '", model,
              "' already sets attn");
  spec.options.set("attn", attention);
  return spec.to_string();
}

// Writes `j` to `path` atomically (pretty-printed), creating nothing else.
void write_json(const std::string& path, const nlohmann::json& j);

// The input channels of the model's first convolution (1 when it has none).
int64_t model_in_channels(const Model& model);

// create_model_or_attention(spec), with `weights` (safetensors, keys renamed by `key_map`)
// loaded when given; `command` names the caller in errors.
Model model_from_weights(const std::string& spec, const std::string& weights,
                         const std::string& key_map, const std::string& command);

// Subcommands: each registers its options and its callback on `app`.
void add_train_command(CLI::App& app, GlobalOptions& g);
void add_eval_command(CLI::App& app, GlobalOptions& g);
void add_bench_command(CLI::App& app, GlobalOptions& g);
void add_zoo_command(CLI::App& app, GlobalOptions& g);
void add_demo_command(CLI::App& app, GlobalOptions& g);
void add_forward_command(CLI::App& app, GlobalOptions& g);
void add_visualize_command(CLI::App& app, GlobalOptions& g);
void add_deploy_command(CLI::App& app, GlobalOptions& g);
void add_rebirth_command(CLI::App& app, GlobalOptions& g);
void add_calibrate_command(CLI::App& app, GlobalOptions& g);

// BranchyNet (cmd_branchy.cpp). The model's BranchyResNet, or null for other models.
BranchyResNetImpl* as_branchy(const Model& model);
// Early-exit evaluation on `data` for the model's thresholds, or for each ';'-separated list in
// `thresholds`: accuracy, exit histogram, executed MACs per image (mean, std, min, max).
nlohmann::json branchy_eval(Model& model, const InMemoryDataset& data, torch::Device device,
                            int64_t batch, int64_t max_batches, const std::string& thresholds);
// The dynamic model against its last exit alone, in alternating rounds, on the first `images`
// test images (per threshold list): MACs, mean latency per batch size, speed-ups. With `stream`,
// also the throughput of BranchyStream fed with each batch size > 1, against the last exit on the
// same batches, in alternating passes over the images.
nlohmann::json branchy_bench(Model& model, const std::string& data_root, torch::Device device,
                             const std::vector<int64_t>& batches, double min_time, int64_t images,
                             const std::string& thresholds, int rounds, bool stream,
                             bool channels_last);

}  // namespace dynattn::cli
