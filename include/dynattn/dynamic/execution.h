// Dynamic execution modes (SYSTEMS.md, "the shared execution rule"): a per-sample decision (an
// exit, a skipped block, a halted position) is carried out in one of two modes behind one switch,
// which give the same outputs:
//   mask     every row computes the work and the decision blends the result in (what training
//            of learned gates needs: every row sees the work's gradient path);
//   compact  the rows that need the work are gathered (index_select), the dense op runs on the
//            smaller batch, and the result is scattered back (index_add / index_copy).
// RowSelection and the gather/scatter functions below are the one helper every dynamic module
// uses for this. Deviation to know: in training mode a BatchNorm inside compacted work normalises
// over the executed rows only (a smaller batch), so mask and compact agree exactly in eval mode,
// or in training mode for work without batch statistics.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace dynattn {

enum class ExecutionMode { kMask, kCompact };

// "mask" or "compact"; anything else fails naming `context` (e.g. "model resnet56 option sd_exec").
ExecutionMode parse_execution_mode(const std::string& text, const std::string& context);
const char* execution_mode_name(ExecutionMode mode);

// Which rows of a batch run a piece of work. The number of active rows is always known on the
// host: a selection built from a host (CPU) mask costs no device-to-host copy, which is why
// stochastic gates draw their decisions on the CPU; one built from a device mask costs one copy.
class RowSelection {
 public:
  RowSelection() = default;
  // Every row, or none: what per-batch decisions give. Neither needs indices() or mask(), which
  // stay undefined (no device tensor is made).
  static RowSelection all(int64_t batch, torch::Device device);
  static RowSelection none(int64_t batch, torch::Device device);
  // mask: [N] bool (or 0/1 of any dtype), on any device. indices() and mask() live on `device`.
  static RowSelection from_mask(const torch::Tensor& mask, torch::Device device);

  int64_t batch() const { return batch_; }
  int64_t active() const { return active_; }
  bool all_active() const { return active_ == batch_; }
  bool none_active() const { return active_ == 0; }
  double fraction() const { return batch_ == 0 ? 0.0 : static_cast<double>(active_) / batch_; }
  // [active] int64 on the device, ascending: the rows compact execution gathers (from_mask).
  const torch::Tensor& indices() const { return indices_; }
  // [N] bool on the device: what mask execution blends with (from_mask).
  const torch::Tensor& mask() const { return mask_; }
  // [N] bool on the CPU: for statistics and reports (no copy: kept from construction).
  const torch::Tensor& host_mask() const { return host_mask_; }

 private:
  int64_t batch_ = 0, active_ = 0;
  torch::Tensor indices_, mask_, host_mask_;
};

// x[rows] along dim 0 (x itself when every row is selected, no row when none is), in x's
// memory format.
torch::Tensor gather_rows(const torch::Tensor& x, const RowSelection& rows);
// base in work's memory format (a copy only when they differ): what a combine starts from, so a
// gated block's output keeps the layout its work ran in, as `out += shortcut` does in place. A
// channels-last network whose first activation is ambiguous (one input channel) would otherwise
// stay contiguous from the first skipped block on, and convert at every conv.
torch::Tensor in_layout_of(const torch::Tensor& base, const torch::Tensor& work);
// base, with alpha * values[i] added onto row indices()[i]; values has one row per active row.
// Out of place and differentiable with respect to both (base when no row is active, base +
// alpha * values when all are); the result has values' memory format.
torch::Tensor scatter_add_rows(const torch::Tensor& base, const torch::Tensor& values,
                               const RowSelection& rows, double alpha = 1.0);
// base, with row indices()[i] replaced by values[i]; out of place, differentiable.
torch::Tensor scatter_rows(const torch::Tensor& base, const torch::Tensor& values,
                           const RowSelection& rows);

}  // namespace dynattn
