// The trainer: mini-batch SGD/AdamW with a warm-up + cosine schedule, label smoothing,
// train-time augmentation, per-epoch validation, JSONL metrics, an atomic checkpoint every
// epoch, exact resumption, and a hard stop on a non-finite loss that keeps the last good
// checkpoint. Later capabilities add their losses through TrainHooks.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "dynattn/data/dataset.h"
#include "dynattn/models/registry.h"
#include "dynattn/train/optimizer.h"

namespace dynattn {

struct TrainOptions {
  TORCH_ARG(int64_t, epochs) = 10;
  TORCH_ARG(int64_t, batch_size) = 128;
  TORCH_ARG(OptimizerOptions, optimizer) = {};
  TORCH_ARG(double, warmup_epochs) = 1.0;
  TORCH_ARG(double, label_smoothing) = 0.0;
  TORCH_ARG(int64_t, crop_padding) = 0;
  TORCH_ARG(bool, flip) = false;
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(bool, channels_last) = false;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  TORCH_ARG(std::vector<double>, mean) = {};  // normalisation; empty: none
  TORCH_ARG(std::vector<double>, stddev) = {};
  TORCH_ARG(std::string, out_dir) = "";  // empty: no checkpoints or metrics files
  TORCH_ARG(bool, resume) = false;       // continue from out_dir's checkpoint
  TORCH_ARG(int64_t, max_batches) = 0;   // per epoch, 0: all (smoke runs, tests)
  TORCH_ARG(int, progress) = -1;         // -1: bar on a terminal, log lines otherwise; 0: none
  TORCH_ARG(std::string, extra_meta_json) = "{}";  // merged into the checkpoint metadata
};

struct EpochRecord {
  int64_t epoch = 0;
  double lr = 0.0;
  double train_loss = 0.0, train_accuracy = 0.0;
  double val_loss = 0.0, val_accuracy = 0.0;  // 0 when there is no validation set
  double train_images_per_sec = 0.0;
  double seconds = 0.0;
};

struct TrainResult {
  std::vector<EpochRecord> history;  // including epochs restored from a checkpoint
  bool stopped = false;              // true when a non-finite loss ended the run
  std::string stop_reason;
};

// Returns the loss of one batch (the model is in training mode); also the logits for
// accuracy. The default is cross-entropy with the options' label smoothing.
struct StepOutput {
  torch::Tensor loss;
  torch::Tensor logits;
};
struct TrainHooks {
  std::function<StepOutput(Model&, const torch::Tensor& images, const torch::Tensor& labels)> step;
};

TrainResult train_model(Model& model, const InMemoryDataset& train, const InMemoryDataset* val,
                        const TrainOptions& options, const TrainHooks& hooks = {});

// One metrics line as JSON (the format of metrics.jsonl).
std::string epoch_record_json(const EpochRecord& r);

}  // namespace dynattn
