// Checkpoints: a run directory holding model.safetensors (weights and buffers under their
// PyTorch state_dict names, plus the metadata JSON under "__metadata__"), optimizer.safetensors
// (named optimizer state) and checkpoint.json (the same metadata, for people). Each file is
// written atomically; the metadata names the model spec and epoch, so a checkpoint alone
// rebuilds its model, and a resumed run checks that the three files belong together.
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/models/registry.h"
#include "dynattn/train/optimizer.h"

namespace dynattn {

// Parameters then buffers, with PyTorch's state_dict names ("layer1.0.bn1.running_mean").
NamedTensors state_dict(const torch::nn::Module& module);

// Copies `tensors` into the module's parameters and buffers. Every missing or unexpected key,
// and every shape mismatch, is reported in one error naming `origin`. Floating-point tensors
// are cast to the parameter's dtype (weights exported in F16/BF16 load into F32 models).
void load_state_dict(torch::nn::Module& module, const NamedTensors& tensors,
                     const std::string& origin);

struct CheckpointPaths {
  std::string dir, weights, optimizer, meta;
};
// `path` is a run directory, its checkpoint.json or its model.safetensors.
CheckpointPaths checkpoint_paths(const std::string& path);

struct CheckpointData {
  CheckpointPaths paths;
  std::string model_spec;
  int64_t epoch = 0;
  std::string meta_json;  // the whole metadata object
  NamedTensors weights;
  NamedTensors optimizer;  // empty unless requested
};

// `meta_json` must be a JSON object with at least "model" (spec) and "epoch".
void save_checkpoint(const std::string& dir, const torch::nn::Module& model,
                     const std::string& meta_json, const NamedTensors& optimizer_state);

CheckpointData read_checkpoint(const std::string& path, bool with_optimizer = false);

// Rebuilds the model from the checkpoint's spec and loads its weights (eval mode).
Model load_checkpoint_model(const std::string& path, CheckpointData* data = nullptr);

}  // namespace dynattn
