#include "dynattn/attention/bam.h"

#include "dynattn/attention/channel_reduction.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/bam_spatial_branch.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/fused_gates.h"

namespace dynattn {
namespace {
int64_t bam_reduced_channels(const BAMOptions& o) {
  return reduced_channels(o.channels(), o.reduction(), o.reduction_policy(), o.divisor(),
                          o.rd_channels(), "BAM");
}

torch::nn::ReLU inplace_relu() {
  // In place is safe: the BN before it saves its input, not its output.
  return torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true));
}

// The official ResNet init: convs Kaiming-normal (fan_out), BN weights 1, every bias 0; Linear
// weights keep PyTorch's default.
void init_like_official(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& sub : m.modules(/*include_self=*/false)) {
    if (auto* conv = sub->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
      conv->bias.zero_();
    } else if (auto* linear = sub->as<torch::nn::Linear>()) {
      linear->bias.zero_();
    } else if (auto* bn1d = sub->as<torch::nn::BatchNorm1d>()) {
      bn1d->weight.fill_(1.0);
      bn1d->bias.zero_();
    } else if (auto* bn2d = sub->as<torch::nn::BatchNorm2d>()) {
      bn2d->weight.fill_(1.0);
      bn2d->bias.zero_();
    }
  }
}
// A gate rebuilt from its options (named layers) with this one's parameters, buffers and mode.
template <class Gate>
std::shared_ptr<torch::nn::Module> clone_gate(const Gate& self,
                                              const torch::optional<torch::Device>& device) {
  torch::NoGradGuard no_grad;
  auto copy = std::make_shared<Gate>(self.options);
  auto params = copy->named_parameters();
  for (const auto& p : self.named_parameters()) {
    params[p.key()].set_data(device ? p.value().to(*device) : p.value().clone());
    params[p.key()].set_requires_grad(p.value().requires_grad());
  }
  auto buffers = copy->named_buffers();
  for (const auto& b : self.named_buffers())
    buffers[b.key()].set_data(device ? b.value().to(*device) : b.value().clone());
  copy->train(self.is_training());
  return copy;
}
}  // namespace

std::shared_ptr<torch::nn::Module> BAMChannelGateImpl::clone(
    const torch::optional<torch::Device>& device) const {
  return clone_gate(*this, device);
}

std::shared_ptr<torch::nn::Module> BAMSpatialGateImpl::clone(
    const torch::optional<torch::Device>& device) const {
  return clone_gate(*this, device);
}

BAMChannelGateImpl::BAMChannelGateImpl(BAMOptions options_) : options(std::move(options_)) {
  reset();
}

void BAMChannelGateImpl::reset() {
  const int64_t c = options.channels();
  rd_channels = bam_reduced_channels(options);
  torch::nn::Sequential seq;
  seq->push_back("gate_c_fc_0", torch::nn::Linear(c, rd_channels));
  seq->push_back("gate_c_bn_1", torch::nn::BatchNorm1d(rd_channels));
  seq->push_back("gate_c_relu_1", inplace_relu());
  seq->push_back("gate_c_fc_final", torch::nn::Linear(rd_channels, c));
  gate_c = register_module("gate_c", seq);
  init_like_official(*this);
}

torch::Tensor BAMChannelGateImpl::forward(const torch::Tensor& x) {
  check_attention_input("BAM channel gate", x, options.channels());
  TORCH_CHECK(!is_training() || x.size(0) > 1,
              "BAM: the channel gate's BatchNorm1d needs a batch of at least 2 in training mode, "
              "got ",
              x.sizes(), " (use eval() for single images)");
  const int64_t n = x.size(0);
  return gate_c->forward(mean_over_pixels(x)).view({n, options.channels(), 1, 1});
}

void BAMChannelGateImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BAMChannelGate(channels=" << options.channels()
         << ", rd_channels=" << rd_channels << ")";
}

BAMSpatialGateImpl::BAMSpatialGateImpl(BAMOptions options_) : options(std::move(options_)) {
  reset();
}

