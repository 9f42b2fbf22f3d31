// Squeeze-and-Excitation (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018):
// s = gate(fc2(relu(fc1(mean_HW(x))))), out = x * s, with the FC layers as 1x1 convs with bias.
// Deviations: none by default (reduced width floor(C/r), sigmoid gate). Parity switches: timm's
// make_divisible width (`reduction_policy = "divisible"`) and hard-sigmoid gate (relu6(x+3)/6).
// Inference (autograd off, CPU float32, see fused_gates_apply()): forward() runs the fused kernel
// of ops/fused_gates.h, the same maths without the per-operator cost of the ATen form that
// training, gate() and forward_with_maps() use.
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/attention/attention_maps.h"

namespace dynattn {

template <class Args>
class KernelOp;  // ops/dispatch.h

struct AttentionInfo;

struct SqueezeExcitationOptions {
  /* implicit */ SqueezeExcitationOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(double, reduction) = 16;                   // r
  TORCH_ARG(std::string, reduction_policy) = "floor";  // floor | divisible | explicit
  TORCH_ARG(int64_t, divisor) = 8;                     // for "divisible"
  TORCH_ARG(int64_t, rd_channels) = 0;                 // > 0: explicit reduced width
  TORCH_ARG(std::string, gate) = "sigmoid";            // sigmoid | hard_sigmoid
};

// Parameters: fc1.{weight,bias} [rd,C,1,1], fc2.{weight,bias} [C,rd,1,1] (timm's SEModule names;
// torchvision's SqueezeExcitation uses the same). Map "gate": s, [N,C,1,1].
class SqueezeExcitationImpl : public torch::nn::Cloneable<SqueezeExcitationImpl>,
                              public AttentionWithMaps {
 public:
  explicit SqueezeExcitationImpl(SqueezeExcitationOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  AttentionOutput forward_with_maps(const torch::Tensor& x) override;
  // forward()'s kernels (op "se" of ops/dispatch.h, `dynattn --kernels list`): the one that
  // runs on x, and any one by name whatever the preference (tests walk each against "aten").
  std::string kernel_for(const torch::Tensor& x);
  torch::Tensor forward_with(const std::string& kernel, const torch::Tensor& x);
  // The gate s alone, [N,C,1,1].
  torch::Tensor gate(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  SqueezeExcitationOptions options;
  int64_t rd_channels = 0;  // the reduced width actually used
  torch::nn::Conv2d fc1{nullptr}, fc2{nullptr};

 private:
  struct KernelCall {
    SqueezeExcitationImpl* self;
    const torch::Tensor& x;
  };
  static const KernelOp<KernelCall>& kernels();
};
TORCH_MODULE(SqueezeExcitation);

// Applies "sigmoid" or "hard_sigmoid" (relu6(x + 3) / 6, timm's and torch's hardsigmoid).
// `module` names the caller in the error for any other name.
torch::Tensor apply_channel_gate(const torch::Tensor& logits, const std::string& gate,
                                 const char* module);

// Attention-slot entry "se": options r, rd, policy, divisor, gate.
AttentionInfo squeeze_excitation_attention_info();

}  // namespace dynattn
