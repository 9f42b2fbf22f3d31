// What a dynamic forward returns: the outputs and what it executed for each sample (gated units
// used, exit index, MACs observed by the MAC counter), and running statistics over many of them
// (fraction executed per gate, histograms of units used and of exits).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dynattn/dynamic/execution.h"
#include "dynattn/dynamic/gate.h"

namespace dynattn {

struct DynamicOutput {
  torch::Tensor output;  // the model's output, e.g. logits [N, K]
  ExecutionMode mode = ExecutionMode::kMask;
  std::vector<std::string> gates;  // the gated units in execution order ("layer1.0", ...)
  torch::Tensor executed;          // [N, gates] bool, CPU: unit g's output reached sample n
  torch::Tensor exit_index;        // [N] int64, CPU, for models with exits; undefined otherwise
  int64_t exits = 0;               // number of exits (0: none)
  // [N] int64, CPU: MACs computed for each sample, from the MAC counter: the shared work (run on
  // every row) split evenly, plus each gated unit's MACs over the rows it ran on. In mask mode
  // every row pays for every unit it computed, used or not; in compact mode only for those it
  // used. Undefined when the forward did not count.
  torch::Tensor macs;
  int64_t counted_macs = 0;        // everything the counter saw (macs.sum(), up to rounding)
  std::vector<int64_t> gate_macs;  // per gate: MACs its work executed over the batch
};

// Collects the GateResults of one forward, then assembles its DynamicOutput.
class ExecutionTrace {
 public:
  ExecutionTrace(int64_t batch, bool count_macs) : batch_(batch), count_macs_(count_macs) {}
  bool counting() const { return count_macs_; }
  void add(const std::string& gate, const GateResult& result);
  // total_macs: what a counter around the whole forward saw (ignored when not counting).
  DynamicOutput finish(torch::Tensor output, ExecutionMode mode, int64_t total_macs) const;

 private:
  int64_t batch_;
  bool count_macs_;
  std::vector<std::string> names_;
  std::vector<GateResult> results_;
};

// Running totals over dynamic forwards.
class ExecutionStats {
 public:
  struct GateTotals {
    int64_t rows = 0;      // samples that met the gate
    int64_t executed = 0;  // samples whose output used the unit
    double fraction() const { return rows == 0 ? 0.0 : static_cast<double>(executed) / rows; }
  };

  // Adds every gate's column of out.executed, the histogram "units_used" (units per sample,
  // bins 0..gates), "exit" when out has exits, and the per-sample MACs when counted.
  void record(const DynamicOutput& out);
  // One gate's decision by hand (e.g. outside a DynamicOutput).
  void record_gate(const std::string& gate, int64_t executed, int64_t rows);
  // values: integers in [0, bins) (any device); counts them into histogram `name`.
  void add_histogram(const std::string& name, const torch::Tensor& values, int64_t bins);

  const std::map<std::string, GateTotals>& gates() const { return gates_; }
  const std::map<std::string, std::vector<int64_t>>& histograms() const { return histograms_; }
  // Executed over decided, pooled over every gate.
  double fraction_executed() const;
  // Mean per-sample MACs over the forwards that counted them.
  double mean_macs() const { return macs_samples_ == 0 ? 0.0 : macs_sum_ / macs_samples_; }
  int64_t samples() const { return samples_; }
  void reset() { *this = ExecutionStats(); }
  // {"fraction_executed": .., "gates": {name: {rows, executed, fraction}}, "histograms": {..},
  //  "samples": .., "mean_macs": ..}
  std::string to_json() const;

 private:
  std::map<std::string, GateTotals> gates_;
  std::map<std::string, std::vector<int64_t>> histograms_;
  int64_t samples_ = 0, macs_samples_ = 0;
  double macs_sum_ = 0.0;
};

}  // namespace dynattn
