// Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth",
// ECCV 2016): in training, residual block l keeps its residual branch with probability p_l and is
// the identity otherwise; p_l decays linearly with depth, p_l = 1 - (l/L)(1 - p_L), p_L = 0.5.
// Two semantics, named by `granularity`:
//   batch   the paper and its official code: one Bernoulli draw per block per mini-batch; a
//           dropped block's forward and backward do not run at all;
//   sample  timm / torchvision "drop path": one draw per sample; runs in mask or compact mode.
// Test-time convention, its own switch (`test_time`): `scale` (the paper's: b * f in training,
// p * f at test) or `identity` (timm's inverted scaling: b / p * f in training, f at test);
// `auto` takes the paper's for batch and timm's for sample. The deploy pass turns a `scale` model
// into an `identity` one by multiplying each branch's last affine by p_l
// (CifarResNet::fold_survival_scaling()).
// Deviations: decisions are drawn on the CPU from the global generator (torch::manual_seed), also
// for CUDA models, so the number of kept rows is known without a device-to-host copy; in
// compact mode the BatchNorms of a branch normalise over the kept rows only (execution.h).
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/dynamic/gate.h"

namespace dynattn {

// The model options (spec keys in brackets, see models/registry.cpp).
struct StochasticDepthOptions {
  TORCH_ARG(std::string, schedule) = "none";      // [sd] none | linear | uniform | timm
  TORCH_ARG(double, survival) = 0.5;              // [sd_p] p_L, the last block's, in (0, 1]
  TORCH_ARG(std::string, granularity) = "batch";  // [sd_mode] batch | sample
  TORCH_ARG(std::string, execution) = "mask";     // [sd_exec] mask | compact (sample only)
  TORCH_ARG(std::string, test_time) = "auto";     // [sd_test] auto | scale | identity
};

enum class DropGranularity { kBatch, kSample };
enum class TestTimeScaling { kScale, kIdentity };

// Survival probability of each of `blocks` residual blocks, first to last:
//   none     1 everywhere;
//   linear   p_l = 1 - (l / L)(1 - p_L), l = 1..L (the paper; the first block can drop too);
//   uniform  p_L everywhere;
//   timm     1 - d_l with d = linspace(0, 1 - p_L, L) (timm's drop_path_rate: block 0 never drops).
// Fails naming the option (sd, sd_p) for an unknown schedule or p_L outside (0, 1].
std::vector<double> survival_schedule(const std::string& schedule, int64_t blocks, double p_last);

// The gate of one residual block (Combine::kAdd: out = shortcut + weight * residual).
class StochasticDepthGate : public Gate {
 public:
  StochasticDepthGate(std::string name, double survival, DropGranularity granularity,
                      TestTimeScaling test_time, ExecutionMode mode);

  // Training: batch -> every row or none (per_batch), sample -> a CPU Bernoulli(p) mask; the
  // kept rows' weight is 1 (scale) or 1/p (identity). Test: every row, weight p or 1.
  GateDecision decide(const torch::Tensor& x, bool training) override;

  double survival() const { return survival_; }
  DropGranularity granularity() const { return granularity_; }
  TestTimeScaling test_time() const { return test_time_; }
  void set_test_time(TestTimeScaling t) { test_time_ = t; }
  // Whether a forward in this mode differs from the plain block (drops, or scales at test).
  bool active(bool training) const;

 private:
  double survival_;
  DropGranularity granularity_;
  TestTimeScaling test_time_;
};

// Validates `o` (errors name the option: sd, sd_p, sd_mode, sd_exec, sd_test) and returns one
// gate per block, gate i named names[i], following survival_schedule().
std::vector<StochasticDepthGate> make_stochastic_depth_gates(const StochasticDepthOptions& o,
                                                             const std::vector<std::string>& names);

}  // namespace dynattn
