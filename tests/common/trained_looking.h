// A registered model whose BatchNorms matter: random running statistics and affine parameters
// (as after training), in eval mode. Folding, deploying and compact-vs-mask tests use it so that
// an ignored BN statistic changes the output.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "dynattn/models/registry.h"

namespace dynattn::test_util {

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
