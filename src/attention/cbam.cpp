#include "dynattn/attention/cbam.h"

#include "dynattn/attention/channel_reduction.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/fused_gates.h"

namespace dynattn {
namespace {
// The two max poolings, chosen by measurement (LibTorch 1.13, one thread, 64x16x28x28; same
// values in every form). Without autograd, amax is the fastest forward, except over H and W of a
// channels-last tensor with few channels (2.3 ms), where reducing H, then W of the physical
// [N,H,W,C] layout takes 0.16 ms. With autograd, amax's backward builds a tie mask in several
// full passes (3.3 ms forward+backward over H,W; 3.4 ms over C); max with indices, whose
// backward is a scatter, costs 1.1 ms (0.7 ms with adaptive_max_pool2d when channels-last) and
// 2.8 ms. At ties the gradient then goes to one maximum instead of being split evenly.
bool records_grad(const torch::Tensor& x) {
  return torch::GradMode::is_enabled() && x.requires_grad();
}

bool is_channels_last(const torch::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

torch::Tensor spatial_max(const torch::Tensor& x) {  // [N,C,1,1]
  const int64_t n = x.size(0), c = x.size(1);
  if (records_grad(x)) {
    if (is_channels_last(x)) return std::get<0>(torch::adaptive_max_pool2d(x, {1, 1}));
    return std::get<0>(x.reshape({n, c, -1}).max(2)).view({n, c, 1, 1});
  }
  if (is_channels_last(x)) return x.permute({0, 2, 3, 1}).amax(1).amax(1).view({n, c, 1, 1});
  return x.amax({2, 3}, true);
}

torch::Tensor channel_max(const torch::Tensor& x) {  // [N,1,H,W]
  if (records_grad(x)) return std::get<0>(x.max(1, true));
  return x.amax(1, true);
}
}  // namespace

CBAMOptions CBAMOptions::timm(int64_t channels) {
  return CBAMOptions(channels)
      .max_first(false)
      .mlp_bias(false)
      .reduction_policy("divisible")
      .divisor(1)
      .bn_momentum(0.1)
      .zero_init_spatial_bn(false);
}

CBAMChannelGateImpl::CBAMChannelGateImpl(CBAMOptions options_) : options(std::move(options_)) {
  reset();
}

void CBAMChannelGateImpl::reset() {
  const auto& o = options;
  rd_channels = reduced_channels(o.channels(), o.reduction(), o.reduction_policy(), o.divisor(),
                                 o.rd_channels(), "CBAM");
  fc1 = register_module(
      "fc1",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(o.channels(), rd_channels, 1).bias(o.mlp_bias())));
  fc2 = register_module(
      "fc2",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(rd_channels, o.channels(), 1).bias(o.mlp_bias())));
  // The official init zeroes every bias; weights keep the Linear default, which for a 1x1
  // conv is the same distribution (same fan-in).
  torch::NoGradGuard no_grad;
  if (o.mlp_bias()) {
    fc1->bias.zero_();
    fc2->bias.zero_();
  }
}

torch::Tensor CBAMChannelGateImpl::forward(const torch::Tensor& x) {
  check_attention_input("CBAM channel gate", x, options.channels());
  const int64_t n = x.size(0);
  // One MLP pass over both pooled descriptors, stacked along the batch: [2N, C, 1, 1].
  auto pooled = torch::cat({x.mean({2, 3}, true), spatial_max(x)}, 0);
  auto logits = conv1x1_on_pooled(*fc2, conv1x1_on_pooled(*fc1, pooled).relu_());
  return torch::sigmoid(logits.narrow(0, 0, n) + logits.narrow(0, n, n));
}

void CBAMChannelGateImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "dynattn::CBAMChannelGate(channels=" << options.channels()
         << ", rd_channels=" << rd_channels << ", bias=" << options.mlp_bias() << ")";
}

CBAMSpatialGateImpl::CBAMSpatialGateImpl(CBAMOptions options_) : options(std::move(options_)) {
  reset();
}

