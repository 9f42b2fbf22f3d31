// The table of ops and their candidates that `dynattn --kernels list` prints (ops/dispatch.h).
// Each entry names the function in ops/ whose checks implement the rule; keep the two together.
#include "dynattn/ops/dispatch.h"

namespace dynattn {
namespace {

const char* needs_onednn_library(const CpuCapability& cpu, const KernelPolicy& p) {
  if (const char* why = needs_onednn(cpu, p)) return why;
#ifdef DYNATTN_HAVE_ONEDNN
  return nullptr;
#else
  return "dynattn built without the oneDNN library (libdnnl-dev)";
#endif
}

const char* needs_vector_extensions(const CpuCapability& cpu, const KernelPolicy& p) {
  if (const char* why = needs_dynattn_policy(cpu, p)) return why;
#if defined(__GNUC__) || defined(__clang__)
  return nullptr;
#else
  return "needs GCC or Clang vector extensions";
#endif
}

const char* needs_winograd(const CpuCapability& cpu, const KernelPolicy& p) {
  if (const char* why = needs_onednn_library(cpu, p)) return why;
  if (p.winograd == WinogradPolicy::kNever) return "--winograd never";
  if (cpu.onednn_block != 16) return "oneDNN has Winograd kernels for AVX-512 only";
  return nullptr;
}

// The non-local block's own paths are built around the attention register kernel.
const char* needs_onednn_and_avx512(const CpuCapability& cpu, const KernelPolicy& p) {
  if (const char* why = needs_onednn_library(cpu, p)) return why;
  return needs_avx512_wide(cpu, p);
}

std::vector<KernelOpInfo> build_table() {
  const KernelCandidate aten{"aten", "always: ATen's own operators and kernel choice", nullptr};
  const char* fused_inference =
      "no autograd, float CPU 4-D, contiguous or channels-last, float parameters, BN in eval "
      "form: one fused kernel (ops/fused_gates.h)";
  const char* fused_training =
      "float CPU 4-D, contiguous or channels-last, float parameters: one autograd node "
      "(ops/fused_gates.h)";
  return {
      {"conv2d_inference",
       "an inference convolution of the ResNet family (conv2d_forward, ops/conv2d.h)",
       {{"onednn",
         "no autograd, float CPU 4-D, groups 1, zero padding, where ATen would pick im2col (one "
         "image of <= 20480 elements, kernel <= 3x3) and the conv has >= 4 M MACs, or >= 1 M on "
         "maps >= 28x28",
         needs_onednn},
        aten},
       true},
      {"deployed_conv_stack",
       "a deployed RepVGG's conv + ReLU stack (RepVGG forward, ops/onednn_chain.h)",
       {{"onednn_stack_winograd",
         "as onednn_stack, for the layers whose Winograd kernel --winograd picks (measured: the "
         "faster on first use of a layer shape)",
         needs_winograd},
        {"onednn_stack",
         "libdnnl direct convolutions with the ReLU fused, activations in the CPU's blocked "
         "layout (8 or 16 channels); each layer's implementation is checked when its plan is "
         "made: a reference one makes the layer try `any` layouts, then the whole stack hands "
         "over to the next candidate",
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
      {"se",
       "Squeeze-and-Excitation's forward (attention/squeeze_excitation.h)",
       {{"fused", fused_inference, needs_dynattn_policy},
        {"fused_train", fused_training, needs_dynattn_policy},
        aten},
       true},
      {"eca",
       "Efficient Channel Attention's forward (attention/efficient_channel_attention.h)",
       {{"fused", fused_inference, needs_dynattn_policy},
        {"fused_train", fused_training, needs_dynattn_policy},
        aten},
       true},
      {"cbam",
       "CBAM's forward (attention/cbam.h)",
       {{"fused", fused_inference, needs_dynattn_policy},
        {"fused_train",
         "as the inference rule but under autograd, spatial BN tracking running statistics: one "
         "autograd node, its kxk conv through same_conv2d",
         needs_dynattn_policy},
        aten},
       true},
      {"bam",
       "BAM's forward (attention/bam.h)",
       {{"fused",
         "as SE's fused rule, every BN in eval form; the spatial branch inside the kernel, per "
         "image, for rd <= 4 (rd <= 16 at batch <= 2) below the batch where bam_spatial_gate's "
         "lanes pay, else from bam_spatial_gate",
         needs_dynattn_policy},
        {"fused_train",
         "float CPU 4-D: the channel gate's modules, then the spatial branch and the combine as "
         "one node (bam_spatial_branch_combine) or, with other layers, the combine alone",
         needs_dynattn_policy},
        aten},
       true},
      {"bam_spatial_gate",
       "BAM's spatial branch on its own (attention/bam.h)",
       {{"lanes",
         "float CPU, layers as BAM builds them; under autograd always, in inference from batch 8 "
         "(from 2 when rd <= 8): ops/bam_spatial_branch.h",
         needs_vector_extensions},
        aten},
       true},
      {"fused_gate_vectors",
       "the vector width of the fused gates' pooling, channel argmax, spatial conv and combine "
       "loops (ops/fused_gates.h)",
       {{"vec16", "AVX-512: 16-float vectors", needs_avx512_wide},
        {"vec8", "AVX2 or baseline clones of the same loops", nullptr}}},
      {"same_conv2d",
       "the narrow same-padded convolutions of the attention gates, forward and backward "
       "(same_conv2d, ops/conv2d.h)",
       {{"lanes",
         "as direct, k > 1 odd and <= the lane kernel's largest, batch >= 8: images side by side "
         "in each vector (ops/lane_conv.h)",
         needs_vector_extensions},
        {"direct",
         "float NCHW, <= 128 multiply-adds per pixel (k > 1) or <= 64 channel pairs (1x1): "
         "direct loops",
         needs_dynattn_policy},
        aten}},
      {"softmax_attention",
       "the non-local block's attention product, forward and backward (ops/softmax_attention.h)",
       {{"register_kernel",
         "float CPU 3-D, phi and g of one image fit in L2 ((D + Dv) K <= 2^16 floats): "
         "src/ops/attention_kernel.cpp, 16 queries per AVX-512 vector (3x slower than ATen "
         "on AVX2)",
         needs_avx512_wide},
        {"onednn_matmul", "float CPU 3-D: oneDNN batched matmul and softmax", needs_onednn_library},
        aten}},
      {"non_local_block",
       "the non-local block's whole forward (attention/non_local.h)",
       {{"inference_z_on_keys",
         "as inference, when (W_z g) P^T takes fewer MACs than W_z (g P^T) (few keys, pooled "
         "first)",
         needs_onednn_and_avx512},
        {"inference",
         "eval mode, embedded or gaussian, float contiguous CPU, no gradient, the attention "
         "kernel suits the shape: one node, BN and the residual in the kernel's store",
         needs_onednn_and_avx512},
        {"training",
         "training mode, embedded, affine BN, float contiguous CPU, the attention kernel suits "
         "the shape: one autograd node",
         needs_onednn_and_avx512},
        aten}},
      {"pointwise_conv",
       "the non-local block's 1x1 projections, forward and backward (ops/pointwise_conv.h)",
       {{"onednn_matmul",
         "float CPU, >= 3-D: oneDNN products with the weight shared across the batch, no layout "
         "reorders",
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
