// Bilinear pooling (Lin, RoyChowdhury & Maji, "Bilinear CNN Models for Fine-grained Visual
// Recognition", ICCV 2015): Phi = sum_l a_l b_l^T over locations l, flattened, signed square
// root, L2 normalisation; optional Newton-Schulz matrix square root of Phi (Lin & Maji, BMVC 2017).
// Deviations: Phi is averaged over the H*W locations by default (`average`, as the authors'
// MATLAB code and the PyTorch reference do; the paper writes a sum); the signed square root is
// sign(x)(sqrt(|x| + eps) - sqrt(eps)), continuous with a finite gradient at 0, instead of
// sign(x)sqrt(|x|) (`sqrt_form="reference"` gives the PyTorch reference's sign(x)sqrt(|x| + eps));
// the two streams must have the same H and W (the MATLAB code resizes the larger one).
#pragma once
#include <torch/torch.h>

#include <string>

#include "dynattn/attention/attention_maps.h"
#include "dynattn/attention/matrix_sqrt.h"

namespace dynattn {

// Element-wise signed square root with a finite gradient at 0 (eps > 0):
//   "stable":    sign(x) (sqrt(|x| + eps) - sqrt(eps)) = x / (sqrt(|x| + eps) + sqrt(eps)),
//                continuous, derivative 1 / (2 sqrt(|x| + eps)) everywhere (1/(2 sqrt(eps)) at 0),
//                within sqrt(eps) of sign(x) sqrt(|x|);
//   "reference": sign(x) sqrt(|x| + eps), the B-CNN PyTorch reference (HaoMood/bilinear-cnn) and
//                fast-MPN-COV's BCNN; it jumps by 2 sqrt(eps) at 0 and autograd gives 0 there.
torch::Tensor signed_sqrt(const torch::Tensor& x, double eps = 1e-5,
                          const std::string& form = "stable");

// What every bilinear feature goes through after pooling: optional signed square root, then
// optional L2 normalisation of each row of f [N,D] (F::normalize, eps 1e-12).
struct BilinearNormalization {
  TORCH_ARG(bool, signed_sqrt) = true;
  TORCH_ARG(double, sqrt_eps) = 1e-5;
  TORCH_ARG(std::string, sqrt_form) = "stable";  // "stable" or "reference", see signed_sqrt()
  TORCH_ARG(bool, l2) = true;
};
torch::Tensor normalize_bilinear(const torch::Tensor& f, const BilinearNormalization& options);
// Fails naming `module` when the options are out of range (eps <= 0, unknown sqrt_form).
void check_bilinear_normalization(const char* module, const BilinearNormalization& options);

struct BilinearPoolingOptions {
  explicit BilinearPoolingOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);        // C of the first (or only) stream
  TORCH_ARG(int64_t, channels_b) = 0;  // C of the second stream in forward(a, b); 0: = channels
  // Divide Phi by H*W. With L2 normalisation on, this only changes where eps of the signed
  // square root bites, but it keeps Phi independent of the input resolution.
  TORCH_ARG(bool, average) = true;
  // Newton-Schulz iterations of the matrix square root of Phi (0: off); symmetric form only.
  TORCH_ARG(int64_t, matrix_sqrt) = 0;
  TORCH_ARG(std::string, matrix_sqrt_norm) = "frobenius";  // or "trace" (iSQRT-COV)
  TORCH_ARG(BilinearNormalization, normalization) = BilinearNormalization();
};

// [N,C,H,W] -> [N, C*C] (symmetric, forward(x)) or [N,Ca,H,W], [N,Cb,H,W] -> [N, Ca*Cb]
// (two-stream, forward(a, b)); element (i, j) of Phi is feature i*Cb + j, as torch's view of
// the [N,Ca,Cb] product. No parameters, no buffers.
class BilinearPoolingImpl : public torch::nn::Cloneable<BilinearPoolingImpl> {
 public:
  explicit BilinearPoolingImpl(BilinearPoolingOptions options);
  void reset() override;
  // `b` undefined: the symmetric form (A = B = a).
  torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b = torch::Tensor());
  // Same output as forward, plus the maps "bilinear" (pooled Phi before any normalisation,
  // [N,Ca,Cb]) and, when matrix_sqrt > 0, "matrix_sqrt" (its Newton-Schulz square root).
  AttentionOutput forward_with_maps(const torch::Tensor& a,
                                    const torch::Tensor& b = torch::Tensor());
  int64_t output_dim() const;
  void pretty_print(std::ostream& stream) const override;

  BilinearPoolingOptions options;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})

 private:
  torch::Tensor pool(const torch::Tensor& a, const torch::Tensor& b, AttentionMaps* maps);
};
TORCH_MODULE(BilinearPooling);

}  // namespace dynattn
