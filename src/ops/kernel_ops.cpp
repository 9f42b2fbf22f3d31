// The table of ops and their candidates that `dynattn --kernels list` prints (ops/dispatch.h).
// Each entry names the function in ops/ whose checks implement the rule; keep the two together.
#include "dynattn/ops/dispatch.h"

namespace dynattn {
namespace {

std::string needs_onednn_library(const CpuCapability& cpu, const KernelPolicy& p) {
  const auto why = needs_onednn(cpu, p);
  if (!why.empty()) return why;
#ifdef DYNATTN_HAVE_ONEDNN
  return "";
#else
  return "dynattn built without the oneDNN library (libdnnl-dev)";
#endif
}

std::string needs_vector_extensions(const CpuCapability& cpu, const KernelPolicy& p) {
  const auto why = needs_dynattn_policy(cpu, p);
  if (!why.empty()) return why;
#if defined(__GNUC__) || defined(__clang__)
  return "";
#else
  return "needs GCC or Clang vector extensions";
#endif
}

std::string needs_winograd(const CpuCapability& cpu, const KernelPolicy& p) {
  const auto why = needs_onednn_library(cpu, p);
  if (!why.empty()) return why;
  if (p.winograd == WinogradPolicy::kNever) return "--winograd never";
  if (cpu.onednn_block != 16) return "oneDNN has Winograd kernels for AVX-512 only";
  return "";
}

std::vector<KernelOpInfo> build_table() {
  const KernelCandidate aten{"aten", "always: ATen's own operators and kernel choice",
                             always_available};
  return {
      {"conv2d_inference",
       "an inference convolution of the ResNet family (conv2d_forward, ops/conv2d.h)",
       {{"onednn",
         "no autograd, float CPU 4-D, groups 1, zero padding, where ATen would pick "
         "im2col (one image of <= 20480 elements, kernel <= 3x3) and the conv has >= 4 M "
         "MACs, or >= 1 M on maps >= 28x28",
         needs_onednn},
        aten}},
      {"deployed_conv_stack",
       "a deployed RepVGG's conv + ReLU stack (RepVGG forward, ops/onednn_chain.h)",
       {{"onednn_stack_winograd",
         "as onednn_stack, for the layers whose Winograd kernel --winograd picks (measured: "
         "the faster on first use of a layer shape)",
         needs_winograd},
        {"onednn_stack",
         "libdnnl direct convolutions with the ReLU fused, activations in the CPU's blocked "
         "layout (8 or 16 channels); every layer's implementation is checked when its plan is "
         "made: a reference one makes the layer try `any` layouts, then the whole stack falls "
         "to the next candidate",
         needs_onednn_library},
        {"onednn_blocked", "ATen's oneDNN convolution on to_mkldnn() tensors (PackedConv2d)",
         needs_onednn},
        aten}},
      {"deployed_resnet",
       "a deployed CIFAR ResNet without attention (CifarResNet forward, ops/onednn_chain.h)",
       {{"onednn_blocked",
         "ATen's oneDNN convolution on to_mkldnn() tensors, weights packed once (PackedConv2d)",
         needs_onednn},
        aten}},
      {"same_conv2d",
       "the narrow same-padded convolutions of the attention gates, forward and backward "
       "(same_conv2d, ops/conv2d.h)",
       {{"lanes",
         "as direct, k > 1 odd and <= the lane kernel's largest, batch >= 8: images "
         "side by side in each vector (ops/lane_conv.h)",
         needs_vector_extensions},
        {"direct",
         "float NCHW, <= 128 multiply-adds per pixel (k > 1) or <= 64 channel pairs "
         "(1x1): direct loops",
         needs_dynattn_policy},
        aten}},
      {"channel_gates",
       "SE, ECA, CBAM and BAM gates in inference (fused_* of ops/fused_gates.h)",
       {{"fused_16",
         "as fused, the pooling, channel argmax and combine loops on 16-float "
         "vectors",
         needs_avx512_wide},
        {"fused",
         "no autograd, float CPU 4-D, contiguous or channels-last, float parameters: "
         "one pass per stage, AVX2 or baseline clones",
         needs_dynattn_policy},
        aten}},
      {"channel_gates_train",
       "SE, ECA, CBAM and BAM gates in training (fused_*_train of ops/fused_gates.h)",
       {{"fused_16", "as fused, on 16-float vectors", needs_avx512_wide},
        {"fused",
         "float CPU 4-D, contiguous or channels-last, float parameters: one autograd "
         "node per gate",
         needs_dynattn_policy},
        aten}},
      {"bam_spatial_branch",
       "BAM's spatial branch, forward and backward (ops/bam_spatial_branch.h)",
       {{"lanes",
         "float CPU, layers as BAM builds them; in training always, in inference from "
         "batch 8 (from 2 when rd <= 8)",
         needs_vector_extensions},
        {"in_fused_gate",
         "inference, rd <= 4 (or rd <= 16 at batch <= 2) where lanes does not pay: inside "
         "fused_bam's per-image loop",
         needs_dynattn_policy},
        aten}},
      {"softmax_attention",
       "the non-local block's attention product, forward and backward "
       "(ops/softmax_attention.h)",
       {{"register_kernel",
         "float CPU 3-D, phi and g of one image fit in L2 ((D + Dv) K <= "
         "2^16 floats): src/ops/attention_kernel.cpp",
         needs_vector_extensions},
        {"onednn_matmul", "float CPU 3-D: oneDNN batched matmul and softmax", needs_onednn_library},
        aten}},
      {"non_local_block",
       "the non-local block's whole forward (NonLocalBlock, attention/non_local.h)",
       {{"inference_z_on_keys",
         "as inference, when (W_z g) P^T takes fewer MACs than W_z (g P^T) (few keys, pooled "
         "first)",
         needs_onednn_library},
        {"inference",
         "eval mode, embedded or gaussian, float contiguous CPU, no gradient: one "
         "node, BN and the residual in the kernel's store",
         needs_onednn_library},
        {"training",
         "training mode, embedded, affine BN, float contiguous CPU, the attention "
         "kernel suits the shape: one autograd node",
         needs_onednn_library},
        aten}},
      {"pointwise_conv",
       "the non-local block's 1x1 projections, forward and backward (ops/pointwise_conv.h)",
       {{"onednn_matmul",
         "float CPU, >= 3-D: oneDNN products with the weight shared across the "
         "batch, no layout reorders",
         needs_onednn_library},
        aten}},
      {"batch_norm_add",
       "training batch norm + residual add (ops/batch_norm_add.h)",
       {{"fused", "float contiguous CPU, same shapes: two passes forward, two backward",
         needs_dynattn_policy},
        aten}},
      {"max_pool_halve",
       "the non-local block's 2x max-pool of keys (halve_by_max, attention/non_local.cpp)",
       {{"direct", "float contiguous CPU, also under autograd", needs_dynattn_policy}, aten}},
  };
}

}  // namespace

const std::vector<KernelOpInfo>& kernel_ops() {
  static const std::vector<KernelOpInfo> table = build_table();
  return table;
}

}  // namespace dynattn
