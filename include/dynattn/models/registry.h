// The model zoo: models by name, configured by an option string ("resnet20:attn=se,width=32").
// Checkpoints store the canonical spec, so any registered model can be rebuilt from one.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "dynattn/core/options_string.h"

namespace dynattn {

// A built model: its canonical spec and the module (forward: [N,C,H,W] -> logits [N,K]).
struct Model {
  std::string spec;
  torch::nn::AnyModule module;

  torch::Tensor forward(const torch::Tensor& x) { return module.forward(x); }
  std::shared_ptr<torch::nn::Module> ptr() const { return module.ptr(); }
};

struct ModelInfo {
  std::string name;
  std::string description;
  std::vector<std::string> option_keys;  // every key the builder accepts
  std::function<torch::nn::AnyModule(const OptionMap&)> build;
};

// Adds (or replaces) a model. Built-in models are registered on first use.
void register_model(ModelInfo info);

// Builds "name[:k=v,...]"; unknown names or options fail with an error listing the known ones.
Model create_model(const std::string& spec);

std::vector<ModelInfo> list_models();

// A registered model ("resnet20:attn=se"), or a module of the attention slot given its channel
// count among the options ("se:channels=64,r=8"): what `dynattn forward` runs.
Model create_model_or_attention(const std::string& spec);

}  // namespace dynattn