void BAMSpatialGateImpl::reset() {
  const int64_t c = options.channels(), d = options.dilation();
  TORCH_CHECK(d > 0, "BAM: dilation must be positive, got ", d);
  rd_channels = bam_reduced_channels(options);
  const int64_t rd = rd_channels;
  torch::nn::Sequential seq;
  seq->push_back("gate_s_conv_reduce0", torch::nn::Conv2d(torch::nn::Conv2dOptions(c, rd, 1)));
  seq->push_back("gate_s_bn_reduce0", torch::nn::BatchNorm2d(rd));
  seq->push_back("gate_s_relu_reduce0", inplace_relu());
  for (int i = 0; i < 2; ++i) {
    const std::string k = std::to_string(i);
    seq->push_back("gate_s_conv_di_" + k,
                   torch::nn::Conv2d(torch::nn::Conv2dOptions(rd, rd, 3).padding(d).dilation(d)));
    seq->push_back("gate_s_bn_di_" + k, torch::nn::BatchNorm2d(rd));
    seq->push_back("gate_s_relu_di_" + k, inplace_relu());
  }
  seq->push_back("gate_s_conv_final", torch::nn::Conv2d(torch::nn::Conv2dOptions(rd, 1, 1)));
  gate_s = register_module("gate_s", seq);
  init_like_official(*this);
}

BamSpatialLayers BAMSpatialGateImpl::layers() const {
  BamSpatialLayers l;
  l.reduce = gate_s->ptr(0)->as<torch::nn::Conv2d>();
  l.reduce_bn = gate_s->ptr(1)->as<torch::nn::BatchNorm2d>();
  for (int i = 0; i < 2; ++i) {
    l.dilated[i] = gate_s->ptr(3 + 3 * i)->as<torch::nn::Conv2d>();
    l.dilated_bn[i] = gate_s->ptr(4 + 3 * i)->as<torch::nn::BatchNorm2d>();
  }
  l.final_conv = gate_s->ptr(9)->as<torch::nn::Conv2d>();
  return l;
}

const KernelOp<BAMSpatialGateImpl::KernelCall>& BAMSpatialGateImpl::kernels() {
  using Call = KernelCall;
  // Float CPU input and the layers as reset() builds them: the lane kernels of
  // ops/bam_spatial_branch.h, forward and backward (LibTorch 1.13's backward of such narrow
  // convolutions is most of a BAM training step), and in inference from the batch where they
  // pay off.
  static const KernelOp<Call> op(
      "bam_spatial_gate",
      {{"lanes",
        [](const Call& c) {
          return bam_spatial_branch_applicable(c.x, c.self->layers()) &&
                 (torch::GradMode::is_enabled() ||
                  bam_spatial_branch_pays_off(c.x.size(0), c.self->rd_channels));
        },
        [](const Call& c) { return bam_spatial_branch(c.x, c.self->layers()); }},
       {"aten", always_applies<Call>, [](const Call& c) { return c.self->gate_s->forward(c.x); }}});
  return op;
}

torch::Tensor BAMSpatialGateImpl::forward(const torch::Tensor& x) {
  check_attention_input("BAM spatial gate", x, options.channels());
  return kernels()({this, x});
}

std::string BAMSpatialGateImpl::kernel_for(const torch::Tensor& x) {
  return kernels().chosen({this, x});
}

torch::Tensor BAMSpatialGateImpl::forward_with(const std::string& kernel, const torch::Tensor& x) {
  check_attention_input("BAM spatial gate", x, options.channels());
  return kernels().run(kernel, {this, x});
}

void BAMSpatialGateImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BAMSpatialGate(channels=" << options.channels()
         << ", rd_channels=" << rd_channels << ", dilation=" << options.dilation() << ")";
}

BAMImpl::BAMImpl(BAMOptions options_) : options(std::move(options_)) {
  reset();
}

void BAMImpl::reset() {
  channel_att = register_module("channel_att", BAMChannelGate(options));
  spatial_att = register_module("spatial_att", BAMSpatialGate(options));
}

