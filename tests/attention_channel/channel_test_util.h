// Helpers shared by the channel-attention tests.
#pragma once
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <string>

namespace dynattn::test_util {

// Deterministic non-trivial values for every parameter and BN statistic of `m` (so neither a
// zero-initialised BN weight nor default statistics hide a mistake). Keeps dtype and device.
inline void randomize(torch::nn::Module& m, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto draw = [&](const torch::Tensor& like) {
    return torch::randn(like.sizes(), gen, torch::TensorOptions().dtype(torch::kDouble));
  };
  for (auto& p : m.named_parameters()) p.value().copy_(draw(p.value()) * 0.5);
  for (auto& b : m.named_buffers()) {
    const std::string& name = b.key();
    if (name.size() >= 12 && name.compare(name.size() - 12, 12, "running_mean") == 0) {
      b.value().copy_(draw(b.value()) * 0.2);
    } else if (name.size() >= 11 && name.compare(name.size() - 11, 11, "running_var") == 0) {
      b.value().copy_(draw(b.value()).abs() * 0.5 + 0.5);
    }
  }
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// |a - b| <= 1e-5 relative to the scale of b (at least 1): the float tolerance of the project.
inline bool close_to_reference(const torch::Tensor& a, const torch::Tensor& b, double rel = 1e-5) {
  if (a.sizes() != b.sizes()) return false;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  return max_abs_diff(a, b) <= rel * scale;
}

}  // namespace dynattn::test_util
