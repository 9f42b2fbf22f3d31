// Classification evaluation: loss, accuracy, per-class accuracy and the confusion matrix,
// in inference mode, batch by batch.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/data/dataset.h"
#include "dynattn/models/registry.h"

namespace dynattn {

struct EvalOptions {
  TORCH_ARG(int64_t, batch_size) = 256;
  TORCH_ARG(bool, channels_last) = false;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  TORCH_ARG(std::vector<double>, mean) = {};  // empty: no normalisation
  TORCH_ARG(std::vector<double>, stddev) = {};
  TORCH_ARG(int64_t, num_classes) = 0;  // 0: the width of the model's logits
  TORCH_ARG(int64_t, max_batches) = 0;  // 0: the whole set
};

struct EvalResult {
  int64_t count = 0;
  double loss = 0.0;
  double accuracy = 0.0;          // fraction in [0, 1]
  torch::Tensor confusion;        // int64 [K, K]: rows true class, columns prediction
  std::vector<double> per_class;  // accuracy per true class
  double seconds = 0.0;
};

// Runs the model in eval mode (restoring its previous mode afterwards).
EvalResult evaluate(Model& model, const InMemoryDataset& data, const EvalOptions& options);

}  // namespace dynattn