torch::Tensor BAMImpl::run(const torch::Tensor& x, AttentionMaps* maps) {
  check_attention_input("BAM", x, options.channels());
  auto mc = channel_att(x);
  auto ms = spatial_att(x);
  if (maps != nullptr) {
    (*maps)["channel"] = mc;
    (*maps)["spatial"] = ms;
    (*maps)["attention"] = (options.product() ? mc * ms : mc + ms).sigmoid_() + 1.0;
  }
  return combine(x, mc, ms);
}

torch::Tensor BAMImpl::combine(const torch::Tensor& x, const torch::Tensor& mc,
                               const torch::Tensor& ms) const {
  // The broadcast sum (product) is a fresh [N,C,H,W] tensor that nothing saves: the sigmoid
  // can reuse it, and x + x * s is one kernel without materialising 1 + s.
  auto s = (options.product() ? mc * ms : mc + ms).sigmoid_();
  return torch::addcmul(x, x, s);
}

namespace {
// BAM's layers as the fused inference kernel takes them, every BN in eval form (`eval`: all four
// normalise with running statistics: [channel, reduce, dilated 0, 1]).
struct FusedBamLayers {
  const torch::nn::LinearImpl* fc0 = nullptr;
  const torch::nn::LinearImpl* fc_final = nullptr;
  const torch::nn::Conv2dImpl* reduce = nullptr;
  const torch::nn::Conv2dImpl* dilated[2] = {nullptr, nullptr};
  const torch::nn::Conv2dImpl* final_conv = nullptr;
  BatchNormEval bn[4];
  bool eval = true;
};

FusedBamLayers fused_layers(const BAMImpl& m) {
  const auto& gc = *m.channel_att->gate_c;
  const auto& gs = *m.spatial_att->gate_s;
  FusedBamLayers l;
  l.fc0 = gc.ptr(0)->as<torch::nn::Linear>();
  l.fc_final = gc.ptr(3)->as<torch::nn::Linear>();
  l.reduce = gs.ptr(0)->as<torch::nn::Conv2d>();
  l.dilated[0] = gs.ptr(3)->as<torch::nn::Conv2d>();
  l.dilated[1] = gs.ptr(6)->as<torch::nn::Conv2d>();
  l.final_conv = gs.ptr(9)->as<torch::nn::Conv2d>();
  l.eval = eval_form(*gc.ptr(1)->as<torch::nn::BatchNorm1d>(), l.bn[0]);
  for (int i = 0; i < 3 && l.eval; ++i)
    l.eval = eval_form(*gs.ptr(1 + 3 * i)->as<torch::nn::BatchNorm2d>(), l.bn[1 + i]);
  return l;
}

bool fused_inference_applies(const BAMImpl& m, const torch::Tensor& x) {
  const auto l = fused_layers(m);
  if (!l.eval) return false;
  const auto& bn = l.bn;
  return fused_gates_apply(
      x, {l.fc0->weight,        l.fc0->bias,        l.fc_final->weight,   l.fc_final->bias,
          l.reduce->weight,     l.reduce->bias,     l.dilated[0]->weight, l.dilated[0]->bias,
          l.dilated[1]->weight, l.dilated[1]->bias, l.final_conv->weight, l.final_conv->bias,
          bn[0].weight,         bn[0].bias,         bn[0].running_mean,   bn[0].running_var,
          bn[1].weight,         bn[1].bias,         bn[1].running_mean,   bn[1].running_var,
          bn[2].weight,         bn[2].bias,         bn[2].running_mean,   bn[2].running_var,
          bn[3].weight,         bn[3].bias,         bn[3].running_mean,   bn[3].running_var});
}
}  // namespace

