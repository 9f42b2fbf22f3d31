// CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
// section 4.2): a 3x3 stem, three stages of n basic blocks at widths 16/32/64, depth 6n+2
// (ResNet-20/32/56/110), global average pooling and a linear classifier.
// Deviations: inputs are 28x28 Fashion-MNIST (stages at 28/14/7); the default shortcut is the
// projection (1x1 conv + BN, the paper's option B) rather than zero padding (option A, kept as
// `shortcut="pad"`); the last BN of each block starts at zero (timm's zero_init_last), so every
// block starts as the identity. Each block has an attention slot after its last BN, before the
// residual add (SENet's placement); a second slot puts a module after chosen stages (BAM's
// placement at stage boundaries, non-local blocks). Parameter names follow timm/torchvision:
// conv1, bn1, layer1..3, fc (or `head` for a bilinear head); in blocks conv1, bn1, conv2, bn2,
// downsample.{0,1}, and `attn` for the block slot; `stage_attn1`, `stage_attn2`, ... after layer1,
// layer2, ...
// Stochastic depth (dynamic/stochastic_depth.h) gates every block's residual branch when
// `stochastic_depth` has a schedule; forward_dynamic() reports what each sample executed.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/attention/bilinear_head.h"
#include "dynattn/dynamic/dynamic_output.h"
#include "dynattn/dynamic/stochastic_depth.h"
#include "dynattn/ops/onednn_chain.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn {

struct CifarResNetOptions {
  TORCH_ARG(int64_t, depth) = 20;  // 6n + 2
  TORCH_ARG(int64_t, in_channels) = 1;
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(int64_t, base_width) = 16;
  TORCH_ARG(std::string, attention) = "none";  // attention slot spec, e.g. "se:r=8"
  TORCH_ARG(std::string, shortcut) = "conv";   // "conv" (option B) or "pad" (option A)
  TORCH_ARG(bool, zero_init_last) = true;
  // Attention module after whole stages, e.g. "bam" after stages 1 and 2 (BAM's bottlenecks).
  TORCH_ARG(std::string, stage_attention) = "none";
  TORCH_ARG(std::vector<int64_t>, stage_attention_after) = std::vector<int64_t>{1, 2};
  // "avg" (global average pooling + fc), or a bilinear head spec ("full", "tensor_sketch:d=2048",
  // see attention/bilinear_head.h) that replaces both.
  TORCH_ARG(std::string, head) = "avg";
  // The deployed form: every conv + BN pair folded into a conv with bias (see deploy()).
  TORCH_ARG(bool, deployed) = false;
  // Stochastic depth over all blocks (first to last); schedule "none": off.
  TORCH_ARG(StochasticDepthOptions, stochastic_depth) = {};
};

struct BasicBlockOptions {
  BasicBlockOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, stride) = 1;
  TORCH_ARG(std::string, attention) = "none";
  TORCH_ARG(std::string, shortcut) = "conv";
  TORCH_ARG(bool, zero_init_last) = true;
  TORCH_ARG(bool, deployed) = false;  // convs with bias, no BN
};

// conv3x3-BN-ReLU-conv3x3-BN-[attention] + shortcut, then ReLU.
class BasicBlockImpl : public torch::nn::Cloneable<BasicBlockImpl>, public Reparameterizable {
 public:
  explicit BasicBlockImpl(BasicBlockOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // The residual branch alone (no shortcut, no final ReLU): what dynamic wrappers gate.
  torch::Tensor residual(const torch::Tensor& x);
  // residual(x), also adding the attention module's maps to `maps` as "<prefix>attn.<name>".
  torch::Tensor residual_with_maps(const torch::Tensor& x, AttentionMaps& maps,
                                   const std::string& prefix);
  torch::Tensor shortcut(const torch::Tensor& x);
  // The deployed block without attention can run on input in oneDNN layout (see
  // ops/onednn_chain.h), the output staying in that layout.
  bool onednn_ready() const;
  torch::Tensor forward_onednn(const torch::Tensor& x);
  // Folds conv1+bn1, conv2+bn2 and the projection's conv+BN; the block is then `deployed`.
  std::vector<std::string> reparameterize() override;
  // forward(x), also adding the attention module's maps to `maps` as "<prefix>attn.<name>".
  torch::Tensor forward_with_maps(const torch::Tensor& x, AttentionMaps& maps,
                                  const std::string& prefix);
  void pretty_print(std::ostream& stream) const override;

  BasicBlockOptions options;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};  // empty when deployed
  torch::nn::Sequential downsample{nullptr};          // projection shortcut, when shapes change
  torch::nn::AnyModule attn;                          // empty when the slot is "none"

