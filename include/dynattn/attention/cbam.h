// CBAM, Convolutional Block Attention Module (Woo, Park, Lee, Kweon, ECCV 2018): a channel gate
// M_c = sigmoid(MLP(avg_HW F) + MLP(max_HW F)), then a spatial gate
// M_s = sigmoid(BN(conv_kxk([max_c F'; mean_c F']))) on F' = M_c * F; out = M_s * F'.
// Deviations: the paper has no BN in the spatial gate; defaults follow the official code
// (Jongchan/attention-module: BN with momentum 0.01, max map first, MLP bias, BN weight zeroed
// at init). `spatial_bn = false` is the paper form (the conv then has a bias). Parity switches
// for timm's CbamModule: CBAMOptions::timm().
// Inference (autograd off, CPU float32, spatial BN in eval mode; see fused_gates_apply()):
// CBAM::forward() runs the fused kernel of ops/fused_gates.h, the same maths in three passes over
// the map without the per-operator cost of the ATen form that training, the two gate modules and
// forward_with_maps() use.
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/attention/attention_maps.h"

namespace dynattn {

template <class Args>
class KernelOp;  // ops/dispatch.h

struct AttentionInfo;

struct CBAMOptions {
  /* implicit */ CBAMOptions(int64_t channels) : channels_(channels) {}
  // timm's CbamModule: [mean; max], MLP without bias, width make_divisible(C/r, 1, round_limit
  // 0) (= C/r rounded half up), BN momentum 0.1, no zero init.
  static CBAMOptions timm(int64_t channels);

  TORCH_ARG(int64_t, channels);
  TORCH_ARG(double, reduction) = 16;                   // r
  TORCH_ARG(std::string, reduction_policy) = "floor";  // floor | divisible | explicit
  TORCH_ARG(int64_t, divisor) = 1;                     // for "divisible" (timm's CBAM: 1)
  TORCH_ARG(int64_t, rd_channels) = 0;                 // > 0: explicit reduced width
  TORCH_ARG(bool, max_first) = true;    // spatial conv input [max; mean] (official) or [mean; max]
  TORCH_ARG(bool, mlp_bias) = true;     // official Linear layers have biases, timm's convs not
  TORCH_ARG(bool, spatial_bn) = true;   // BN after the spatial conv (both codes; not the paper)
  TORCH_ARG(int64_t, kernel_size) = 7;  // odd; padding k/2
  TORCH_ARG(double, bn_momentum) = 0.01;  // official BasicConv; timm (PyTorch default) 0.1
  // The official ResNet init sets the spatial BN weight to 0, so M_s starts at 0.5 everywhere.
  TORCH_ARG(bool, zero_init_spatial_bn) = true;
};

// Channel gate. Parameters fc1.weight [rd,C,1,1], fc2.weight [C,rd,1,1], and fc1.bias [rd],
// fc2.bias [C] when mlp_bias. The official code's ChannelGate.mlp.1 / mlp.3 are Linear layers:
// their weights are these, viewed as [rd,C] / [C,rd].
class CBAMChannelGateImpl : public torch::nn::Cloneable<CBAMChannelGateImpl> {
 public:
  explicit CBAMChannelGateImpl(CBAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // M_c, [N,C,1,1]
  void pretty_print(std::ostream& stream) const override;

  CBAMOptions options;
  int64_t rd_channels = 0;
  torch::nn::Conv2d fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CBAMChannelGate);

// Spatial gate. Parameters conv.weight [1,2,k,k] (conv.bias [1] without BN) and bn.* (a
// BatchNorm2d(1)). Official keys SpatialGate.spatial.{conv,bn}.*; timm's spatial.conv.{conv,bn}.*
class CBAMSpatialGateImpl : public torch::nn::Cloneable<CBAMSpatialGateImpl> {
 public:
  explicit CBAMSpatialGateImpl(CBAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);  // M_s, [N,1,H,W]
  void pretty_print(std::ostream& stream) const override;

  CBAMOptions options;
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};  // null without spatial_bn
};
TORCH_MODULE(CBAMSpatialGate);

// Maps "channel" (M_c, [N,C,1,1]) and "spatial" (M_s, [N,1,H,W]), both after the sigmoid.
class CBAMImpl : public torch::nn::Cloneable<CBAMImpl>, public AttentionWithMaps {
 public:
  explicit CBAMImpl(CBAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  AttentionOutput forward_with_maps(const torch::Tensor& x) override;
  // forward()'s kernels (op "cbam" of ops/dispatch.h, `dynattn --kernels list`): the one that
  // runs on x, and any one by name whatever the preference (tests walk each against "aten").
  std::string kernel_for(const torch::Tensor& x);
  torch::Tensor forward_with(const std::string& kernel, const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  CBAMOptions options;
  CBAMChannelGate channel{nullptr};
  CBAMSpatialGate spatial{nullptr};

 private:
  torch::Tensor run(const torch::Tensor& x, AttentionMaps* maps);  // maps filled when not null
  // The fused inference kernel (ops/fused_gates.h) when it applies, else undefined.
  torch::Tensor fused_forward(const torch::Tensor& x);
  struct KernelCall {
    CBAMImpl* self;
    const torch::Tensor& x;
  };
  static const KernelOp<KernelCall>& kernels();
};
TORCH_MODULE(CBAM);

// Attention-slot entry "cbam": options r, rd, policy, divisor, max_first, mlp_bias, spatial_bn,
// kernel.
AttentionInfo cbam_attention_info();

}  // namespace dynattn
