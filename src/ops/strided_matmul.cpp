#include "strided_matmul.h"

#ifdef DYNATTN_HAVE_ONEDNN
#include <unordered_map>
#include <vector>

#include "onednn_engine.h"

namespace dynattn::detail {

using dnnl::memory;
using Dims = memory::dims;

MatrixBatch row_major(int64_t batch, int64_t rows, int64_t cols, int64_t batch_stride) {
  return {batch, rows, cols, batch_stride < 0 ? rows * cols : batch_stride, cols, 1};
}

MatrixBatch transposed(int64_t batch, int64_t rows, int64_t cols, int64_t batch_stride) {
  return {batch, rows, cols, batch_stride < 0 ? rows * cols : batch_stride, 1, rows};
}

namespace {

memory::desc desc_of(const MatrixBatch& m) {
  return memory::desc(Dims{m.batch, m.rows, m.cols}, memory::data_type::f32,
                      Dims{m.batch_stride, m.row_stride, m.col_stride});
}

// A primitive with its memory objects and arguments: a call only points them at its data.
struct Plan {
  MatrixBatch a, b, out;
  bool residual = false;
  dnnl::matmul primitive;
  memory src, weights, dst, extra;
  std::unordered_map<int, memory> args;
};

// Creating a primitive descriptor costs tens of microseconds, as much as a small product: the
// last shapes each thread ran are kept (a block's forward and backward use a handful), with
// their memory objects and, per thread, one stream (building those per call was about a fifth
// of a non-local block's training step at batch 1 in BM_NonLocal).
constexpr size_t kCachedPlans = 32;

Plan& plan_for(const MatrixBatch& a, const MatrixBatch& b, const MatrixBatch& out, bool residual) {
  thread_local std::vector<Plan> cache;
  for (auto& p : cache)
    if (p.a == a && p.b == b && p.out == out && p.residual == residual) return p;
  dnnl::primitive_attr attr;
  if (residual) {
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_add, desc_of(out));
    attr.set_post_ops(ops);
  }
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(desc_of(a), desc_of(b), desc_of(out)),
                                        attr, onednn_cpu_engine());
  if (cache.size() == kCachedPlans) cache.erase(cache.begin());
  auto& engine = onednn_cpu_engine();
  Plan plan;
  plan.a = a;
  plan.b = b;
  plan.out = out;
  plan.residual = residual;
  plan.primitive = dnnl::matmul(pd);
  plan.src = memory(desc_of(a), engine, DNNL_MEMORY_NONE);
  plan.weights = memory(desc_of(b), engine, DNNL_MEMORY_NONE);
  plan.dst = memory(desc_of(out), engine, DNNL_MEMORY_NONE);
  plan.args = {
      {DNNL_ARG_SRC, plan.src}, {DNNL_ARG_WEIGHTS, plan.weights}, {DNNL_ARG_DST, plan.dst}};
  if (residual) {
    plan.extra = memory(desc_of(out), engine, DNNL_MEMORY_NONE);
    plan.args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, plan.extra});
  }
  cache.push_back(std::move(plan));
  return cache.back();
}

}  // namespace

void strided_matmul(const MatrixBatch& a, const float* a_data, const MatrixBatch& b,
                    const float* b_data, const MatrixBatch& out, float* out_data,
                    const float* residual) {
  Plan& plan = plan_for(a, b, out, residual != nullptr);
  plan.src.set_data_handle(const_cast<float*>(a_data));
  plan.weights.set_data_handle(const_cast<float*>(b_data));
  plan.dst.set_data_handle(out_data);
  if (residual != nullptr) plan.extra.set_data_handle(const_cast<float*>(residual));
  auto& stream = onednn_cpu_stream();
  plan.primitive.execute(stream, plan.args);
  stream.wait();
}

}  // namespace dynattn::detail
#endif
