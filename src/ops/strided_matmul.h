// out[n] = a[n] b[n] (+ residual[n]) over a batch of float matrices given by sizes and strides,
// on oneDNN's brgemm matmul (internal; needs DYNATTN_HAVE_ONEDNN). A batch size of 1 in a or b
// broadcasts it (a weight shared by the batch); a transpose is a swap of strides, never a copy.
// This runs a 1x1 convolution of an NCHW batch, and its backward, without the layout reorders
// ATen's oneDNN convolution adds around it; the residual add runs inside the product (a binary
// post-op), not as a pass of its own.
//
// oneDNN 2.6 falls back to a reference kernel (orders of magnitude slower) for some stride
// patterns, e.g. a transposed batched a against a shared b, or a per-row bias: callers keep to
// the forms that ops/pointwise_conv.cpp and the non-local block use (a shared, plain or
// transposed, with b batched and plain; a batched and plain with b transposed; out plain).
#pragma once
#ifdef DYNATTN_HAVE_ONEDNN
#include <cstdint>

namespace dynattn::detail {

struct MatrixBatch {
  int64_t batch = 1, rows = 0, cols = 0;
  int64_t batch_stride = 0, row_stride = 0, col_stride = 1;
  bool operator==(const MatrixBatch& o) const {
    return batch == o.batch && rows == o.rows && cols == o.cols && batch_stride == o.batch_stride &&
           row_stride == o.row_stride && col_stride == o.col_stride;
  }
};

// Row-major matrices one after another (`batch_stride` floats apart, default rows * cols).
MatrixBatch row_major(int64_t batch, int64_t rows, int64_t cols, int64_t batch_stride = -1);
// The transpose of row_major(batch, cols, rows, batch_stride), read through strides.
MatrixBatch transposed(int64_t batch, int64_t rows, int64_t cols, int64_t batch_stride = -1);

// out = a b (+ residual, laid out as out). Primitives are cached per shape and thread.
void strided_matmul(const MatrixBatch& a, const float* a_data, const MatrixBatch& b,
                    const float* b_data, const MatrixBatch& out, float* out_data,
                    const float* residual = nullptr);

}  // namespace dynattn::detail
#endif
