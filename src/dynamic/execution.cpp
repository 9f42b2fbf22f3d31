#include "dynattn/dynamic/execution.h"

#include <vector>

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

namespace {
// Row operations on the raw memory of each sample. In a tensor whose batch dimension is
// outermost and whose other dimensions are dense (contiguous and channels-last alike), every
// sample is one block of numel / N values, so gathering or scattering samples is gathering
// rows of that [N, numel / N] matrix: one dense copy per row whatever the layout, and results
// keep the layout (index_select and index_add on a channels-last 4-D tensor neither keep it nor
// run as block copies, and their backward builds zeros and an index_add in the default layout).

int64_t row_size(const torch::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

bool rows_dense(const torch::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == row_size(t));
}

// t itself when its samples are dense blocks, else a copy in its suggested memory format.
torch::Tensor dense_rows(const torch::Tensor& t) {
  if (rows_dense(t)) return t;
  auto c = t.contiguous(t.dim() == 4 ? t.suggest_memory_format() : torch::MemoryFormat::Contiguous);
  return rows_dense(c) ? c : t.contiguous();
}

// The strides of a tensor of `rows` samples laid out as `like` (dense rows) lays out each one.
std::vector<int64_t> row_strides(const torch::Tensor& like) {
  auto strides = like.strides().vec();
  if (!strides.empty()) strides[0] = row_size(like);
  return strides;
}

// t (any layout) with the sample layout of `like` (dense rows): t itself when it has it.
torch::Tensor with_rows_like(const torch::Tensor& t, const torch::Tensor& like) {
  const auto strides = row_strides(like);
  if (rows_dense(t) && (t.dim() < 2 || t.strides().slice(1) == like.strides().slice(1))) return t;
  return torch::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

// [N, numel / N] over the memory of a dense-rows tensor.
torch::Tensor as_matrix(const torch::Tensor& t) {
  const int64_t r = row_size(t);
  return t.as_strided({t.size(0), r}, {r, 1});
}

// The [k, numel / N] matrix m seen as k samples laid out as `like`.
torch::Tensor as_rows_like(const torch::Tensor& m, const torch::Tensor& like) {
  auto sizes = like.sizes().vec();
  sizes[0] = m.size(0);
  return m.as_strided(sizes, row_strides(like));
}

torch::Tensor take_rows(const torch::Tensor& x_dense, const torch::Tensor& indices) {
  return as_rows_like(as_matrix(x_dense).index_select(0, indices), x_dense);
}

struct GatherRows : torch::autograd::Function<GatherRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& indices) {
    const auto xd = dense_rows(x);
    ctx->save_for_backward({indices});
    ctx->saved_data["sizes"] = x.sizes().vec();
    ctx->saved_data["strides"] = row_strides(xd);
    return take_rows(xd, indices);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto indices = ctx->get_saved_variables()[0];
    const auto& g = grads[0];
    auto gx = torch::zeros(ctx->saved_data["sizes"].toIntVector(), g.options())
                  .as_strided(ctx->saved_data["sizes"].toIntVector(),
                              ctx->saved_data["strides"].toIntVector());
    as_matrix(gx).index_add_(0, indices, as_matrix(with_rows_like(g, gx)));
    return {gx, torch::Tensor()};
  }
};

// base + alpha * values on the selected rows (replace: values instead), in values' layout.
struct ScatterRows : torch::autograd::Function<ScatterRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& base,
                               const torch::Tensor& values, const torch::Tensor& indices,
                               double alpha, bool replace) {
    const auto vd = dense_rows(values);
    auto out = torch::empty_strided(base.sizes(), row_strides(vd), vd.options()).copy_(base);
    if (replace) {
      as_matrix(out).index_copy_(0, indices, as_matrix(vd));
    } else {
      as_matrix(out).index_add_(0, indices, as_matrix(vd), alpha);
    }
    ctx->save_for_backward({indices});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["replace"] = replace;
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto indices = ctx->get_saved_variables()[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool replace = ctx->saved_data["replace"].toBool();
    const auto gd = dense_rows(grads[0]);
    auto g_values = take_rows(gd, indices);
    if (!replace && alpha != 1.0) g_values = g_values * alpha;
    torch::Tensor g_base = gd;
    if (replace) {
      g_base = gd.clone();
      as_matrix(g_base).index_fill_(0, indices, 0);
    }
    return {g_base, g_values, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};
}  // namespace

torch::Tensor gather_rows(const torch::Tensor& x, const RowSelection& rows) {
  TORCH_CHECK(x.size(0) == rows.batch(), "gather_rows: the selection is for ", rows.batch(),
              " rows, the tensor has ", x.size(0));
  if (rows.all_active()) return x;
  if (rows.none_active()) return x.slice(0, 0, 0);
  return GatherRows::apply(x, rows.indices());
}

torch::Tensor in_layout_of(const torch::Tensor& base, const torch::Tensor& work) {
  if (base.dim() != 4 || work.dim() != 4) return base;
  const auto format = work.suggest_memory_format();
  return base.is_contiguous(format) ? base : base.contiguous(format);
}

namespace {
void check_scatter(const char* what, const torch::Tensor& base, const torch::Tensor& values,
                   const RowSelection& rows) {
  TORCH_CHECK(base.size(0) == rows.batch(), what, ": the selection is for ", rows.batch(),
              " rows, base has ", base.size(0));
  TORCH_CHECK(values.size(0) == rows.active(), what, ": expected ", rows.active(),
              " rows of values (one per active row), got ", values.size(0));
  TORCH_CHECK(base.sizes().slice(1) == values.sizes().slice(1), what,
              ": base and values must have the same sample shape, got ", base.sizes(), " and ",
              values.sizes());
}
}  // namespace

torch::Tensor scatter_add_rows(const torch::Tensor& base, const torch::Tensor& values,
                               const RowSelection& rows, double alpha) {
  check_scatter("scatter_add_rows", base, values, rows);
  if (rows.none_active()) return base;
  const auto b = in_layout_of(base, values);
  if (rows.all_active()) return alpha == 1.0 ? b + values : torch::add(b, values, alpha);
  return ScatterRows::apply(base, values, rows.indices(), alpha, false);
}

torch::Tensor scatter_rows(const torch::Tensor& base, const torch::Tensor& values,
                           const RowSelection& rows) {
  check_scatter("scatter_rows", base, values, rows);
  if (rows.none_active()) return base;
  if (rows.all_active()) return values;
  return ScatterRows::apply(base, values, rows.indices(), 1.0, true);
}

}  // namespace dynattn
