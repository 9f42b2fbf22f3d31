#include "shared_weight_matmul.h"

#ifdef DYNATTN_HAVE_ONEDNN
#include "onednn_engine.h"

namespace dynattn::detail {

using dnnl::memory;
using Dims = memory::dims;

struct SharedWeightMatmul::Plan {
  SharedWeightMatmulShape shape;
  memory::desc w, x, out;
  dnnl::matmul primitive;
};

SharedWeightMatmul::SharedWeightMatmul() = default;
SharedWeightMatmul::~SharedWeightMatmul() = default;

void SharedWeightMatmul::run(const SharedWeightMatmulShape& s, const float* w, const float* x,
                             float* out, const float* residual) {
  auto& engine = onednn_cpu_engine();
  if (!plan_ || !(plan_->shape == s)) {
    auto plan = std::make_unique<Plan>();
    plan->shape = s;
    plan->w = memory::desc(Dims{1, s.m, s.k}, memory::data_type::f32, Dims{s.m * s.k, s.k, 1});
    plan->x = memory::desc(Dims{s.batch, s.k, s.cols}, memory::data_type::f32,
                           Dims{s.x_stride, s.cols, 1});
    plan->out = memory::desc(Dims{s.batch, s.m, s.cols}, memory::data_type::f32,
                             Dims{s.out_stride, s.cols, 1});
    dnnl::primitive_attr attr;
    if (s.residual) {
      dnnl::post_ops ops;
      ops.append_binary(dnnl::algorithm::binary_add,
                        memory::desc(Dims{s.batch, s.m, s.cols}, memory::data_type::f32,
                                     memory::format_tag::abc));
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(plan->w, plan->x, plan->out), attr,
                                          engine);
    plan->primitive = dnnl::matmul(pd);
    plan_ = std::move(plan);
  }
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(plan_->w, engine, const_cast<float*>(w))},
      {DNNL_ARG_WEIGHTS, memory(plan_->x, engine, const_cast<float*>(x))},
      {DNNL_ARG_DST, memory(plan_->out, engine, out)}};
  if (s.residual) {
    args.insert({DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                 memory(memory::desc(Dims{s.batch, s.m, s.cols}, memory::data_type::f32,
                                     memory::format_tag::abc),
                        engine, const_cast<float*>(residual))});
  }
  dnnl::stream stream(engine);
  plan_->primitive.execute(stream, args);
  stream.wait();
}

}  // namespace dynattn::detail
#endif
