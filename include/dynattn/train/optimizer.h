// SGD (momentum, Nesterov, weight decay) and AdamW (Loshchilov & Hutter, ICLR 2019) with the
// exact update rules of torch.optim, written here so that their state is keyed by parameter
// *name*: checkpoints then hold "layer1.0.conv1.weight.momentum_buffer" and resume anywhere.
// (torch::optim keys its state by TensorImpl address, which does not survive a restart.)
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dynattn {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct OptimizerOptions {
  TORCH_ARG(std::string, name) = "sgd";  // "sgd" or "adamw"
  TORCH_ARG(double, lr) = 0.1;
  TORCH_ARG(double, momentum) = 0.9;  // sgd
  TORCH_ARG(bool, nesterov) = true;   // sgd
  TORCH_ARG(double, weight_decay) = 5e-4;
  TORCH_ARG(double, beta1) = 0.9;  // adamw
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, eps) = 1e-8;
  // Leave BN and bias parameters (1-D tensors) out of weight decay, as timm's recipes do.
  TORCH_ARG(bool, decay_norm_and_bias) = true;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void step() = 0;
  void zero_grad();
  void set_lr(double lr) { lr_ = lr; }
  double lr() const { return lr_; }
  // Named state (CPU copies are not made: tensors live where the parameters do).
  virtual NamedTensors state() const = 0;
  // Restores state saved by `state()`; fails naming the missing or mismatched entry.
  virtual void load_state(const NamedTensors& state, const std::string& origin) = 0;

 protected:
  Optimizer(NamedTensors params, const OptimizerOptions& options);
  double decay_for(size_t i) const;
  NamedTensors params_;
  OptimizerOptions options_;
  double lr_;
};

std::unique_ptr<Optimizer> make_optimizer(const torch::nn::Module& model,
                                          const OptimizerOptions& options);

}  // namespace dynattn
