// Convolutions of few-channel maps over a whole batch in the lane layout map[ch][y][x][image]
// (private to the library; needs DYNATTN_HAVE_VEC16): the images side by side in the innermost
// axis, so that each tap is a product of whole vectors of images and taps that fall in the zero
// padding are skipped rather than multiplied. Stride 1, "same" zero padding d * (k / 2), k odd up
// to kLaneConvMaxKernel. Used by BAM's spatial branch (ops/bam_spatial_branch.h) and by
// same_conv2d (ops/conv2d.h) for batches.
#pragma once
#include <torch/torch.h>

#include "vec16.h"

#ifdef DYNATTN_HAVE_VEC16
namespace dynattn::detail {

constexpr int64_t kLaneConvMaxKernel = 7;

// `n` images of h x w pixels.
struct LaneShape {
  int64_t n, h, w;
  int64_t pixels() const { return h * w; }
  int64_t plane() const { return h * w * n; }
};

// A map of `channels` planes in the lane layout, with one vector of slack after the last plane:
// the kernels load whole vectors for the last images of a pixel.
torch::Tensor lane_buffer(int64_t channels, const LaneShape& g,
                          const torch::TensorOptions& options);

// out[o] = bias[o] + sum_i conv(in[i], weight[o][i]); weight [cout][cin][k][k], bias null or
// [cout]. Parallel over output rows.
void lane_conv(const float* in, int64_t cin, const float* weight, const float* bias, int64_t cout,
               int64_t k, int64_t dilation, const LaneShape& g, float* out);

// The input gradient of lane_conv: d_in [cin planes] from d_out [cout planes] (the same
// convolution with the kernel flipped and its channel axes swapped).
void lane_conv_input_grad(const float* d_out, int64_t cout, const float* weight, int64_t cin,
                          int64_t k, int64_t dilation, const LaneShape& g, float* d_in);

// The weight gradient of lane_conv, written to d_weight [cout][cin][k][k].
void lane_conv_weight_grad(const float* d_out, int64_t cout, const float* in, int64_t cin,
                           int64_t k, int64_t dilation, const LaneShape& g, float* d_weight);

// x [n][c][h*w] (contiguous NCHW) into the lane layout, and back.
void to_lanes(const float* x, int64_t c, const LaneShape& g, float* lanes);
void from_lanes(const float* lanes, int64_t c, const LaneShape& g, float* x);

// The sum of a[i] * b[i] over a contiguous run, in double across two vector accumulators.
double lane_run_dot(const float* a, const float* b, int64_t m);

}  // namespace dynattn::detail
#endif