 private:
  torch::Tensor residual_impl(const torch::Tensor& x, AttentionMaps* maps,
                              const std::string& prefix);
  PackedConv2d packed_conv1_, packed_conv2_, packed_downsample_;
};
TORCH_MODULE(BasicBlock);

class CifarResNetImpl : public torch::nn::Cloneable<CifarResNetImpl>, public Reparameterizable {
 public:
  explicit CifarResNetImpl(CifarResNetOptions options = {});
  void reset() override;
  // Deployed, without attention modules and with the average-pooling head, CPU float inference
  // runs the whole trunk in oneDNN's blocked layout (ops/onednn_chain.h): same maths.
  torch::Tensor forward(const torch::Tensor& x);
  // Pooled features before the classifier: [N, 4 * base_width], or the bilinear head's.
  torch::Tensor features(const torch::Tensor& x);
  // forward(x) and the maps of every attention module, keyed by module path and map name,
  // e.g. "layer1.0.attn.spatial", "stage_attn2.affinity".
  AttentionOutput forward_with_maps(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // Folds the stem's conv1+bn1 (deploy() reaches the blocks on its own) and marks the options
  // `deployed`, so that a checkpoint of the result rebuilds the same structure; converts
  // stochastic depth's test-time scaling into the weights (fold_survival_scaling()).
  std::vector<std::string> reparameterize() override;
  // deployed=true, and sd_test=identity once the survival scaling is in the weights.
  std::vector<std::pair<std::string, std::string>> deployed_options() const override;

  // All residual blocks in order (stage by stage): what BlockDrop & co. address.
  std::vector<BasicBlock> blocks() const;

  // The forward with every block behind its gate: logits, which blocks each sample used
  // (`executed`, gates named "layer1.0", ...) and, with count_macs, the MACs each sample ran.
  // Training mode draws stochastic depth's decisions as forward() does.
  DynamicOutput forward_dynamic(const torch::Tensor& x, bool count_macs = true);
  // One gate per block (survival probability 1 everywhere without stochastic depth).
  const std::vector<StochasticDepthGate>& stochastic_depth_gates() const { return gates_; }
  // mask or compact, for every block's gate (and in options, so clone() keeps it).
  void set_execution_mode(ExecutionMode mode);
  ExecutionMode execution_mode() const;
  // Stochastic depth with the paper's test-time scaling (residual * p_l) turned into timm's
  // identity at test: each block's last affine, bn2 (or conv2 once deployed), is multiplied by
  // p_l, and the options' test_time becomes "identity". Exact in eval mode. Returns the scaled
  // layers; nothing when there is nothing to convert, or when blocks hold attention modules
  // (a gate such as SE is not linear in its input: the scaling then stays at run time).
  std::vector<std::string> fold_survival_scaling();

  CifarResNetOptions options;
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};  // empty when deployed
  torch::nn::Sequential layer1{nullptr}, layer2{nullptr}, layer3{nullptr};
  // stage_attn[k]: after layer k+1; empty where the stage slot is not used.
  std::vector<torch::nn::AnyModule> stage_attn;
  torch::nn::Linear fc{nullptr};        // with head "avg"
  BilinearHead bilinear_head{nullptr};  // otherwise, registered as "head"

 private:
  // The stem, the stages and the stage modules, collecting maps when `maps` is not null and
  // the gates' results when `trace` is not null.
  torch::Tensor trunk(const torch::Tensor& x, AttentionMaps* maps, ExecutionTrace* trace);
  // One block behind its gate: relu(shortcut(x) + gated residual(x)).
  torch::Tensor gated_block(BasicBlockImpl& block, StochasticDepthGate& gate,
                            const torch::Tensor& x, AttentionMaps* maps, const std::string& prefix,
                            ExecutionTrace* trace);
  // Whether a forward in the current mode (training or not) differs from the plain blocks.
  bool stochastic_depth_active() const;
  bool onednn_ready() const;
  PackedConv2d packed_conv1_;
  std::vector<StochasticDepthGate> gates_;  // one per block, rebuilt by reset()
};
TORCH_MODULE(CifarResNet);

}  // namespace dynattn
