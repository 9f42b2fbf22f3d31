// Non-local block (Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018):
// z = BN(W_z y) + x, y_i = (1/C(x)) sum_j f(x_i, x_j) g(x_j), for 1-D, 2-D and 3-D inputs.
// Deviations: none in the maths. Odd sizes are floored by the sub-sampling pool (as in the
// official code); the affinity is computed in chunks of query rows (same result, bounded memory).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/models/attention_slot.h"

namespace dynattn {

struct NonLocalOptions {
  /* implicit */ NonLocalOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  // Width of theta, phi and g; unset: floor(channels * inter_ratio) (the paper's C/2).
  TORCH_ARG(std::optional<int64_t>, inter_channels) = std::nullopt;
  TORCH_ARG(double, inter_ratio) = 0.5;
  // Spatial dimensions of the input: 1 [N,C,L], 2 [N,C,H,W], 3 [N,C,T,H,W].
  TORCH_ARG(int64_t, dims) = 2;
  // Pairwise function f: "embedded" (softmax(theta^T phi)), "gaussian" (softmax(x_i^T x_j), no
  // theta/phi convs), "dot" (theta^T phi / N), "concat" (ReLU(w^T [theta_i; phi_j]) / N), where
  // N is the number of key positions. mmcv's names embedded_gaussian, dot_product and
  // concatenation are accepted too.
  TORCH_ARG(std::string, mode) = "embedded";
  // Max-pool phi and g (2 for 1-D, 2x2 for 2-D, 1x2x2 for 3-D): a quarter of the keys in 2-D/3-D.
  TORCH_ARG(bool, subsample) = true;
  // Pool the input before the phi/g convs (official Caffe2 code, the default) or pool their
  // outputs (most PyTorch ports). Without sub-sampling it changes nothing.
  TORCH_ARG(bool, pool_first) = true;
  // Factor on the logits of the softmax modes: "none" (1), "inter" (1/sqrt(inter), the official
  // code), "channels" (1/sqrt(C), timm's NonLocalAttn); "auto": "inter" for embedded, "none"
  // for gaussian. dot and concat accept only "auto" and "none".
  TORCH_ARG(std::string, scale) = "auto";
  // Largest affinity chunk [N, rows, keys] held at once (at least one query row per chunk).
  // Bounds the peak memory of inference; in training autograd keeps every chunk's rows anyway.
  TORCH_ARG(int64_t, max_affinity_elements) = int64_t{1} << 24;
  // Flat (row-major) query positions whose affinity rows forward_with_maps() returns; empty:
  // the centre position (size/2 in every spatial dimension).
  TORCH_ARG(std::vector<int64_t>, map_queries) = {};
};

// Options under which the block computes exactly timm's NonLocalAttn(channels) forward
// (timm/layers/non_local_attn.py): embedded gaussian, inter = make_divisible(C/8, 8), scale
// 1/sqrt(C), no sub-sampling, 2-D. timm's t, p, g, z, norm are our theta, phi, g, z, bn.
NonLocalOptions timm_non_local_options(int64_t channels);

// Parameters: theta, phi (absent in gaussian mode), g, z (1x1 convs with bias), bn (its weight
// starts at 0, so the block starts as the exact identity), concat_project (concat mode only:
// 1x1 Conv2d 2*inter -> 1 without bias, weight [1, 2*inter, 1, 1], theta's half first).
class NonLocalBlockImpl : public torch::nn::Cloneable<NonLocalBlockImpl>, public AttentionWithMaps {
 public:
  explicit NonLocalBlockImpl(NonLocalOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // Maps: "affinity", the normalised rows f(x_i, .)/C(x) [N, queries, keys] of the query
  // positions in options.map_queries() (computed for those rows only, not kept by forward()).
  AttentionOutput forward_with_maps(const torch::Tensor& x) override;
  void pretty_print(std::ostream& stream) const override;

  void set_map_queries(std::vector<int64_t> queries) { options.map_queries(std::move(queries)); }
  int64_t inter_channels() const { return inter_; }
  // The factor applied to the logits before the softmax (1 for dot and concat).
  double logit_scale() const { return logit_scale_; }
  // Whether forward on x applies z's projection to g before the attention product, as
  // (W_z g) P^T instead of W_z (g P^T): the fast paths (float CPU, embedded or gaussian,
  // pooled before the convs) do so when it takes fewer multiply-adds, i.e. when the keys are
  // few against the queries and channels (a sub-sampled 7x7 map of 64 channels: 25% fewer).
  // The same function, rounded differently; MAC counts stay those of the block as defined.
  bool projects_z_on_keys(const torch::Tensor& x) const;

  NonLocalOptions options;
  // ConvNd / BatchNormNd with N = options.dims(); typed access through ptr() or parameters().
  torch::nn::AnyModule theta, phi, g, z, bn;
  torch::nn::Conv2d concat_project{nullptr};

 private:
  enum class Mode { Gaussian, Embedded, Dot, Concat };
  struct Projections;
  Projections project(const torch::Tensor& x);
  torch::Tensor affinity(const Projections& p, const torch::Tensor& theta_columns,
                         const torch::Tensor& concat_columns, bool keys_last) const;
  torch::Tensor run(const torch::Tensor& x, AttentionMaps* maps);
  // Inference (eval, no autograd) on float CPU input: the projections as oneDNN products with
  // BN, g's bias and the residual folded in, and the attention kernel in between.
  struct InferencePlan;
  bool inference_path_applies(const torch::Tensor& x) const;
  torch::Tensor run_inference(const torch::Tensor& x);
  // Training (embedded mode) on float CPU input: one autograd node with a hand-written
  // backward over the same products, the attention kernel and BN + residual.
  bool training_path_applies(const torch::Tensor& x) const;
  torch::Tensor run_training(const torch::Tensor& x);
  // projects_z_on_keys once a fast path applies.
  bool z_on_keys_pays(const torch::Tensor& x) const;

  Mode mode_ = Mode::Embedded;
  int64_t inter_ = 0;
  double logit_scale_ = 1.0;
  std::shared_ptr<InferencePlan> inference_;  // folded weights and primitives; fresh per reset()
};
TORCH_MODULE(NonLocalBlock);

// Slot entry "nl": options mode, inter, ratio, subsample, pool_first, scale, dims, max_affinity.
AttentionInfo non_local_attention_info();

}  // namespace dynattn
