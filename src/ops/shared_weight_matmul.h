// out[n] = w x[n] (+ residual[n]) over a batch of row-major matrices with one shared weight, on
// oneDNN's brgemm matmul (internal; needs DYNATTN_HAVE_ONEDNN). This is a 1x1 convolution of an
// NCHW batch without the layout reorders ATen's oneDNN convolution adds around it; the residual
// add runs inside the product (a binary post-op), not as a pass of its own. oneDNN 2.6 runs this
// form only with the weight as the shared (broadcast) operand and a bias-free product: a
// per-row bias is to be folded in by the caller (e.g. as one more weight column times a row of
// ones).
#pragma once
#ifdef DYNATTN_HAVE_ONEDNN
#include <cstdint>
#include <memory>

namespace dynattn::detail {

struct SharedWeightMatmulShape {
  int64_t m = 0, k = 0;  // w is [m, k], row-major
  int64_t batch = 0, cols = 0;
  int64_t x_stride = 0;    // floats from x[n] to x[n + 1]; x[n] is [k, cols] row-major
  int64_t out_stride = 0;  // floats from out[n] to out[n + 1]; out[n] is [m, cols]
  bool residual = false;   // residual[n] is [m, cols], contiguous images
  bool operator==(const SharedWeightMatmulShape& o) const {
    return m == o.m && k == o.k && batch == o.batch && cols == o.cols && x_stride == o.x_stride &&
           out_stride == o.out_stride && residual == o.residual;
  }
};

// Keeps the primitive of the last shape it ran (not thread-safe: one per call site and module).
class SharedWeightMatmul {
 public:
  SharedWeightMatmul();
  ~SharedWeightMatmul();
  void run(const SharedWeightMatmulShape& shape, const float* w, const float* x, float* out,
           const float* residual = nullptr);

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};

}  // namespace dynattn::detail
#endif
