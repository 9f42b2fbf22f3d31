// Measures a model the way `dynattn bench` reports it: parameters, MACs per image counted from
// the executed operators, and latency / throughput per batch size after warm-up, in
// inference mode on random inputs.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "dynattn/models/registry.h"
#include "dynattn/profile/benchmark.h"

namespace dynattn {

struct ModelBenchOptions {
  TORCH_ARG(std::vector<int64_t>, batches) = std::vector<int64_t>{1, 64};
  TORCH_ARG(bool, channels_last) = false;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  TORCH_ARG(std::vector<int64_t>, input_shape) = std::vector<int64_t>{1, 28, 28};  // C, H, W
  TORCH_ARG(int, warmup) = 10;
  TORCH_ARG(int, min_iters) = 20;
  TORCH_ARG(double, min_seconds) = 1.0;
  // Real inputs [N, C, H, W] instead of random ones (data-dependent models, e.g. early exits):
  // each timed call of batch b takes the next b images, cycling through the whole batches.
  TORCH_ARG(torch::Tensor, inputs) = {};
};

struct BatchTiming {
  int64_t batch = 0;
  TimingStats stats;
  double images_per_sec = 0.0;
  double gflops = 0.0;  // achieved, counting 2 FLOPs per MAC
};

struct ModelBenchResult {
  int64_t parameters = 0;
  int64_t macs_per_image = 0;
  std::vector<BatchTiming> timings;
};

// One training step (forward, cross-entropy, backward, SGD update) at `batch`, timed like
// inference; the model is left in training mode with changed weights (use a fresh copy).
BatchTiming benchmark_train_step(Model& model, int64_t batch, const ModelBenchOptions& options);

// Puts the model in eval mode (and channels-last if asked) on the options' device.
ModelBenchResult benchmark_model(Model& model, const ModelBenchOptions& options);

// Several models measured in `rounds` alternating rounds (model 1, model 2, ..., model 1, ...),
// each round with min_seconds / rounds per batch size; per model and batch size, the round with
// the median median. Drift on a shared machine then affects every model alike.
std::vector<ModelBenchResult> benchmark_models_alternating(const std::vector<Model*>& models,
                                                           const ModelBenchOptions& options,
                                                           int rounds = 3);

}  // namespace dynattn
