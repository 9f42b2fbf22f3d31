// Fused channel and spatial gates: CPU inference kernels for the gates of SE, ECA, CBAM and BAM
// (attention/*.h), each one function that pools, runs the gate's small MLP or convolution and
// multiplies, with plain loops over the float data and one output allocation.
// Why: a module's ATen form is a chain of small operators (pooling, reshapes, two matrix
// products, activations, broadcast products), each dispatched and allocating its output; at
// batch 1 that per-operator cost, not arithmetic, sets the module's time (issue 3's overhead
// rule). bench/bench_attention_channel.cpp times both forms: `<kind>` and `<kind>_aten`.
// The modules' forward() takes these kernels when fused_gates_apply() holds and keeps the ATen
// path otherwise (training, autograd, other dtypes and devices): same maths, same parameters.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <initializer_list>

namespace dynattn {

// Whether the fused kernels may replace a module's ATen forward on `x`: autograd is not
// recording (GradMode off, as under InferenceMode or NoGradGuard), the process-wide switch of
// ops/dispatch.h (dynattn_kernels_enabled()) is on, `x` is a CPU float32 4-D strided
// tensor with elements, contiguous NCHW or channels-last, and every defined tensor of `params`
// (the module's weights and statistics) is a CPU float32 tensor. Anything else keeps the ATen
// path, with its errors.
bool fused_gates_apply(const torch::Tensor& x, std::initializer_list<torch::Tensor> params = {});

// Number of calls that ran a fused kernel in this process: tests use it to tell which path ran.
int64_t fused_gates_calls();

// Where the CPU has AVX-512, several of the kernels (inference and training) run as forms on
// 16-float vectors; elsewhere their AVX2 or baseline forms run. KernelPolicy::wide_vectors
// (ops/dispatch.h) off, the AVX2/baseline forms run on every CPU: tests hold both forms to the
// ATen path on one machine.

enum class GateFunction { Sigmoid, HardSigmoid };  // hard: relu6(v + 3) / 6

// BatchNorm in eval form: y = (v - running_mean) / sqrt(running_var + eps) * weight + bias;
// weight and bias may be undefined (affine = false). Never updates the statistics.
struct BatchNormEval {
  torch::Tensor weight, bias, running_mean, running_var;
  double eps = 1e-5;
};

// The eval form of a torch BatchNorm{1,2}d module into `out`; false when the module normalises
// with batch statistics (training mode, or track_running_stats off).
template <class BatchNormImpl>
bool eval_form(const BatchNormImpl& bn, BatchNormEval& out) {
  if (bn.is_training() || !bn.options.track_running_stats()) return false;
  out = {bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.options.eps()};
  return true;
}

// The channel MLP of the gates: fc2(relu(bn(fc1(v)))), fc1 weight [rd,C] or [rd,C,1,1], fc2
// weight [C,rd] or [C,rd,1,1], biases [rd] / [C] or undefined; bn (BAM's BatchNorm1d) optional.
struct ChannelMlp {
  torch::Tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias;
  const BatchNormEval* bn = nullptr;
};

// SE: y = x * gate(mlp(mean_HW x)).
torch::Tensor fused_squeeze_excitation(const torch::Tensor& x, const ChannelMlp& mlp,
                                       GateFunction gate);

// ECA: y = x * sigmoid(conv1d_k(mean_HW x)) over the channel axis, zero padding (k-1)/2;
// weight [1,1,k], bias [1] or undefined.
torch::Tensor fused_efficient_channel_attention(const torch::Tensor& x, const torch::Tensor& weight,
                                                const torch::Tensor& bias);

// CBAM's spatial convolution: weight [1,2,k,k] (odd k, padding k/2), bias [1] or undefined, and
// the BN after it (null: none).
struct CbamSpatialWeights {
  torch::Tensor weight, bias;
  const BatchNormEval* bn = nullptr;
  bool max_first = true;  // conv input [max; mean] or [mean; max]
};

// CBAM: M_c = sigmoid(mlp(avg_HW x) + mlp(max_HW x)), M_s = sigmoid(bn(conv([max_c; mean_c] of
// x * M_c))), y = x * M_c * M_s. Passes over x: avg and max pooling together, the per-pixel
// channel mean and max of x * M_c (never stored), the product.
torch::Tensor fused_cbam(const torch::Tensor& x, const ChannelMlp& mlp,
                         const CbamSpatialWeights& spatial);

// BAM's spatial branch: 1x1 reduce C->rd, BN, ReLU, twice (3x3 conv dilation d, padding d, BN,
// ReLU), 1x1 rd->1; every conv with a bias.
struct BamSpatialWeights {
  torch::Tensor reduce_weight, reduce_bias;
  const BatchNormEval* reduce_bn = nullptr;
  torch::Tensor dilated_weight[2], dilated_bias[2];
  const BatchNormEval* dilated_bn[2] = {nullptr, nullptr};
  torch::Tensor final_weight, final_bias;
  int64_t dilation = 4;
};

// Whether fused_bam() should compute BAM's spatial branch itself, for a batch of `batch` and
// reduced width rd: below the batch where the lane kernels of ops/bam_spatial_branch.h pay off,
// its per-image loops beat ATen's convolutions for narrow branches (rd <= 4) and, up to rd = 16,
// for one or two images (bench/bench_attention_channel.cpp, BM_BamSpatialBranch). Otherwise the
// module runs the branch as its spatial gate does (lane kernels or ATen) and passes its output as
// spatial_logits.
bool bam_spatial_in_kernel(int64_t batch, int64_t rd);

// BAM: y = x + x * sigmoid(M_c + M_s) (M_c * M_s with `product`), M_c = mlp(mean_HW x) per
// channel, M_s per pixel: from `spatial` when given, else `spatial_logits` [N,1,H,W] (float,
// contiguous). The sum form computes sigmoid(a + b) as 1 / (1 + e^-a e^-b): no exponential per
// element.
torch::Tensor fused_bam(const torch::Tensor& x, const ChannelMlp& mlp,
                        const BamSpatialWeights* spatial, const torch::Tensor& spatial_logits,
                        bool product);

}  // namespace dynattn

