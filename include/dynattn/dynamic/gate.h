// The gate: decide -> execute -> combine, the one shape of every dynamic decision in dynattn
// (stochastic depth now; BranchyNet exits, BlockDrop skips and SACT halting later). A gate
// decides, per mini-batch or per sample, which rows run a piece of work `fn` and with what
// weight; execute_gated() carries the decision out in mask or compact mode (execution.h) and
// combines the work's output with a base tensor (a residual's shortcut, the outputs of rows that
// already left). Both modes give the same result; a per-batch decision that drops the work skips
// it in both (nothing to mask: its forward and backward never run).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>

#include "dynattn/dynamic/execution.h"

namespace dynattn {

using GatedWork = std::function<torch::Tensor(const torch::Tensor&)>;

// How the work's output meets the base.
enum class Combine {
  kAdd,      // residual gating: out = base + w * fn(x) on the rows that run, base elsewhere
  kReplace,  // exits and halting: out = w * fn(x) on the rows that run, base elsewhere
};

// One decision: which rows use the work, and the weight its output gets on them.
struct GateDecision {
  RowSelection rows;
  // [N] per-row weight on the device (may carry gradients, e.g. a halting weight); undefined: 1.
  torch::Tensor weight;
  double scale = 1.0;      // constant factor on the work's output (1/p, or p at test time)
  bool per_batch = false;  // one decision for the whole batch: all rows or none

  // Every row, weight `scale`, decided per batch (a gate with nothing to decide).
  static GateDecision always(int64_t batch, torch::Device device, double scale = 1.0);
};

// What one gated execution produced and ran.
struct GateResult {
  torch::Tensor output;  // the combined output
  torch::Tensor used;    // [N] bool on the CPU: the work's output reached these rows
  torch::Tensor ran;     // [N] bool on the CPU: the work was computed for these rows (mask mode:
                         // all of them, unless a per-batch decision dropped it)
  int64_t macs = 0;      // MACs the work executed (MAC counter), when counting was asked for
};

// Carries `decision` out in `mode`: runs fn on x (all rows, the selected rows, or none) and
// combines with base ([N, ...], the shape of fn's output). With count_macs, a MacCounter
// (profile/mac_counter.h) around fn fills GateResult::macs.
GateResult execute_gated(const GatedWork& fn, const torch::Tensor& x, const torch::Tensor& base,
                         const GateDecision& decision, Combine combine, ExecutionMode mode,
                         bool count_macs = false);

// A named gate: subclasses decide, run() does the rest.
class Gate {
 public:
  Gate(std::string name, Combine combine, ExecutionMode mode)
      : name_(std::move(name)), combine_(combine), mode_(mode) {}
  virtual ~Gate() = default;

  // The decision for batch x; `training` is the owning module's mode.
  virtual GateDecision decide(const torch::Tensor& x, bool training) = 0;

  // decide(x, training), then execute_gated().
  GateResult run(const GatedWork& fn, const torch::Tensor& x, const torch::Tensor& base,
                 bool training, bool count_macs = false) {
    return execute_gated(fn, x, base, decide(x, training), combine_, mode_, count_macs);
  }

  const std::string& name() const { return name_; }
  Combine combine() const { return combine_; }
  ExecutionMode mode() const { return mode_; }
  void set_mode(ExecutionMode mode) { mode_ = mode; }

 private:
  std::string name_;
  Combine combine_;
  ExecutionMode mode_;
};

}  // namespace dynattn
