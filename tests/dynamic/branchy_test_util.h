// Helpers shared by the BranchyNet tests (test_branchy.cpp, test_branchy_stream.cpp).
#pragma once
#include <torch/torch.h>

#include <limits>
#include <vector>

#include "dynattn/dynamic/branchy.h"
#include "dynattn/models/registry.h"

namespace dynattn::branchy_test {
inline const double kInf = std::numeric_limits<double>::infinity();

inline BranchyResNet branchy_of(const Model& m) {
  return BranchyResNet(std::dynamic_pointer_cast<BranchyResNetImpl>(m.ptr()));
}

inline torch::Tensor small_input(int64_t n = 12) {
  torch::manual_seed(3);
  return torch::randn({n, 1, 12, 12});
}

// Thresholds between the quantiles of each side exit's entropies, so that some rows leave.
inline std::vector<double> mid_thresholds(BranchyResNetImpl& net, const torch::Tensor& x,
                                          double q) {
  torch::NoGradGuard no_grad;
  const auto logits = net.forward_exits(x);
  std::vector<double> t;
  for (int64_t e = 0; e < net.side_exits(); ++e)
    t.push_back(softmax_entropy(logits[static_cast<size_t>(e)]).quantile(q).item<double>());
  return t;
}

inline DynamicOutput run(BranchyResNetImpl& net, const torch::Tensor& x, ExecutionMode mode) {
  torch::NoGradGuard no_grad;
  net.set_execution_mode(mode);
  return net.forward_dynamic(x, true);
}

}  // namespace dynattn::branchy_test
