#include "dynattn/dynamic/gate.h"

#include <optional>
#include <vector>

#include "dynattn/profile/mac_counter.h"

namespace dynattn {

GateDecision GateDecision::always(int64_t batch, torch::Device device, double scale) {
  GateDecision d;
  d.rows = RowSelection::all(batch, device);
  d.scale = scale;
  d.per_batch = true;
  return d;
}

namespace {
// v [N] viewed as [N, 1, ..., 1], to broadcast over a tensor of `dim` dimensions.
torch::Tensor per_row(const torch::Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[0] = v.size(0);
  return v.view(shape);
}

// y times the per-row weights of the rows y holds (undefined: 1) and the decision's scale.
torch::Tensor weighted(const torch::Tensor& y, const torch::Tensor& row_weight, double scale) {
  torch::Tensor out = y;
  if (row_weight.defined()) out = out * per_row(row_weight.to(y.scalar_type()), y.dim());
  if (scale != 1.0) out = out * scale;
  return out;
}
}  // namespace

GateResult execute_gated(const GatedWork& fn, const torch::Tensor& x, const torch::Tensor& base,
                         const GateDecision& decision, Combine combine, ExecutionMode mode,
                         bool count_macs) {
  const RowSelection& rows = decision.rows;
  TORCH_CHECK(x.size(0) == rows.batch() && base.size(0) == rows.batch(),
              "execute_gated: the decision is for ", rows.batch(), " rows; x has ", x.size(0),
              ", base ", base.size(0));
  TORCH_CHECK(!decision.weight.defined() ||
                  (decision.weight.dim() == 1 && decision.weight.size(0) == rows.batch()),
              "execute_gated: expected a weight [", rows.batch(), "], got ",
              decision.weight.sizes());
  TORCH_CHECK(!decision.per_batch || rows.all_active() || rows.none_active(),
              "execute_gated: a per-batch decision selects every row or none, this one ",
              rows.active(), " of ", rows.batch());
  GateResult r;
  r.used = rows.host_mask();
  auto run = [&](const torch::Tensor& in) {
    if (!count_macs) return fn(in);
    MacCounter counter;
    auto y = fn(in);
    r.macs = counter.macs();
    return y;
  };

  // Nothing to compute: a dropped per-batch decision (both modes), or compact with no row left.
  if (rows.none_active() && (decision.per_batch || mode == ExecutionMode::kCompact)) {
    r.ran = torch::zeros({rows.batch()}, torch::kBool);
    r.output = base;
    return r;
  }
  if (mode == ExecutionMode::kMask || rows.all_active()) {
    const auto y = run(x);
    r.ran = torch::ones({rows.batch()}, torch::kBool);
    if (rows.all_active()) {
      const auto w = weighted(y, decision.weight, decision.scale);
      r.output = combine == Combine::kAdd ? base + w : w;
    } else if (combine == Combine::kAdd) {
      auto m = rows.mask().to(y.scalar_type());
      if (decision.weight.defined()) m = m * decision.weight.to(y.scalar_type());
      r.output = base + weighted(y, m, decision.scale);
    } else {
      r.output = torch::where(per_row(rows.mask(), y.dim()),
                              weighted(y, decision.weight, decision.scale), base);
    }
    return r;
  }
  // Compact: gather, run the dense work on the active rows, scatter back.
  const auto y = run(gather_rows(x, rows));
  r.ran = rows.host_mask();
  const auto w = weighted(
      y,
      decision.weight.defined() ? decision.weight.index_select(0, rows.indices()) : torch::Tensor(),
      decision.scale);
  r.output =
      combine == Combine::kAdd ? scatter_add_rows(base, w, rows) : scatter_rows(base, w, rows);
  return r;
}

}  // namespace dynattn
