#include "dynattn/dynamic/dynamic_output.h"

#include <nlohmann/json.hpp>

namespace dynattn {

void ExecutionTrace::add(const std::string& gate, const GateResult& result) {
  TORCH_CHECK(result.used.defined() && result.used.size(0) == batch_, "ExecutionTrace: gate ", gate,
              " decided for ", result.used.defined() ? result.used.size(0) : 0,
              " rows, the forward has ", batch_);
  names_.push_back(gate);
  results_.push_back(result);
}

DynamicOutput ExecutionTrace::finish(torch::Tensor output, ExecutionMode mode,
                                     int64_t total_macs) const {
  DynamicOutput out;
  out.output = std::move(output);
  out.mode = mode;
  out.gates = names_;
  const auto units = static_cast<int64_t>(results_.size());
  out.executed = torch::zeros({batch_, units}, torch::kBool);
  for (int64_t g = 0; g < units; ++g) out.executed.select(1, g).copy_(results_[g].used);
  if (!count_macs_) return out;
  out.counted_macs = total_macs;
  int64_t gated = 0;
  for (const auto& r : results_) {
    gated += r.macs;
    out.gate_macs.push_back(r.macs);
  }
  // The shared work (stem, shortcuts, head) ran on every row; each unit on the rows in `ran`.
  out.macs = torch::full({batch_}, batch_ == 0 ? 0 : (total_macs - gated) / batch_, torch::kLong);
  for (const auto& r : results_) {
    const int64_t rows_ran = r.ran.sum().item<int64_t>();
    if (rows_ran > 0) out.macs += r.ran.to(torch::kLong) * (r.macs / rows_ran);
  }
  return out;
}

void ExecutionStats::record_gate(const std::string& gate, int64_t executed, int64_t rows) {
  TORCH_CHECK(executed >= 0 && executed <= rows, "ExecutionStats: gate ", gate, " executed ",
              executed, " of ", rows, " rows");
  auto& t = gates_[gate];
  t.rows += rows;
  t.executed += executed;
}

void ExecutionStats::add_histogram(const std::string& name, const torch::Tensor& values,
                                   int64_t bins) {
  const auto v = values.to(torch::kCPU).to(torch::kLong).view(-1);
  TORCH_CHECK(bins > 0, "ExecutionStats: histogram ", name, " needs bins > 0");
  if (v.numel() == 0) return;
  TORCH_CHECK(v.min().item<int64_t>() >= 0 && v.max().item<int64_t>() < bins,
              "ExecutionStats: ", "histogram ", name, " takes values in [0, ", bins, "), got [",
              v.min().item<int64_t>(), ", ", v.max().item<int64_t>(), "]");
  const auto counts = torch::bincount(v, {}, bins);
  auto& h = histograms_[name];
  if (static_cast<int64_t>(h.size()) < bins) h.resize(static_cast<size_t>(bins), 0);
  const auto* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < bins; ++i) h[static_cast<size_t>(i)] += c[i];
}

void ExecutionStats::record(const DynamicOutput& out) {
  const int64_t n = out.executed.defined() ? out.executed.size(0) : out.output.size(0);
  const auto units = static_cast<int64_t>(out.gates.size());
  TORCH_CHECK(!out.executed.defined() || out.executed.size(1) == units,
              "ExecutionStats: executed has ", out.executed.size(1), " columns for ", units,
              " gates");
  if (units > 0) {
    const auto per_gate = out.executed.sum(0);
    for (int64_t g = 0; g < units; ++g)
      record_gate(out.gates[static_cast<size_t>(g)], per_gate[g].item<int64_t>(), n);
    add_histogram("units_used", out.executed.sum(1), units + 1);
  }
  if (out.exit_index.defined() && out.exits > 0) add_histogram("exit", out.exit_index, out.exits);
  if (out.macs.defined()) {
    macs_sum_ += out.macs.sum().item<double>();
    macs_samples_ += n;
  }
  samples_ += n;
}

double ExecutionStats::fraction_executed() const {
  int64_t rows = 0, executed = 0;
  for (const auto& kv : gates_) {
    rows += kv.second.rows;
    executed += kv.second.executed;
  }
  return rows == 0 ? 0.0 : static_cast<double>(executed) / rows;
}

std::string ExecutionStats::to_json() const {
  nlohmann::json j;
  j["samples"] = samples_;
  j["fraction_executed"] = fraction_executed();
  j["mean_macs"] = mean_macs();
  j["gates"] = nlohmann::json::object();
  for (const auto& kv : gates_)
    j["gates"][kv.first] = {{"rows", kv.second.rows},
                            {"executed", kv.second.executed},
                            {"fraction", kv.second.fraction()}};
  j["histograms"] = nlohmann::json::object();
  for (const auto& kv : histograms_) j["histograms"][kv.first] = kv.second;
  return j.dump();
}

}  // namespace dynattn
