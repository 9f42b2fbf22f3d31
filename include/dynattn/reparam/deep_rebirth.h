// DeepRebirth (Li, Wang and Kong, "DeepRebirth: Accelerating Deep Neural Network Execution on
// Mobile Devices", AAAI 2018): merge the "non-tensor" layers (BN, pooling, concatenation of
// parallel branches) of an Inception-style network into tensor layers, then re-learn what is not
// exact, layer-wise from the original network's outputs, and fine-tune the whole network.
// Here, for InceptionNet (models/inception_net.h):
//  1. conv + BN: folded exactly by deploy() (reparam/deploy.h) on a copy of the original.
//  2. streamline merging: conv1 + maxpool1 -> conv1 with stride 2; inception3b + maxpool3 ->
//     inception3b whose branches end in stride-2 convs. The merged kernel covers the receptive
//     field of conv + pool (3x3 -> 5x5, 1x1 -> 3x3). Not exact (a 3x3/2 max over a conv output
//     is no conv): the strided convs start from the original kernels (at the centre of the
//     larger one, zero around) and are re-learned.
//  3. branch merging: in each module the ConvBn units that read the module input become one wide
//     conv, sliced on output channels. Exact for branch1, branch2.0, branch3.0 (same input, conv
//     + bias + ReLU per output channel: concatenating the weights changes nothing). branch4
//     (3x3 max-pool, then 1x1) loses its pooling and joins the wide 1x1: not exact, re-learned.
//     In the stride-2 module (streamline + branch) branch1 and branch4 become one 3x3/2 conv.
// Exactness is per output channel: the report (MergeStep) says which merges are exact.
// Re-learning is stage-wise (a stage of InceptionNet holds every merge that touches it): the
// merged stage gets the original network's input to that stage and is trained to reproduce the
// original stage's output (MSE), the rest of the merged net untouched. Fine-tuning afterwards is
// plain training with cross-entropy (train/trainer.h), done by the caller (`dynattn rebirth`).
// Deviations from the paper: BN-Inception-style units instead of GoogLeNet v1's LRN layers; the
// exact parts are copied rather than re-learned; the pooling branch joins the wide 1x1 conv
// (the paper re-learns its merged branches at the width of the original ones).
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/data/dataset.h"
#include "dynattn/models/inception_net.h"
#include "dynattn/models/registry.h"

namespace dynattn {

// One merge in one stage: which original layers became which merged layer.
struct MergeStep {
  std::string stage;   // "conv1", "inception3b", ...
  std::string layers;  // "branch1 + branch2.0 + branch3.0 -> reduce (1x1, weights concatenated)"
  bool exact = false;  // true: the merged layer's output equals the original's by construction
};

// The module of `model` as an InceptionNet; fails naming `context` and the model otherwise.
InceptionNetImpl& as_inception_net(const Model& model, const std::string& context);

// Copies the weights of `source` (merge none) into `target` (any merge state, same width,
// classes and input channels, both deployed or both not): exact counterparts are copied
// (concatenated along output channels for merged branches), the other merged layers start from
// the original kernels. Returns every merge, exact or not, in stage order.
std::vector<MergeStep> transfer_rebirth_weights(const InceptionNetImpl& source,
                                                InceptionNetImpl& target);

struct RebirthModels {
  Model folded;  // the original with every conv + BN folded (deploy()): same outputs, merge none
  Model merged;  // inception_net:deployed=true,merge=<merge>,..., weights transferred, eval mode
  std::vector<MergeStep> steps;
  std::vector<int64_t> relearn_stages;  // stages with a step that is not exact, in order
  double fold_max_abs_diff = 0;         // deploy()'s check on random inputs
};

// The merged form of a trained inception_net (`original`: eval mode, merge none, BN folded or
// not; left unchanged). `merge` is "streamline", "branch" or "all".
RebirthModels rebirth_merge(const Model& original, const std::string& merge);

struct RelearnOptions {
  TORCH_ARG(int64_t, steps) = 300;
  TORCH_ARG(int64_t, batch_size) = 64;
  TORCH_ARG(double, lr) = 1e-3;  // Adam
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(std::vector<double>, mean) = {};  // input normalisation, as in training
  TORCH_ARG(std::vector<double>, stddev) = {};
};

struct StageRelearnReport {
  std::string stage;
  // Mean squared error against the original stage output on a fixed probe batch, and the mean
  // square of that output (to read the error against).
  double mse_before = 0, mse_after = 0, target_mean_square = 0;
};

// Re-learns `stages` of `merged` from `teacher` (the folded original) on images of `data`:
// Adam on the stages' parameters only, loss = sum over stages of the MSE between
// merged.stage(k, teacher's input to stage k) and teacher.stage(k, same input). Both models are
// used in eval mode (BN, if any, keeps its running statistics) and left in their previous mode.
std::vector<StageRelearnReport> relearn_merged_stages(const Model& teacher, Model& merged,
                                                      const std::vector<int64_t>& stages,
                                                      const InMemoryDataset& data,
                                                      const RelearnOptions& options);

}  // namespace dynattn
