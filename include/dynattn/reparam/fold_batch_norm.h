// Conv-BN folding: an eval-mode BatchNorm after a convolution is an affine map per output
// channel, so it folds exactly into the convolution's weight and bias:
//   W' = W * gamma / sqrt(var + eps),  b' = (b - mean) * gamma / sqrt(var + eps) + beta.
// (The standard inference rewrite; RepVGG, Ding et al. CVPR 2021, and DeepRebirth, Li et al.
// AAAI 2018, build on it.) Works for 1-D/2-D/3-D convolutions with or without bias, any stride,
// dilation, padding and groups (depthwise included). Not for transposed convolutions, where the
// output channels sit in the weight's second dimension.
#pragma once
#include <torch/torch.h>

#include <string>

namespace dynattn {

// The folded weight and bias of `weight`/`bias` (bias may be undefined) followed by a BN with
// these statistics; BN `bn_weight`/`bn_bias` may be undefined (affine=false). Computed in double
// and returned in the weight's dtype, so folding adds no error beyond the final rounding.
struct FoldedConv {
  torch::Tensor weight, bias;
};
FoldedConv fold_batch_norm(const torch::Tensor& weight, const torch::Tensor& bias,
                           const torch::Tensor& running_mean, const torch::Tensor& running_var,
                           const torch::Tensor& bn_weight, const torch::Tensor& bn_bias, double eps,
                           const std::string& where);

// A new Conv2d with bias, equal (in eval mode) to bn(conv(x)). Fails naming `where` when the BN is
// in training mode or has no running statistics (then it is no fixed affine map), or when the
// channel counts do not match.
torch::nn::Conv2d fold_conv_bn(const torch::nn::Conv2dImpl& conv,
                               const torch::nn::BatchNorm2dImpl& bn, const std::string& where);

}  // namespace dynattn
