#include "dynattn/reparam/fold_batch_norm.h"

namespace dynattn {

FoldedConv fold_batch_norm(const torch::Tensor& weight, const torch::Tensor& bias,
                           const torch::Tensor& running_mean, const torch::Tensor& running_var,
                           const torch::Tensor& bn_weight, const torch::Tensor& bn_bias, double eps,
                           const std::string& where) {
  TORCH_CHECK(weight.defined() && weight.dim() >= 3, where,
              ": expected a convolution weight [Cout, Cin/groups, k...], got ",
              weight.defined() ? c10::str(weight.sizes()) : "nothing");
  TORCH_CHECK(running_mean.defined() && running_var.defined(), where,
              ": the BatchNorm has no running statistics (track_running_stats=false), so it is "
              "not a fixed affine map and cannot be folded");
  const int64_t cout = weight.size(0);
  TORCH_CHECK(running_mean.numel() == cout && running_var.numel() == cout, where,
              ": the convolution has ", cout, " output channels but the BatchNorm ",
              running_mean.numel());
  TORCH_CHECK(eps >= 0, where, ": BatchNorm eps must be >= 0, got ", eps);
  torch::NoGradGuard no_grad;
  const auto d = torch::TensorOptions().dtype(torch::kDouble).device(weight.device());
  auto scale = (running_var.to(d) + eps).rsqrt();
  if (bn_weight.defined()) scale = scale * bn_weight.to(d);
  auto shift = -running_mean.to(d) * scale;
  if (bn_bias.defined()) shift = shift + bn_bias.to(d);
  if (bias.defined()) shift = shift + bias.to(d) * scale;
  std::vector<int64_t> shape(static_cast<size_t>(weight.dim()), 1);
  shape[0] = cout;
  FoldedConv out;
  out.weight = (weight.to(d) * scale.view(shape))
                   .to(weight.scalar_type())
                   .contiguous(weight.suggest_memory_format());
  out.bias = shift.to(weight.scalar_type());
  return out;
}

torch::nn::Conv2d fold_conv_bn(const torch::nn::Conv2dImpl& conv,
                               const torch::nn::BatchNorm2dImpl& bn, const std::string& where) {
  TORCH_CHECK(!bn.is_training(), where,
              ": the BatchNorm is in training mode; call eval() before folding (in training it "
              "normalises with batch statistics, not a fixed affine map)");
  TORCH_CHECK(!conv.options.transposed(), where, ": transposed convolutions are not folded");
  TORCH_CHECK(bn.options.track_running_stats(), where,
              ": the BatchNorm has no running statistics (track_running_stats=false), so it is "
              "not a fixed affine map and cannot be folded");
  const auto folded =
      fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                      bn.options.affine() ? bn.weight : torch::Tensor(),
                      bn.options.affine() ? bn.bias : torch::Tensor(), bn.options.eps(), where);
  const auto& o = conv.options;  // a ConvNdOptions<2>, rebuilt as Conv2dOptions with a bias
  torch::nn::Conv2d fused(
      torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), o.kernel_size())
          .stride(o.stride())
          .padding(o.padding())
          .dilation(o.dilation())
          .groups(o.groups())
          .padding_mode(o.padding_mode())
          .bias(true));
  torch::NoGradGuard no_grad;
  fused->to(conv.weight.device(), conv.weight.scalar_type());
  fused->weight.set_data(folded.weight);
  fused->bias.set_data(folded.bias);
  fused->eval();
  return fused;
}

}  // namespace dynattn