torch::Tensor BAMImpl::fused_forward(const torch::Tensor& x) {
  if (!fused_inference_applies(*this, x)) return {};
  const auto l = fused_layers(*this);
  const ChannelMlp mlp{l.fc0->weight, l.fc0->bias, l.fc_final->weight, l.fc_final->bias, &l.bn[0]};
  // Narrow spatial branches run inside the kernel; wider ones are faster as ATen convolutions.
  if (!bam_spatial_in_kernel(x.size(0), spatial_att->rd_channels)) {
    return fused_bam(x, mlp, nullptr, spatial_att(x), options.product());
  }
  BamSpatialWeights sw;
  sw.reduce_weight = l.reduce->weight;
  sw.reduce_bias = l.reduce->bias;
  sw.reduce_bn = &l.bn[1];
  for (int i = 0; i < 2; ++i) {
    sw.dilated_weight[i] = l.dilated[i]->weight;
    sw.dilated_bias[i] = l.dilated[i]->bias;
    sw.dilated_bn[i] = &l.bn[2 + i];
  }
  sw.final_weight = l.final_conv->weight;
  sw.final_bias = l.final_conv->bias;
  sw.dilation = options.dilation();
  return fused_bam(x, mlp, &sw, {}, options.product());
}

torch::Tensor BAMImpl::fused_train_forward(const torch::Tensor& x) {
  // The channel gate keeps its modules (BN with batch statistics); the spatial branch and the
  // combine, where most of the passes over the map are, are one autograd node.
  auto mc = channel_att(x);
  const auto layers = spatial_att->layers();
  if (bam_spatial_branch_applicable(x, layers) && fused_gates_train_apply(x, {mc}))
    return bam_spatial_branch_combine(x, mc, layers, options.product());
  auto ms = spatial_att(x);
  if (fused_gates_train_apply(x, {mc, ms}))
    return fused_bam_combine_train(x, mc, ms, options.product());
  return combine(x, mc, ms);
}

const KernelOp<BAMImpl::KernelCall>& BAMImpl::kernels() {
  using Call = KernelCall;
  static const KernelOp<Call> op(
      "bam",
      {{"fused", [](const Call& c) { return fused_inference_applies(*c.self, c.x); },
        [](const Call& c) { return c.self->fused_forward(c.x); }},
       {"fused_train", [](const Call& c) { return fused_gates_train_apply(c.x); },
        [](const Call& c) { return c.self->fused_train_forward(c.x); }},
       {"aten", always_applies<Call>, [](const Call& c) { return c.self->run(c.x, nullptr); }}});
  return op;
}

torch::Tensor BAMImpl::forward(const torch::Tensor& x) {
  check_attention_input("BAM", x, options.channels());
  return kernels()({this, x});
}

std::string BAMImpl::kernel_for(const torch::Tensor& x) {
  return kernels().chosen({this, x});
}

torch::Tensor BAMImpl::forward_with(const std::string& kernel, const torch::Tensor& x) {
  check_attention_input("BAM", x, options.channels());
  return kernels().run(kernel, {this, x});
}

AttentionOutput BAMImpl::forward_with_maps(const torch::Tensor& x) {
  AttentionOutput out;
  out.output = run(x, &out.maps);
  return out;
}

void BAMImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BAM(channels=" << options.channels()
         << ", rd_channels=" << channel_att->rd_channels << ", dilation=" << options.dilation()
         << ", combine=" << (options.product() ? "product" : "sum") << ")";
}

AttentionInfo bam_attention_info() {
  return {"bam", "BAM (Park et al., BMVC 2018); r, rd, policy, divisor, dilation, product",
          [](int64_t channels, const OptionMap& o) {
            o.check_known({"r", "rd", "policy", "divisor", "dilation", "product"});
            return torch::nn::AnyModule(BAM(BAMOptions(channels)
                                                .reduction(o.get_double("r", 16))
                                                .rd_channels(o.get_int("rd", 0))
                                                .reduction_policy(o.get_string("policy", "floor"))
                                                .divisor(o.get_int("divisor", 8))
                                                .dilation(o.get_int("dilation", 4))
                                                .product(o.get_bool("product", false))));
          }};
}

}  // namespace dynattn
