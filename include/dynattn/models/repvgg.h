// RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021): a plain stack
// of 3x3 convs + ReLU at inference, trained with two extra branches per block,
//   y = ReLU(BN(conv3x3 x) + BN(conv1x1 x) + BN(x)),
// the identity BN only where in == out channels and stride 1. reparameterize() fuses the three
// branches exactly into one 3x3 conv with bias (each conv+BN folded, the 1x1 kernel padded to
// 3x3, the identity written as a 3x3 kernel with 1 at the centre of its own channel, groups
// aware; then summed).
// Families (paper, table 2): stage widths [min(64, 64a), 64a, 128a, 256a, 512b], depths
// A = [1, 2, 4, 14, 1], B = [1, 4, 6, 16, 1]; A0 a/b = 0.75/2.5, A1 1/2.5, B0 1/2.5; g2/g4 use
// 2 or 4 groups in the blocks the official code lists (layers 2, 4, 6, ... counted from the first
// block of stage 1).
// Parameter names are those of the official code (DingXiaoH/RepVGG, repvgg.py): stage0..stage4,
// rbr_dense.{conv,bn}, rbr_1x1.{conv,bn}, rbr_identity, rbr_reparam, linear; the key map "timm"
// imports timm's ByobNet names (stem, stages.N, conv_kxk, conv_1x1, identity, reparam_conv,
// head.fc).
// Deviations: inputs are 28x28 Fashion-MNIST, so the stem (stage0) has stride 1 instead of 2
// (stages at 28/14/7/4/2 instead of 112/56/28/14/7); `strides` changes this. Convs keep
// PyTorch's default init, as the official code does.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/models/conv_bn.h"
#include "dynattn/ops/onednn_chain.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn {

struct RepVGGBlockOptions {
  RepVGGBlockOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, stride) = 1;
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(bool, deployed) = false;  // one 3x3 conv with bias (rbr_reparam)
};

class RepVGGBlockImpl : public torch::nn::Cloneable<RepVGGBlockImpl>, public Reparameterizable {
 public:
  explicit RepVGGBlockImpl(RepVGGBlockOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // The deployed block on input in oneDNN layout (see ops/onednn_chain.h); output in that layout.
  torch::Tensor forward_onednn(const torch::Tensor& x);
  // The 3x3 kernel and bias equal to the three branches in eval mode (the official
  // get_equivalent_kernel_bias), computed in double. Needs the train form.
  std::pair<torch::Tensor, torch::Tensor> equivalent_kernel_bias() const;
  // Replaces the branches with rbr_reparam; nothing once deployed.
  std::vector<std::string> reparameterize() override;
  void pretty_print(std::ostream& stream) const override;

  RepVGGBlockOptions options;
  ConvBn rbr_dense{nullptr}, rbr_1x1{nullptr};   // train form
  torch::nn::BatchNorm2d rbr_identity{nullptr};  // train form, when shapes allow
  torch::nn::Conv2d rbr_reparam{nullptr};        // deployed form

 private:
  PackedConv2d packed_;  // rbr_reparam's weight in oneDNN layout, for forward_onednn
};
TORCH_MODULE(RepVGGBlock);

struct RepVGGOptions {
  // The paper's families: "a0", "a1", "b0" (depths and width multipliers of table 2).
  static RepVGGOptions family(const std::string& name);

  TORCH_ARG(std::vector<int64_t>, num_blocks) = std::vector<int64_t>{2, 4, 14, 1};
  TORCH_ARG(std::vector<double>, width_multiplier) = std::vector<double>{0.75, 0.75, 0.75, 2.5};
  TORCH_ARG(int64_t, groups) = 1;  // 1, or 2/4 on the official layers 2, 4, 6, ...
  // Strides of stage0..stage4; the paper's are all 2 for 224x224 inputs.
  TORCH_ARG(std::vector<int64_t>, strides) = std::vector<int64_t>{1, 2, 2, 2, 2};
  TORCH_ARG(int64_t, in_channels) = 1;
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(bool, deployed) = false;
};

class RepVGGImpl : public torch::nn::Cloneable<RepVGGImpl>, public Reparameterizable {
 public:
  explicit RepVGGImpl(RepVGGOptions options = {});
  void reset() override;
  // Deployed, in CPU float inference, the whole stack runs in oneDNN's blocked layout (see
  // ops/onednn_chain.h): same maths, fewer memory passes. With the oneDNN library at build
  // time, the convs also carry their ReLUs and may run as Winograd convolutions.
  torch::Tensor forward(const torch::Tensor& x);
  // The oneDNN implementation of each block's conv in the last call that used the stack
  // (empty otherwise), e.g. for `dynattn bench` to say which layers ran as Winograd.
  std::vector<std::string> onednn_implementations() const;
  // Marks the options deployed (the blocks merge themselves when deploy() reaches them).
  std::vector<std::string> reparameterize() override;
  std::vector<RepVGGBlock> blocks() const;

  RepVGGOptions options;
  RepVGGBlock stage0{nullptr};
  std::vector<torch::nn::Sequential> stages;  // stage1..stage4
  torch::nn::Linear linear{nullptr};

 private:
  OnednnConvStack conv_stack_;
};
TORCH_MODULE(RepVGG);

}  // namespace dynattn
