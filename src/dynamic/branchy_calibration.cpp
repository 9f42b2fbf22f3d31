#include "dynattn/dynamic/branchy_calibration.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "dynattn/core/compat.h"
#include "dynattn/core/strings.h"

namespace dynattn {
namespace {
DataLoader make_loader(const InMemoryDataset& data, const ScoreOptions& o) {
  return DataLoader(data, DataLoaderOptions()
                              .batch_size(o.batch_size())
                              .shuffle(false)
                              .mean(o.mean())
                              .stddev(o.stddev())
                              .device(o.device()));
}

int64_t batches_of(const DataLoader& loader, const ScoreOptions& o) {
  const int64_t n = loader.num_batches();
  return o.max_batches() > 0 ? std::min(n, o.max_batches()) : n;
}

// Restores the module's training mode when it goes out of scope.
struct EvalModeGuard {
  explicit EvalModeGuard(torch::nn::Module& m) : module(m), was_training(m.is_training()) {
    m.eval();
  }
  ~EvalModeGuard() { module.train(was_training); }
  torch::nn::Module& module;
  bool was_training;
};
}  // namespace

ExitScores score_exits(BranchyResNetImpl& model, const InMemoryDataset& data,
                       const ScoreOptions& o) {
  TORCH_CHECK(data.size() > 0, "BranchyNet calibration: the split is empty");
  EvalModeGuard mode(model);
  ExitScores s;
  s.exit_macs = model.exit_macs({data.channels(), data.height(), data.width()});
  InferenceGuard guard;
  DataLoader loader = make_loader(data, o);
  std::vector<torch::Tensor> entropy, correct;
  const int64_t side = model.side_exits();
  for (int64_t b = 0; b < batches_of(loader, o); ++b) {
    Batch batch = loader.batch(b);
    const auto logits = torch::stack(model.forward_exits(batch.images));  // [E+1, B, K]
    correct.push_back(logits.argmax(2).eq(batch.labels.view({1, -1})).to(torch::kCPU));
    entropy.push_back(softmax_entropy(logits.slice(0, 0, side)).to(torch::kCPU));
  }
  s.entropy = torch::cat(entropy, 1);
  s.correct = torch::cat(correct, 1);
  return s;
}

namespace {
// Exit of every sample: the first side exit with entropy < T, else the last.
torch::Tensor exits_for(const ExitScores& s, const torch::Tensor& t) {
  const int64_t side = s.exits() - 1, n = s.samples();
  if (side == 0) return torch::zeros({n}, torch::kLong);
  const auto rank = torch::arange(side, torch::kLong).view({side, 1}).expand({side, n});
  return torch::where(s.entropy.lt(t.view({side, 1})), rank, torch::full_like(rank, side)).amin(0);
}
}  // namespace

ThresholdResult apply_thresholds(const ExitScores& s, const std::vector<double>& thresholds) {
  const int64_t side = s.exits() - 1;
  TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == side, "BranchyNet: ", thresholds.size(),
              " thresholds given, the model has ", side, " side exits");
  ThresholdResult r;
  r.thresholds = thresholds;
  // As the model compares them: in the entropies' dtype.
  const auto exit = exits_for(s, torch::tensor(thresholds, s.entropy.scalar_type()));
  r.accuracy = s.correct.gather(0, exit.view({1, -1})).to(torch::kDouble).mean().item<double>();
  r.mean_macs =
      torch::tensor(s.exit_macs, torch::kDouble).index_select(0, exit).mean().item<double>();
  const auto hist = torch::bincount(exit, {}, s.exits());
  r.exit_histogram.assign(hist.data_ptr<int64_t>(), hist.data_ptr<int64_t>() + s.exits());
  return r;
}

