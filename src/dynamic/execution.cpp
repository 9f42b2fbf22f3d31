#include "dynattn/dynamic/execution.h"

namespace dynattn {

ExecutionMode parse_execution_mode(const std::string& text, const std::string& context) {
  if (text == "mask") return ExecutionMode::kMask;
  TORCH_CHECK(text == "compact", context, ": unknown execution mode '", text,
              "' (known: mask, compact)");
  return ExecutionMode::kCompact;
}

const char* execution_mode_name(ExecutionMode mode) {
  return mode == ExecutionMode::kMask ? "mask" : "compact";
}

// Every row or none: nothing to gather or blend, so nothing is put on the device.
RowSelection RowSelection::all(int64_t batch, torch::Device /*device*/) {
  RowSelection s;
  s.batch_ = s.active_ = batch;
  s.host_mask_ = torch::ones({batch}, torch::kBool);
  return s;
}

RowSelection RowSelection::none(int64_t batch, torch::Device /*device*/) {
  RowSelection s;
  s.batch_ = batch;
  s.host_mask_ = torch::zeros({batch}, torch::kBool);
  return s;
}

RowSelection RowSelection::from_mask(const torch::Tensor& mask, torch::Device device) {
  TORCH_CHECK(mask.dim() == 1, "RowSelection: expected a mask [N], got ", mask.sizes());
  RowSelection s;
  // The one device-to-host copy, when the mask is on a device; none for a CPU mask.
  s.host_mask_ = mask.to(torch::kCPU).to(torch::kBool).contiguous();
  s.batch_ = s.host_mask_.size(0);
  const auto idx = s.host_mask_.nonzero().view(-1);
  s.active_ = idx.size(0);
  s.indices_ = idx.to(device);
  s.mask_ = mask.device() == device && mask.scalar_type() == torch::kBool ? mask
                                                                          : s.host_mask_.to(device);
  return s;
}

torch::Tensor gather_rows(const torch::Tensor& x, const RowSelection& rows) {
  TORCH_CHECK(x.size(0) == rows.batch(), "gather_rows: the selection is for ", rows.batch(),
              " rows, the tensor has ", x.size(0));
  if (rows.all_active()) return x;
  if (rows.none_active()) return x.slice(0, 0, 0);
  // index_select does not keep channels-last: the work runs in the layout of the full batch.
  return x.index_select(0, rows.indices()).contiguous(x.suggest_memory_format());
}

namespace {
void check_scatter(const char* what, const torch::Tensor& base, const torch::Tensor& values,
                   const RowSelection& rows) {
  TORCH_CHECK(base.size(0) == rows.batch(), what, ": the selection is for ", rows.batch(),
              " rows, base has ", base.size(0));
  TORCH_CHECK(values.size(0) == rows.active(), what, ": expected ", rows.active(),
              " rows of values (one per active row), got ", values.size(0));
}
}  // namespace

torch::Tensor scatter_add_rows(const torch::Tensor& base, const torch::Tensor& values,
                               const RowSelection& rows, double alpha) {
  check_scatter("scatter_add_rows", base, values, rows);
  if (rows.none_active()) return base;
  if (rows.all_active()) return alpha == 1.0 ? base + values : torch::add(base, values, alpha);
  return base.index_add(0, rows.indices(), values, alpha);
}

torch::Tensor scatter_rows(const torch::Tensor& base, const torch::Tensor& values,
                           const RowSelection& rows) {
  check_scatter("scatter_rows", base, values, rows);
  if (rows.none_active()) return base;
  if (rows.all_active()) return values;
  return base.index_copy(0, rows.indices(), values);
}

}  // namespace dynattn
