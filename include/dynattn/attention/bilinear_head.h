// Bilinear classification head: bilinear pooling (full, Lin et al. ICCV 2015; or compact,
// Gao et al. CVPR 2016) + signed square root + L2 + a linear classifier `fc`, so that a
// backbone can swap its global-average-pool + fc head for it. Deviations from the papers: those
// of bilinear_pooling.h and compact_bilinear_pooling.h (average pooling, eps-stable signed
// square root, d = 2048 by default); optional dropout before fc (the papers have none).
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/attention/bilinear_pooling.h"
#include "dynattn/attention/compact_bilinear_pooling.h"

namespace dynattn {

struct BilinearHeadOptions {
  BilinearHeadOptions(int64_t channels, int64_t num_classes)
      : channels_(channels), num_classes_(num_classes) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, num_classes);
  TORCH_ARG(std::string, kind) = "full";  // "full", "tensor_sketch" or "random_maclaurin"
  TORCH_ARG(int64_t, dim) = 2048;         // d of the compact kinds (full: C*C, ignored)
  TORCH_ARG(int64_t, seed) = 0;           // compact kinds: seed of the fixed projections
  TORCH_ARG(std::string, sketch_algorithm) = "auto";  // tensor_sketch: "auto", "gram" or "fft"
  TORCH_ARG(bool, average) = true;      // pool by the mean over H*W rather than the sum
  TORCH_ARG(int64_t, matrix_sqrt) = 0;  // full only: Newton-Schulz iterations, 0 = off
  TORCH_ARG(std::string, matrix_sqrt_norm) = "frobenius";
  TORCH_ARG(BilinearNormalization, normalization) = BilinearNormalization();
  TORCH_ARG(double, dropout) = 0.0;  // on the pooled feature, before fc
};

// [N,C,H,W] -> logits [N, num_classes]. Submodules: `pool` (BilinearPooling,
// TensorSketchPooling or RandomMaclaurinPooling; the compact ones hold the buffers pool.h1,
// pool.s1, pool.h2, pool.s2 or pool.w1, pool.w2), `fc` (Linear(feature_dim, num_classes), the
// name of the B-CNN reference's classifier), `dropout` when dropout > 0.
class BilinearHeadImpl : public torch::nn::Cloneable<BilinearHeadImpl> {
 public:
  explicit BilinearHeadImpl(BilinearHeadOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // The normalised pooled feature that fc sees (before dropout), [N, feature_dim()].
  torch::Tensor features(const torch::Tensor& x);
  // Logits, plus the map "features" (as features(x)) and the pooling module's maps under
  // "pool.<name>" ("pool.bilinear", "pool.matrix_sqrt", "pool.sketch").
  AttentionOutput forward_with_maps(const torch::Tensor& x);
  int64_t feature_dim() const;
  void pretty_print(std::ostream& stream) const override;

  BilinearHeadOptions options;
  // Exactly one of the three is set, according to options.kind().
  BilinearPooling full{nullptr};
  TensorSketchPooling tensor_sketch{nullptr};
  RandomMaclaurinPooling random_maclaurin{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear fc{nullptr};

 private:
  AttentionOutput pool_with_maps(const torch::Tensor& x);
};
TORCH_MODULE(BilinearHead);

// Parses a head spec "kind:key=value,...", e.g. "full", "full:matrix_sqrt=5",
// "tensor_sketch:d=4096,seed=1", "random_maclaurin:d=2048". Keys of every kind: average,
// signed_sqrt, sqrt_eps, sqrt_form, l2, dropout; full: matrix_sqrt, matrix_sqrt_norm; compact
// kinds: d, seed; tensor_sketch: algorithm (sketch_algorithm). Unknown kinds and keys fail with
// an error that lists the known ones.
BilinearHeadOptions parse_bilinear_head(const std::string& spec, int64_t channels,
                                        int64_t num_classes);
BilinearHead create_bilinear_head(const std::string& spec, int64_t channels, int64_t num_classes);

}  // namespace dynattn