CalibrationResult calibrate_thresholds(const ExitScores& s, const CalibrationOptions& o) {
  const bool by_drop = o.max_accuracy_drop() >= 0, by_macs = o.target_macs() > 0;
  TORCH_CHECK(by_drop != by_macs,
              "BranchyNet calibration: give exactly one target, --max-accuracy-drop (points, "
              ">= 0) or --target-macs (mean MACs per image, > 0)");
  TORCH_CHECK(s.samples() > 0, "BranchyNet calibration: no scores");
  const int64_t side = s.exits() - 1;
  CalibrationResult c;
  c.last_exit = apply_thresholds(s, std::vector<double>(static_cast<size_t>(side), 0.0));
  // Candidates per side exit: 0, +inf, and midway between the entropy at each of evenly
  // spaced ranks and the next larger one (robust to rounding differences between batch sizes).
  const int64_t per_exit =
      side == 0 ? 1
                : std::max<int64_t>(
                      2, std::min<int64_t>(o.candidates(),
                                           static_cast<int64_t>(std::floor(std::pow(
                                               static_cast<double>(o.max_grid()), 1.0 / side))) -
                                               2));
  const int64_t n = s.samples();
  std::vector<std::vector<double>> candidates(static_cast<size_t>(side));
  for (int64_t e = 0; e < side; ++e) {
    auto& c_e = candidates[static_cast<size_t>(e)];
    c_e = {0.0, std::numeric_limits<double>::infinity()};
    const auto sorted = std::get<0>(s.entropy[e].to(torch::kDouble).contiguous().sort());
    const double* v = sorted.data_ptr<double>();
    for (int64_t k = 0; k < per_exit; ++k) {
      int64_t j = per_exit == 1 ? 0 : (k * (n - 1) + (per_exit - 1) / 2) / (per_exit - 1);
      while (j + 1 < n && v[j + 1] == v[j]) ++j;
      if (j + 1 < n) c_e.push_back(0.5 * (v[j] + v[j + 1]));
    }
    std::sort(c_e.begin(), c_e.end());
    c_e.erase(std::unique(c_e.begin(), c_e.end()), c_e.end());
  }
  std::vector<ThresholdResult> all;
  std::vector<size_t> digit(static_cast<size_t>(side), 0);
  while (true) {
    std::vector<double> t;
    for (int64_t e = 0; e < side; ++e)
      t.push_back(candidates[static_cast<size_t>(e)][digit[static_cast<size_t>(e)]]);
    all.push_back(apply_thresholds(s, t));
    size_t e = 0;
    while (e < digit.size() && ++digit[e] == candidates[e].size()) digit[e++] = 0;
    if (e == digit.size()) break;
  }
  c.evaluated = static_cast<int64_t>(all.size());
  std::sort(all.begin(), all.end(), [](const ThresholdResult& a, const ThresholdResult& b) {
    return a.mean_macs != b.mean_macs ? a.mean_macs < b.mean_macs : a.accuracy > b.accuracy;
  });
  for (const auto& r : all)
    if (c.front.empty() || r.accuracy > c.front.back().accuracy) c.front.push_back(r);
  // On the front: the cheapest meeting the accuracy floor, or the most accurate within budget.
  const double floor = c.last_exit.accuracy - o.max_accuracy_drop() / 100.0 - 1e-12;
  const ThresholdResult* pick = nullptr;
  for (const auto& r : c.front) {
    if (by_drop && r.accuracy >= floor) {
      pick = &r;
      break;
    }
    if (by_macs && r.mean_macs <= o.target_macs()) pick = &r;
  }
  c.met = pick != nullptr;
  c.chosen = pick != nullptr ? *pick : (by_drop ? c.front.back() : c.front.front());
  return c;
}

std::vector<std::vector<double>> parse_threshold_lists(const std::string& text,
                                                       const std::string& what) {
  std::vector<std::vector<double>> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(';', start), text.size());
    out.push_back(parse_double_list(trim(text.substr(start, end - start)), what));
    start = end + 1;
  }
  return out;
}

std::string format_thresholds(const std::vector<double>& thresholds) {
  std::string out;
  for (double t : thresholds) {
    std::string item = "inf";
    if (std::isfinite(t)) {
      char buf[64];
      for (int digits = 6; digits <= 17; ++digits) {
        std::snprintf(buf, sizeof(buf), "%.*g", digits, t);
        if (std::stod(buf) == t) break;
      }
      item = buf;
    }
    out += (out.empty() ? "" : "/") + item;
  }
  return out;
}

BranchyEvalResult evaluate_branchy(BranchyResNetImpl& model, const InMemoryDataset& data,
                                   const ScoreOptions& o) {
  TORCH_CHECK(data.size() > 0, "BranchyNet evaluation: the split is empty");
  EvalModeGuard mode(model);
  InferenceGuard guard;
  DataLoader loader = make_loader(data, o);
  ExecutionStats stats;
  std::vector<torch::Tensor> macs;
  int64_t correct = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t b = 0; b < batches_of(loader, o); ++b) {
    Batch batch = loader.batch(b);
    const auto out = model.forward_dynamic(batch.images, true);
    correct += out.output.argmax(1).eq(batch.labels).sum().item<int64_t>();
    stats.record(out);
    macs.push_back(out.macs);
  }
  BranchyEvalResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto all = torch::cat(macs).to(torch::kDouble);
  r.count = all.size(0);
  r.accuracy = static_cast<double>(correct) / r.count;
  r.exit_histogram = stats.histograms().at("exit");
  r.exit_histogram.resize(static_cast<size_t>(model.side_exits() + 1), 0);
  r.macs_mean = stats.mean_macs();
  r.macs_std = r.count > 1 ? all.std().item<double>() : 0.0;
  r.macs_min = all.min().item<int64_t>();
  r.macs_max = all.max().item<int64_t>();
  return r;
}

}  // namespace dynattn
