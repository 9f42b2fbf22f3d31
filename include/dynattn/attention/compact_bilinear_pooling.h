// Compact bilinear pooling (Gao, Beijbom, Zhang & Darrell, "Compact Bilinear Pooling", CVPR
// 2016): Tensor Sketch and Random Maclaurin projections whose inner products approximate those
// of the full bilinear feature, <CBP(X), CBP(Y)> ~ <Phi_X, Phi_Y>_F, in d << C^2 dimensions.
// Deviations: the projections come from a portable seeded generator (std::mt19937_64, our own
// integer mapping), so the same seed gives the same sketch under every LibTorch version;
// pooling averages over H*W by default (the paper sums); default d = 2048 for C = 64 (the paper's
// 8192 is for C = 512 and would exceed the full C^2 = 4096 here); Tensor Sketch is computed by
// default from the pooled Gram matrix (the same sketch, exactly; `sketch_algorithm="fft"` runs
// the paper's per-location FFTs); the signed square root is the eps-stable form of
// bilinear_pooling.h.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/attention/bilinear_pooling.h"

namespace dynattn {

// The fixed random draws of both sketches, generated from `seed` by std::mt19937_64(seed)
// (whose output sequence the C++ standard fixes). Tensor Sketch: one 64-bit draw r per value,
// in the order h1[0..Ca), s1[0..Ca), h2[0..Cb), s2[0..Cb), with h = r mod dim (bias below
// dim / 2^64) and s = +1 if the top bit of r is set, else -1. Random Maclaurin: one bit per
// entry, +1 for a set bit, taken from consecutive draws most significant bit first, over w1 then
// w2 in row-major order.
struct SketchDraws {
  std::vector<int64_t> h1, h2;
  std::vector<float> s1, s2;
};
SketchDraws draw_count_sketches(int64_t channels_a, int64_t channels_b, int64_t dim, uint64_t seed);
// w1 [dim, Ca] and w2 [dim, Cb] with entries +-1, row-major.
std::pair<std::vector<float>, std::vector<float>> draw_rademacher(int64_t channels_a,
                                                                  int64_t channels_b, int64_t dim,
                                                                  uint64_t seed);

struct CompactBilinearOptions {
  CompactBilinearOptions(int64_t channels, int64_t dim) : channels_(channels), dim_(dim) {}
  TORCH_ARG(int64_t, channels);        // C of the first (or only) stream
  TORCH_ARG(int64_t, dim);             // d, the output dimension
  TORCH_ARG(int64_t, channels_b) = 0;  // C of the second stream in forward(a, b); 0: = channels
  TORCH_ARG(int64_t, seed) = 0;        // must be >= 0
  TORCH_ARG(bool, average) = true;     // divide the pooled sum by H*W
  TORCH_ARG(BilinearNormalization, normalization) = BilinearNormalization();
  // Tensor Sketch only (Random Maclaurin accepts only "auto"): how the same sketch is computed.
  // "fft": the paper's per-location count sketches and FFTs; "gram": the count sketch of the
  // pooled Gram matrix (see TensorSketchPoolingImpl); "auto": "gram" when Ca*Cb <=
  // 4 d ceil(log2 d) (the FFT form's cost per location, up to a constant), else "fft".
  TORCH_ARG(std::string, sketch_algorithm) = "auto";
};

// Tensor Sketch: per location, two count sketches psi_k(x)_j = sum_{i: h_k(i) = j} s_k(i) x_i
// and their circular convolution TS(x) = irfft(rfft(psi_1(a_l)) * rfft(psi_2(b_l)), n=d), so
// E[<TS(x), TS(y)>] = <x, y>^2; summed (averaged) over locations.
// - "fft" sums the products over locations in the frequency domain and transforms back once per
//   sample (irfft is linear).
// - "gram" uses TS(a, b) = count sketch of a b^T with hash (h1(i) + h2(j)) mod d and sign
//   s1(i) s2(j) (Pham & Pagh, KDD 2013), so the pooled sketch is the count sketch of the pooled
//   Phi = sum_l a_l b_l^T: one bmm and one scatter. The same numbers up to rounding; at C = 64,
//   d = 2048 about 60 times faster than "fft".
// Buffers (saved with the weights): h1 [Ca] and h2 [Cb] (int64 bin indices in [0,d); read as
// int64 even after a dtype cast of the module), s1 [Ca] and s2 [Cb] (+-1) -- the names of the
// Caffe/TensorFlow reference's rand_h_1/rand_s_1/..., and of sketch1.h/sketch1.s/... in
// gdlg/pytorch_compact_bilinear_pooling.
// MACs: "gram" counts its bmm, N*Ca*Cb*H*W; "fft" runs no matrix product and counts 0.
class TensorSketchPoolingImpl : public torch::nn::Cloneable<TensorSketchPoolingImpl> {
 public:
  explicit TensorSketchPoolingImpl(CompactBilinearOptions options);
  void reset() override;
  // [N,Ca,H,W] (and [N,Cb,H,W]; undefined b: b = a) -> [N, d]
  torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b = torch::Tensor());
  // Same output, plus the map "sketch": the pooled sketch before normalisation, [N, d].
  AttentionOutput forward_with_maps(const torch::Tensor& a,
                                    const torch::Tensor& b = torch::Tensor());
  int64_t output_dim() const { return options.dim(); }
  // "gram" or "fft": what sketch_algorithm resolves to for these options.
  std::string algorithm() const;
  void pretty_print(std::ostream& stream) const override;

  CompactBilinearOptions options;
  torch::Tensor h1, s1, h2, s2;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})

 private:
  torch::Tensor pool(const torch::Tensor& a, const torch::Tensor& b);
  torch::Tensor pool_fft(const torch::Tensor& fa, const torch::Tensor& fb);
  torch::Tensor pool_gram(const torch::Tensor& fa, const torch::Tensor& fb);
};
TORCH_MODULE(TensorSketchPooling);

// Random Maclaurin: per location RM(a, b) = (W1 a) * (W2 b) / sqrt(d) with fixed Rademacher
// matrices W1 [d,Ca], W2 [d,Cb], so E[<RM(x), RM(y)>] = <x, y>^2; summed (averaged) over
// locations. Buffers (saved with the weights): w1 [d,Ca], w2 [d,Cb].
// MACs: one matrix product, N*H*W * (Ca + Cb) * d.
class RandomMaclaurinPoolingImpl : public torch::nn::Cloneable<RandomMaclaurinPoolingImpl> {
 public:
  explicit RandomMaclaurinPoolingImpl(CompactBilinearOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b = torch::Tensor());
  // Same output, plus the map "sketch": the pooled projection before normalisation, [N, d].
  AttentionOutput forward_with_maps(const torch::Tensor& a,
                                    const torch::Tensor& b = torch::Tensor());
  int64_t output_dim() const { return options.dim(); }
  void pretty_print(std::ostream& stream) const override;

  CompactBilinearOptions options;
  torch::Tensor w1, w2;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})

 private:
  torch::Tensor pool(const torch::Tensor& a, const torch::Tensor& b);
};
TORCH_MODULE(RandomMaclaurinPooling);

}  // namespace dynattn
