// BAM's spatial branch (Park et al., BMVC 2018) over a whole batch, forward and backward:
// M_s = conv_final(relu(bn2(conv_di1(relu(bn1(conv_di0(relu(bn0(conv_reduce(x))))))))), the
// reduce and final convs 1x1 (C -> rd -> 1), the two middle ones 3x3 with dilation d and padding
// d, every conv with an optional bias. After the reduce the branch keeps its maps as
// [rd, H, W, N], the images side by side in the innermost axis: every tap of the dilated convs is
// then a product of whole vectors, taps that fall in the zero padding are skipped instead of
// multiplied, and training BN's statistics are one contiguous run per channel.
//
// Why: the branch is a handful of MACs per pixel (rd = C / 16: 1 to 4 in ResNet-20's BAM) spread
// over operators that each pay LibTorch's fixed cost, and LibTorch 1.13's convolution backward
// is slow for such narrow convolutions (dilated 4 -> 4 at 7x7, N=64: most of a BAM training
// step). bench/bench_attention_channel.cpp (BM_BamSpatialBranch, BM_AttentionForwardBackward)
// times it against the ATen form side by side.
//
// BN layers in training mode normalise with the batch statistics and update their running
// statistics and num_batches_tracked as torch::nn::BatchNorm2d does; in eval mode they use the
// running statistics. Gradients reach x and every parameter when autograd records; the backward
// is not differentiable again (use --kernels aten for double backward).
#pragma once
#include <torch/torch.h>

namespace dynattn {

// The branch's layers, owned by the caller (BAM's spatial gate).
struct BamSpatialLayers {
  torch::nn::Conv2dImpl* reduce = nullptr;
  torch::nn::BatchNorm2dImpl* reduce_bn = nullptr;
  torch::nn::Conv2dImpl* dilated[2] = {nullptr, nullptr};
  torch::nn::BatchNorm2dImpl* dilated_bn[2] = {nullptr, nullptr};
  torch::nn::Conv2dImpl* final_conv = nullptr;
};

// Whether bam_spatial_branch() computes this branch on x: x a non-empty CPU float32 [N,C,H,W],
// contiguous or channels-last, the kernel policy (ops/dispatch.h) on, and the layers
// shaped as BAM builds them (1x1 C -> rd, 3x3 rd -> rd with padding = dilation, 1x1 rd -> 1,
// stride 1, no groups, zero padding; float32 CPU parameters; BN over rd channels). Otherwise the
// caller keeps the ATen form.
bool bam_spatial_branch_applicable(const torch::Tensor& x, const BamSpatialLayers& layers);

// Whether the lane kernels are the faster inference form (no autograd) for a batch of `batch`
// and a branch of width rd: from 8 images on, and from 2 for rd <= 8, they beat both ATen's
// convolutions and fused_bam()'s per-image loops; a single image leaves 15 of each vector's 16
// lanes empty (bench/bench_attention_channel.cpp, BM_BamSpatialBranch). Under autograd they are
// always faster than ATen's convolution backward.
bool bam_spatial_branch_pays_off(int64_t batch, int64_t rd);

// M_s before the sigmoid, [N,1,H,W] contiguous. Records autograd when x or a parameter requires
// grad and grad mode is on.
torch::Tensor bam_spatial_branch(const torch::Tensor& x, const BamSpatialLayers& layers);

// BAM's output with this branch: y = x + x * sigmoid(M_c + M_s) (sigmoid(M_c * M_s) with
// `product`), mc the channel gate's logits [N,C,1,1] (or [N,C]), in x's layout. One autograd node
// for the branch and the combine: its backward writes x's gradient once (the combine's share,
// then the branch's reduce adds its own in place) instead of two maps that autograd sums.
torch::Tensor bam_spatial_branch_combine(const torch::Tensor& x, const torch::Tensor& mc,
                                         const BamSpatialLayers& layers, bool product);

}  // namespace dynattn
