#include "dynattn/dynamic/stochastic_depth.h"

namespace dynattn {

std::vector<double> survival_schedule(const std::string& schedule, int64_t blocks, double p_last) {
  TORCH_CHECK(blocks >= 0, "stochastic depth: the number of blocks must be >= 0, got ", blocks);
  TORCH_CHECK(p_last > 0.0 && p_last <= 1.0,
              "stochastic depth: the last block's survival probability (option sd_p) must be in "
              "(0, 1], got ",
              p_last);
  TORCH_CHECK(
      schedule == "none" || schedule == "linear" || schedule == "uniform" || schedule == "timm",
      "stochastic depth: unknown schedule '", schedule,
      "' (option sd; known: none, linear, uniform, timm)");
  std::vector<double> p(static_cast<size_t>(blocks), 1.0);
  const double L = static_cast<double>(blocks);
  for (int64_t i = 0; i < blocks; ++i) {
    double& pi = p[static_cast<size_t>(i)];
    if (schedule == "linear") {
      pi = 1.0 - (static_cast<double>(i + 1) / L) * (1.0 - p_last);  // l = i + 1
    } else if (schedule == "uniform") {
      pi = p_last;
    } else if (schedule == "timm" && blocks > 1) {
      pi = 1.0 - (1.0 - p_last) * static_cast<double>(i) / (L - 1.0);
    }
  }
  return p;
}

StochasticDepthGate::StochasticDepthGate(std::string name, double survival,
                                         DropGranularity granularity, TestTimeScaling test_time,
                                         ExecutionMode mode)
    : Gate(std::move(name), Combine::kAdd, mode),
      survival_(survival),
      granularity_(granularity),
      test_time_(test_time) {
  TORCH_CHECK(survival > 0.0 && survival <= 1.0, "stochastic depth: block ", this->name(),
              ": survival probability must be in (0, 1], got ", survival);
}

bool StochasticDepthGate::active(bool training) const {
  if (survival_ >= 1.0) return false;
  return training || test_time_ == TestTimeScaling::kScale;
}

GateDecision StochasticDepthGate::decide(const torch::Tensor& x, bool training) {
  const int64_t n = x.size(0);
  const bool inverted = test_time_ == TestTimeScaling::kIdentity;
  if (!training) return GateDecision::always(n, x.device(), inverted ? 1.0 : survival_);
  if (survival_ >= 1.0) return GateDecision::always(n, x.device());
  GateDecision d;
  d.scale = inverted ? 1.0 / survival_ : 1.0;
  if (granularity_ == DropGranularity::kBatch) {
    // A CPU draw: reading it costs no device synchronisation.
    const bool keep = torch::rand({1}, torch::kDouble).item<double>() < survival_;
    d.rows = keep ? RowSelection::all(n, x.device()) : RowSelection::none(n, x.device());
    d.per_batch = true;
  } else {
    d.rows = RowSelection::from_mask(torch::rand({n}, torch::kDouble).lt(survival_), x.device());
  }
  return d;
}

std::vector<StochasticDepthGate> make_stochastic_depth_gates(
    const StochasticDepthOptions& o, const std::vector<std::string>& names) {
  const auto p = survival_schedule(o.schedule(), static_cast<int64_t>(names.size()), o.survival());
  TORCH_CHECK(o.granularity() == "batch" || o.granularity() == "sample",
              "stochastic depth: unknown mode '", o.granularity(),
              "' (option sd_mode; known: batch, sample)");
  const auto granularity =
      o.granularity() == "batch" ? DropGranularity::kBatch : DropGranularity::kSample;
  const auto& t = o.test_time();
  TORCH_CHECK(t == "auto" || t == "scale" || t == "identity",
              "stochastic depth: unknown test-time convention '", t,
              "' (option sd_test; known: auto, scale, identity)");
  const bool scale = t == "scale" || (t == "auto" && granularity == DropGranularity::kBatch);
  const auto test_time = scale ? TestTimeScaling::kScale : TestTimeScaling::kIdentity;
  const auto mode = parse_execution_mode(o.execution(), "stochastic depth option sd_exec");
  std::vector<StochasticDepthGate> gates;
  gates.reserve(names.size());
  for (size_t i = 0; i < names.size(); ++i)
    gates.emplace_back(names[i], p[i], granularity, test_time, mode);
  return gates;
}

}  // namespace dynattn
