// Conv + BatchNorm (+ optional ReLU) as one unit, the building block of VGG/Inception-style nets
// (torchvision's BasicConv2d, timm's ConvNormAct, RepVGG's conv_bn). Parameter names `conv` and
// `bn` follow those implementations, so weights map. It is Reparameterizable: deploy() folds the
// BN into the conv (exactly, see reparam/fold_batch_norm.h) and the unit becomes a biased conv.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/reparam/deploy.h"

namespace dynattn {

struct ConvBnOptions {
  ConvBnOptions(int64_t in_channels, int64_t out_channels, int64_t kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, kernel_size);
  TORCH_ARG(int64_t, stride) = 1;
  TORCH_ARG(int64_t, padding) = -1;  // -1: "same" for odd kernels at stride 1 (kernel / 2)
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(bool, relu) = false;      // ReLU after the BN
  TORCH_ARG(bool, deployed) = false;  // conv with bias, no BN
};

class ConvBnImpl : public torch::nn::Cloneable<ConvBnImpl>, public Reparameterizable {
 public:
  explicit ConvBnImpl(ConvBnOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // Folds bn into conv ("conv+bn"); nothing once deployed.
  std::vector<std::string> reparameterize() override;
  void pretty_print(std::ostream& stream) const override;

  ConvBnOptions options;
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};  // empty when deployed
};
TORCH_MODULE(ConvBn);

}  // namespace dynattn