void CBAMSpatialGateImpl::reset() {
  const auto& o = options;
  const int64_t k = o.kernel_size();
  TORCH_CHECK(k > 0 && k % 2 == 1, "CBAM: spatial kernel size must be odd and positive, got ", k);
  // Without BN nothing else shifts the logits, so the conv gets the bias BN would provide.
  conv = register_module(
      "conv",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 1, k).padding(k / 2).bias(!o.spatial_bn())));
  bn = nullptr;
  if (o.spatial_bn()) {
    TORCH_CHECK(o.bn_momentum() >= 0 && o.bn_momentum() <= 1,
                "CBAM: bn_momentum must be in [0, 1], got ", o.bn_momentum());
    bn = register_module(
        "bn", torch::nn::BatchNorm2d(torch::nn::BatchNormOptions(1).momentum(o.bn_momentum())));
  }
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
  if (conv->bias.defined()) conv->bias.zero_();
  if (bn && o.zero_init_spatial_bn()) bn->weight.zero_();
}

torch::Tensor CBAMSpatialGateImpl::forward(const torch::Tensor& x) {
  check_attention_input("CBAM spatial gate", x, -1);
  auto max_map = channel_max(x);
  auto mean_map = x.mean(1, true);
  auto pooled =
      options.max_first() ? torch::cat({max_map, mean_map}, 1) : torch::cat({mean_map, max_map}, 1);
  // The pooled maps are NCHW whatever the input's layout; a channels-last weight (after
  // to_memory_format) would switch oneDNN to its slower channels-last path for 2 channels.
  const auto weight = conv->weight.contiguous();
  torch::Tensor logits;
  if (torch::GradMode::is_enabled() && (pooled.requires_grad() || weight.requires_grad())) {
    // ATen's backward of this 2 -> 1 channel conv is ~3x slower than same_conv2d's.
    logits = same_conv2d(pooled, weight, conv->bias);
  } else {
    logits = torch::conv2d(pooled, weight, conv->bias, 1, options.kernel_size() / 2);
  }
  if (bn) logits = bn(logits);
  return torch::sigmoid(logits);
}

void CBAMSpatialGateImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "dynattn::CBAMSpatialGate(kernel=" << options.kernel_size()
         << ", order=" << (options.max_first() ? "max,mean" : "mean,max")
         << ", bn=" << options.spatial_bn() << ")";
}

CBAMImpl::CBAMImpl(CBAMOptions options_) : options(std::move(options_)) {
  reset();
}

void CBAMImpl::reset() {
  channel = register_module("channel", CBAMChannelGate(options));
  spatial = register_module("spatial", CBAMSpatialGate(options));
}

torch::Tensor CBAMImpl::run(const torch::Tensor& x, AttentionMaps* maps) {
  check_attention_input("CBAM", x, options.channels());
  auto mc = channel(x);
  auto refined = x * mc;
  auto ms = spatial(refined);
  if (maps != nullptr) {
    (*maps)["channel"] = mc;
    (*maps)["spatial"] = ms;
  }
  return refined * ms;
}

namespace {
// Whether CBAM's fused inference kernel applies: the spatial BN (if any) in eval form, and
// fused_gates_apply() on the input and every parameter.
bool fused_inference_applies(const CBAMImpl& m, const torch::Tensor& x) {
  const auto& c = *m.channel;
  const auto& s = *m.spatial;
  BatchNormEval bn;
  if (s.bn && !eval_form(*s.bn, bn)) return false;
  return fused_gates_apply(
      x, {c.fc1->weight, c.fc1->bias, c.fc2->weight, c.fc2->bias, s.conv->weight, s.conv->bias,
          bn.weight, bn.bias, bn.running_mean, bn.running_var});
}

// Whether its training form applies: the spatial BN (if any) tracks running statistics.
bool fused_training_applies(const CBAMImpl& m, const torch::Tensor& x) {
  const auto& c = *m.channel;
  const auto& s = *m.spatial;
  if (s.bn && !s.bn->options.track_running_stats()) return false;
  const auto bn_w = s.bn ? s.bn->weight : torch::Tensor();
  const auto bn_b = s.bn ? s.bn->bias : torch::Tensor();
  return fused_gates_train_apply(x, {c.fc1->weight, c.fc1->bias, c.fc2->weight, c.fc2->bias,
                                     s.conv->weight, s.conv->bias, bn_w, bn_b});
}
}  // namespace

