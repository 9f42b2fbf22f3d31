// Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel
// Attention for Deep Convolutional Neural Networks", CVPR 2020): a 1-D convolution of size k
// across the pooled channel vector replaces SE's MLP; k = |(log2 C + b) / gamma|_odd.
// Deviations: none. timm's EcaModule also clamps k to >= 3 (differs for C < 8 only).
// Inference (autograd off, CPU float32, see fused_gates_apply()): forward() runs the fused kernel
// of ops/fused_gates.h, the same maths without the per-operator cost of the ATen form that
// training, gate() and forward_with_maps() use.
#pragma once
#include <torch/torch.h>

#include "dynattn/attention/attention_maps.h"

namespace dynattn {

template <class Args>
class KernelOp;  // ops/dispatch.h

struct AttentionInfo;

struct EfficientChannelAttentionOptions {
  /* implicit */ EfficientChannelAttentionOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, kernel_size) = 0;  // 0: adaptive from gamma and beta
  TORCH_ARG(double, gamma) = 2;
  TORCH_ARG(double, beta) = 1;  // the paper's b
};

// The official ECANet rule: t = int(|(log2 C + beta) / gamma|), k = t if t is odd else t + 1.
int64_t eca_kernel_size(int64_t channels, double gamma = 2, double beta = 1);

// Parameter: conv.weight [1,1,k] (Conv1d without bias, timm's and the official name).
// Map "gate": sigmoid(conv(mean_HW(x))), [N,C,1,1].
class EfficientChannelAttentionImpl : public torch::nn::Cloneable<EfficientChannelAttentionImpl>,
                                      public AttentionWithMaps {
 public:
  explicit EfficientChannelAttentionImpl(EfficientChannelAttentionOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  AttentionOutput forward_with_maps(const torch::Tensor& x) override;
  // forward()'s kernels (op "eca" of ops/dispatch.h, `dynattn --kernels list`): the one that
  // runs on x, and any one by name whatever the preference (tests walk each against "aten").
  std::string kernel_for(const torch::Tensor& x);
  torch::Tensor forward_with(const std::string& kernel, const torch::Tensor& x);
  torch::Tensor gate(const torch::Tensor& x);  // [N,C,1,1]
  void pretty_print(std::ostream& stream) const override;

  EfficientChannelAttentionOptions options;
  int64_t kernel_size = 0;  // the k actually used
  torch::nn::Conv1d conv{nullptr};

 private:
  struct KernelCall {
    EfficientChannelAttentionImpl* self;
    const torch::Tensor& x;
  };
  static const KernelOp<KernelCall>& kernels();
};
TORCH_MODULE(EfficientChannelAttention);

// Attention-slot entry "eca": options k, gamma, beta.
AttentionInfo efficient_channel_attention_info();

}  // namespace dynattn
