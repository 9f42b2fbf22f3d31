// BAM, Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018):
// out = (1 + sigmoid(M_c + M_s)) * F, with M_c an MLP (with BN) on avg_HW F and M_s a 1x1
// reduce, two dilated 3x3 convs and a 1x1 to one channel; meant for stage boundaries.
// Deviations: none by default (the paper's sum); `product` is the official code's M_c * M_s.
// The channel descriptor is mean_HW F (official: avg_pool2d with an HxH window, equal when H=W).
// Inference (autograd off, CPU float32, every BN in eval mode; see fused_gates_apply()):
// BAM::forward() runs the fused kernel of ops/fused_gates.h (spatial branch included when
// bam_spatial_in_kernel()), the same maths without the per-operator cost of the ATen form that
// training, the gate modules and forward_with_maps() use.
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/ops/bam_spatial_branch.h"

namespace dynattn {

template <class Args>
class KernelOp;  // ops/dispatch.h

struct AttentionInfo;

struct BAMOptions {
  /* implicit */ BAMOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(double, reduction) = 16;  // r
  TORCH_ARG(std::string,
            reduction_policy) = "floor";  // floor (official C // r) | divisible | explicit
  TORCH_ARG(int64_t, divisor) = 8;        // for "divisible"
  TORCH_ARG(int64_t, rd_channels) = 0;    // > 0: explicit reduced width
  TORCH_ARG(int64_t, dilation) = 4;       // of the two 3x3 convs (padding = dilation)
  TORCH_ARG(bool, product) = false;       // official code: sigmoid(M_c * M_s)
};

// M_c before the sigmoid, [N,C,1,1]. Parameters, as the official ChannelGate names them:
// gate_c.gate_c_fc_0 (Linear C->rd), gate_c.gate_c_bn_1 (BatchNorm1d(rd)),
// gate_c.gate_c_fc_final (Linear rd->C). Training needs a batch of at least 2 (BatchNorm1d).
class BAMChannelGateImpl : public torch::nn::Cloneable<BAMChannelGateImpl> {
 public:
  explicit BAMChannelGateImpl(BAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // Keeps the layer names (torch::nn::Sequential's own clone numbers them "0", "1", ...).
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device = torch::nullopt) const override;

  BAMOptions options;
  int64_t rd_channels = 0;
  torch::nn::Sequential gate_c{nullptr};
};
TORCH_MODULE(BAMChannelGate);

// M_s before the sigmoid, [N,1,H,W]. Parameters, as the official SpatialGate names them:
// gate_s.gate_s_conv_reduce0 (1x1 C->rd), gate_s.gate_s_bn_reduce0,
// gate_s.gate_s_conv_di_{0,1} (3x3 rd->rd, dilation d), gate_s.gate_s_bn_di_{0,1},
// gate_s.gate_s_conv_final (1x1 rd->1); every conv has a bias.
class BAMSpatialGateImpl : public torch::nn::Cloneable<BAMSpatialGateImpl> {
 public:
  explicit BAMSpatialGateImpl(BAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // Keeps the layer names, as BAMChannelGateImpl's.
  std::shared_ptr<torch::nn::Module> clone(
      const torch::optional<torch::Device>& device = torch::nullopt) const override;
  // The layers of gate_s, for ops/bam_spatial_branch.h.
  BamSpatialLayers layers() const;
  // forward()'s kernels (op "bam_spatial_gate" of ops/dispatch.h), as BAMImpl's.
  std::string kernel_for(const torch::Tensor& x);
  torch::Tensor forward_with(const std::string& kernel, const torch::Tensor& x);

  BAMOptions options;
  int64_t rd_channels = 0;
  torch::nn::Sequential gate_s{nullptr};

 private:
  struct KernelCall {
    BAMSpatialGateImpl* self;
    const torch::Tensor& x;
  };
  static const KernelOp<KernelCall>& kernels();
};
TORCH_MODULE(BAMSpatialGate);

// Submodules channel_att and spatial_att, so state-dict keys equal the official BAM's.
// Maps "channel" (M_c, [N,C,1,1]) and "spatial" (M_s, [N,1,H,W]), both before the sigmoid, and
// "attention" (1 + sigmoid(M_c + M_s) or of M_c * M_s, [N,C,H,W]).
class BAMImpl : public torch::nn::Cloneable<BAMImpl>, public AttentionWithMaps {
 public:
  explicit BAMImpl(BAMOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  AttentionOutput forward_with_maps(const torch::Tensor& x) override;
  // forward()'s kernels (op "bam" of ops/dispatch.h, `dynattn --kernels list`): the one that
  // runs on x, and any one by name whatever the preference (tests walk each against "aten").
  std::string kernel_for(const torch::Tensor& x);
  torch::Tensor forward_with(const std::string& kernel, const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  BAMOptions options;
  BAMChannelGate channel_att{nullptr};
  BAMSpatialGate spatial_att{nullptr};

 private:
  torch::Tensor run(const torch::Tensor& x, AttentionMaps* maps);  // maps filled when not null
  // y = x + x * sigmoid(mc + ms) (mc * ms with product), ATen operators.
  torch::Tensor combine(const torch::Tensor& x, const torch::Tensor& mc,
                        const torch::Tensor& ms) const;
  // The fused inference kernel (ops/fused_gates.h) when it applies, else undefined.
  torch::Tensor fused_forward(const torch::Tensor& x);
  // The training form of the fused gates: the channel gate's modules, then the spatial branch and
  // the combine as one node where they apply.
  torch::Tensor fused_train_forward(const torch::Tensor& x);
  struct KernelCall {
    BAMImpl* self;
    const torch::Tensor& x;
  };
  static const KernelOp<KernelCall>& kernels();
};
TORCH_MODULE(BAM);

// Attention-slot entry "bam": options r, rd, policy, divisor, dilation, product.
AttentionInfo bam_attention_info();

}  // namespace dynattn