torch::Tensor CBAMImpl::fused_forward(const torch::Tensor& x) {
  if (!fused_inference_applies(*this, x)) return {};
  const auto& c = *channel;
  const auto& s = *spatial;
  BatchNormEval bn;
  if (s.bn) eval_form(*s.bn, bn);
  return fused_cbam(x, {c.fc1->weight, c.fc1->bias, c.fc2->weight, c.fc2->bias},
                    {s.conv->weight, s.conv->bias, s.bn ? &bn : nullptr, options.max_first()});
}

const KernelOp<CBAMImpl::KernelCall>& CBAMImpl::kernels() {
  using Call = KernelCall;
  static const KernelOp<Call> op(
      "cbam",
      {{"fused", [](const Call& c) { return fused_inference_applies(*c.self, c.x); },
        [](const Call& c) { return c.self->fused_forward(c.x); }},
       // Training: one autograd node with a three-pass backward instead of ATen's operator chain.
       {"fused_train", [](const Call& c) { return fused_training_applies(*c.self, c.x); },
        [](const Call& c) {
          const auto& ch = *c.self->channel;
          auto& s = *c.self->spatial;
          return fused_cbam_train(c.x, {ch.fc1->weight, ch.fc1->bias, ch.fc2->weight, ch.fc2->bias},
                                  s.conv->weight, s.conv->bias, s.bn ? s.bn.get() : nullptr,
                                  c.self->options.max_first());
        }},
       {"aten", always_applies<Call>, [](const Call& c) { return c.self->run(c.x, nullptr); }}});
  return op;
}

torch::Tensor CBAMImpl::forward(const torch::Tensor& x) {
  check_attention_input("CBAM", x, options.channels());
  return kernels()({this, x});
}

std::string CBAMImpl::kernel_for(const torch::Tensor& x) {
  return kernels().chosen({this, x});
}

torch::Tensor CBAMImpl::forward_with(const std::string& kernel, const torch::Tensor& x) {
  check_attention_input("CBAM", x, options.channels());
  return kernels().run(kernel, {this, x});
}

AttentionOutput CBAMImpl::forward_with_maps(const torch::Tensor& x) {
  AttentionOutput out;
  out.output = run(x, &out.maps);
  return out;
}

void CBAMImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "dynattn::CBAM(channels=" << options.channels()
         << ", rd_channels=" << channel->rd_channels << ", kernel=" << options.kernel_size()
         << ", max_first=" << options.max_first() << ", mlp_bias=" << options.mlp_bias()
         << ", spatial_bn=" << options.spatial_bn() << ")";
}

AttentionInfo cbam_attention_info() {
  return {"cbam",
          "CBAM (Woo et al., ECCV 2018); r, rd, policy, divisor, max_first, mlp_bias, spatial_bn, "
          "kernel",
          [](int64_t channels, const OptionMap& o) {
            o.check_known(
                {"r", "rd", "policy", "divisor", "max_first", "mlp_bias", "spatial_bn", "kernel"});
            return torch::nn::AnyModule(CBAM(CBAMOptions(channels)
                                                 .reduction(o.get_double("r", 16))
                                                 .rd_channels(o.get_int("rd", 0))
                                                 .reduction_policy(o.get_string("policy", "floor"))
                                                 .divisor(o.get_int("divisor", 1))
                                                 .max_first(o.get_bool("max_first", true))
                                                 .mlp_bias(o.get_bool("mlp_bias", true))
                                                 .spatial_bn(o.get_bool("spatial_bn", true))
                                                 .kernel_size(o.get_int("kernel", 7))));
          }};
}

}  // namespace dynattn
