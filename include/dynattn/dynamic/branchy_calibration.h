// BranchyNet threshold calibration and evaluation: every exit's logits are computed once on a
// held-out split (mask mode: all exits for all rows), then thresholds are swept on those scores
// and the ones meeting a target are picked: the cheapest (mean MACs per image) whose accuracy
// is at most `max_accuracy_drop` points below the last exit alone on the same split, or the
// most accurate whose mean MACs per image are at most `target_macs`. The paper sweeps
// thresholds by hand; the grid search (per side exit, candidates at quantiles of its entropy
// on the split) is ours.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dynattn/data/dataset.h"
#include "dynattn/dynamic/branchy.h"

namespace dynattn {

// What one pass over a split gives: entropies and correctness of every exit for every sample,
// and the MACs per image of leaving at each exit.
struct ExitScores {
  torch::Tensor entropy;           // [E, N] double, side exits only (E = side exits)
  torch::Tensor correct;           // [E + 1, N] bool, every exit
  std::vector<int64_t> exit_macs;  // [E + 1]
  int64_t samples() const { return correct.defined() ? correct.size(1) : 0; }
  int64_t exits() const { return static_cast<int64_t>(exit_macs.size()); }
};

struct ScoreOptions {
  TORCH_ARG(int64_t, batch_size) = 256;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  TORCH_ARG(std::vector<double>, mean) = {};  // normalisation; empty: none
  TORCH_ARG(std::vector<double>, stddev) = {};
  TORCH_ARG(int64_t, max_batches) = 0;  // 0: the whole split
};

// Runs every exit on `data` (eval mode, no gradients).
ExitScores score_exits(BranchyResNetImpl& model, const InMemoryDataset& data,
                       const ScoreOptions& options);

// The outcome of thresholds on scores.
struct ThresholdResult {
  std::vector<double> thresholds;
  double accuracy = 0.0;                // fraction
  double mean_macs = 0.0;               // per image
  std::vector<int64_t> exit_histogram;  // samples per exit
};
ThresholdResult apply_thresholds(const ExitScores& scores, const std::vector<double>& thresholds);

struct CalibrationOptions {
  // Exactly one target: accuracy drop in points (>= 0), or mean MACs per image (> 0).
  TORCH_ARG(double, max_accuracy_drop) = -1.0;
  TORCH_ARG(double, target_macs) = -1.0;
  // Candidates per side exit (besides 0 and +inf); the grid has at most max_grid combinations.
  TORCH_ARG(int64_t, candidates) = 64;
  TORCH_ARG(int64_t, max_grid) = 40000;
};

struct CalibrationResult {
  ThresholdResult chosen;
  bool met = false;           // false: no thresholds met the target; `chosen` is the closest
  ThresholdResult last_exit;  // everyone at the last exit (thresholds 0)
  std::vector<ThresholdResult> front;  // the accuracy / mean MACs Pareto front, cheapest first
  int64_t evaluated = 0;               // threshold combinations tried
};
CalibrationResult calibrate_thresholds(const ExitScores& scores, const CalibrationOptions& options);

// "0.1/0.2;0.3/0.4" -> two threshold lists (';' between lists, '/' or ',' within one).
std::vector<std::vector<double>> parse_threshold_lists(const std::string& text,
                                                       const std::string& what);
// "0.05/0.2", as the spec option `thresholds` takes it (round-trips through parse).
std::string format_thresholds(const std::vector<double>& thresholds);

// Running evaluation of the early-exit inference itself (forward_dynamic): accuracy, exits,
// per-sample MACs (mean, std, min, max).
struct BranchyEvalResult {
  int64_t count = 0;
  double accuracy = 0.0;
  std::vector<int64_t> exit_histogram;
  double macs_mean = 0.0, macs_std = 0.0;
  int64_t macs_min = 0, macs_max = 0;
  double seconds = 0.0;
};
BranchyEvalResult evaluate_branchy(BranchyResNetImpl& model, const InMemoryDataset& data,
                                   const ScoreOptions& options);

}  // namespace dynattn