namespace dynattn {

// ---- Training forms: SE and ECA as one autograd node each ----
// Under autograd the ATen form of SE is some ten operators forward and more backward, and its
// backward materialises dy * x and a broadcast mean gradient before adding them: per-operator
// cost at batch 1 and extra memory passes at batch 64. These functions compute the same maths
// with the fused forward and a hand-written backward of two passes over the map (one reading dy
// and x for the gate gradient, one writing dx = dy * s + d_mean / HW) plus the tiny MLP or 1-D
// conv backward in plain loops. Gradients reach x and every weight; the backward itself is not
// differentiable (no double backward: use --kernels aten for that).

// Whether the training forms may run on `x`: the conditions of fused_gates_apply() except that
// autograd may be recording.
bool fused_gates_train_apply(const torch::Tensor& x,
                             std::initializer_list<torch::Tensor> params = {});

// SE: y = x * gate(fc2(relu(fc1(mean_HW x)))), fc1 weight [rd,C(,1,1)] + bias [rd], fc2 weight
// [C,rd(,1,1)] + bias [C]; biases may be undefined.
torch::Tensor fused_squeeze_excitation_train(const torch::Tensor& x,
                                             const torch::Tensor& fc1_weight,
                                             const torch::Tensor& fc1_bias,
                                             const torch::Tensor& fc2_weight,
                                             const torch::Tensor& fc2_bias, GateFunction gate);

// ECA: y = x * sigmoid(conv1d_k(mean_HW x)), weight [1,1,k], bias [1] or undefined.
torch::Tensor fused_efficient_channel_attention_train(const torch::Tensor& x,
                                                      const torch::Tensor& weight,
                                                      const torch::Tensor& bias);

}  // namespace dynattn

namespace dynattn {

// CBAM's training form: channel gate, spatial gate and product as one autograd node with a
// three-pass backward (d M_s; d M_c; dx); the spatial conv and BN run as ATen operators on the
// small pooled maps, the BN with batch statistics when `bn` is in training mode (running
// statistics and num_batches_tracked updated as BatchNorm2d does). bn: the module's spatial BN
// or null. x contiguous NCHW or channels-last; the output and dx keep its layout.
torch::Tensor fused_cbam_train(const torch::Tensor& x, const ChannelMlp& mlp,
                               const torch::Tensor& conv_weight, const torch::Tensor& conv_bias,
                               torch::nn::BatchNorm2dImpl* bn, bool max_first);

}  // namespace dynattn

namespace dynattn {

// BAM's combine in training: y = x + x * sigmoid(M_c + M_s) (M_c * M_s with `product`) as one
// autograd node, mc [N,C,1,1] and ms [N,1,H,W] the gate logits from the module's ATen branches;
// one pass over the map forward and one backward (dx, d M_c, d M_s), the gate recomputed.
torch::Tensor fused_bam_combine_train(const torch::Tensor& x, const torch::Tensor& mc,
                                      const torch::Tensor& ms, bool product);

// x.mean({2, 3}) for a 4-D x, [N,C]; its backward hands autograd the broadcast gradient as a
// stride-0 view instead of materialising it ([N,C,H,W] written, then read again when autograd
// sums it with x's other gradients): one pass over the map saved where x has other consumers.
torch::Tensor mean_over_pixels(const torch::Tensor& x);

}  // namespace dynattn
