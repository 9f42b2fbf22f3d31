// Registered models whose BatchNorms matter: random running statistics and affine parameters
// (as after training), in eval mode. Folding, deploying, merging and compact-vs-mask tests use
// them so that an ignored BN statistic changes the output.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "dynattn/models/registry.h"

namespace dynattn::test_util {

// Every BatchNorm2d of m with running statistics and affine parameters that matter (wider than
// trained_looking's: the exact-merge tests of RepVGG and DeepRebirth); eval mode.
inline void randomise_batch_norms(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& sub : m.modules()) {
    if (auto* bn = sub->as<torch::nn::BatchNorm2d>()) {
      bn->running_mean.normal_(0.0, 0.3);
      bn->running_var.uniform_(0.3, 2.0);
      bn->weight.normal_(1.0, 0.5);
      bn->bias.normal_(0.0, 0.3);
    }
  }
  m.eval();
}

inline Model trained_looking(const std::string& spec, uint64_t seed = 5) {
  torch::manual_seed(seed);
  Model m = create_model(spec);
  torch::NoGradGuard no_grad;
  for (auto& b : m.ptr()->named_buffers()) {
    if (b.key().find("running_mean") != std::string::npos) b.value().normal_(0.0, 0.2);
    if (b.key().find("running_var") != std::string::npos) b.value().uniform_(0.5, 2.0);
  }
  for (auto& p : m.ptr()->named_parameters()) {
    if (p.key().find("bn") != std::string::npos && p.value().dim() == 1)
      p.value().normal_(0.5, 0.3);
  }
  m.ptr()->eval();
  return m;
}

}  // namespace dynattn::test_util
