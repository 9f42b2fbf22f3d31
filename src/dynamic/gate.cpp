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

// The factor on each row of y (the rows y holds): row_weight * scale, or undefined when it is
// the constant `scale` (then applied as an alpha, without a tensor of factors).
torch::Tensor row_factor(const torch::Tensor& y, const torch::Tensor& row_weight, double scale) {
  if (!row_weight.defined()) return torch::Tensor();
  auto f = row_weight.to(y.scalar_type());
  if (scale != 1.0) f = f * scale;
  return per_row(f, y.dim());
}

// base + factor * y in one kernel (addcmul, or add with alpha), in y's layout.
torch::Tensor add_scaled(const torch::Tensor& base, const torch::Tensor& y,
                         const torch::Tensor& factor, double scale) {
  const auto b = in_layout_of(base, y);
  if (factor.defined()) return torch::addcmul(b, y, factor);
  return scale == 1.0 ? b + y : torch::add(b, y, scale);
}

// factor * y.
torch::Tensor scaled(const torch::Tensor& y, const torch::Tensor& factor, double scale) {
  if (factor.defined()) return y * factor;
  return scale == 1.0 ? y : y * scale;
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
  const auto& weight = decision.weight;
  const double scale = decision.scale;
  if (mode == ExecutionMode::kMask || rows.all_active()) {
    const auto y = run(x);
    r.ran = torch::ones({rows.batch()}, torch::kBool);
    if (rows.all_active()) {
      const auto factor = row_factor(y, weight, scale);
      r.output =
          combine == Combine::kAdd ? add_scaled(base, y, factor, scale) : scaled(y, factor, scale);
    } else if (combine == Combine::kAdd) {
      // The mask joins the factor: rows that drop add 0 * fn(x).
      auto m = rows.mask().to(y.scalar_type());
      if (weight.defined()) m = m * weight.to(y.scalar_type());
      r.output = add_scaled(base, y, row_factor(y, m, scale), scale);
    } else {
      r.output = torch::where(per_row(rows.mask(), y.dim()),
                              scaled(y, row_factor(y, weight, scale), scale), base);
    }
    return r;
  }
  // Compact: gather, run the dense work on the active rows, scatter back.
  const auto y = run(gather_rows(x, rows));
  r.ran = rows.host_mask();
  const auto factor = row_factor(
      y, weight.defined() ? weight.index_select(0, rows.indices()) : torch::Tensor(), scale);
  if (combine == Combine::kAdd) {
    // With a constant factor, index_add's alpha applies it.
    r.output = factor.defined() ? scatter_add_rows(base, y * factor, rows)
                                : scatter_add_rows(base, y, rows, scale);
  } else {
    r.output = scatter_rows(base, scaled(y, factor, scale), rows);
  }
  return r;
}

}  // namespace dynattn
