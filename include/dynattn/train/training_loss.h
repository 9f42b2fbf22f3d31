// A model that trains with its own loss (BranchyNet's joint loss over its exits, ...) implements
// ProvidesTrainingLoss; the trainer's default step (train/trainer.h) finds it by dynamic_cast on
// the model's module and uses it instead of cross-entropy on forward().
#pragma once
#include <torch/torch.h>

#include <utility>

namespace dynattn {

class ProvidesTrainingLoss {
 public:
  virtual ~ProvidesTrainingLoss() = default;
  // The loss of one training batch (the module is in training mode) and the logits the trainer
  // counts accuracy with; label_smoothing as the trainer's option.
  virtual std::pair<torch::Tensor, torch::Tensor> training_loss(const torch::Tensor& images,
                                                                const torch::Tensor& labels,
                                                                double label_smoothing) = 0;
};

}  // namespace dynattn
