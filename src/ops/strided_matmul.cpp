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

struct Plan {
  MatrixBatch a, b, out;
  bool residual = false;
  dnnl::matmul primitive;
};

// Creating a primitive descriptor costs tens of microseconds, as much as a small product: the
// last shapes each thread ran are kept (a block's forward and backward use a handful).
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
  cache.push_back({a, b, out, residual, dnnl::matmul(pd)});
  return cache.back();
}

}  // namespace

void strided_matmul(const MatrixBatch& a, const float* a_data, const MatrixBatch& b,
                    const float* b_data, const MatrixBatch& out, float* out_data,
                    const float* residual) {
  auto& engine = onednn_cpu_engine();
  Plan& plan = plan_for(a, b, out, residual != nullptr);
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(desc_of(a), engine, const_cast<float*>(a_data))},
      {DNNL_ARG_WEIGHTS, memory(desc_of(b), engine, const_cast<float*>(b_data))},
      {DNNL_ARG_DST, memory(desc_of(out), engine, out_data)}};
  if (residual != nullptr) {
    args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                 memory(desc_of(out), engine, const_cast<float*>(residual))});
  }
  dnnl::stream stream(engine);
  plan.primitive.execute(stream, args);
  stream.wait();
}

}  // namespace dynattn::detail
#endif
