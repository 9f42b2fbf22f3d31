#include "dynattn/attention/squeeze_excitation.h"

#include "dynattn/attention/channel_reduction.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/ops/fused_gates.h"

namespace dynattn {
namespace {
void check_gate_name(const std::string& gate, const char* module) {
  TORCH_CHECK(gate == "sigmoid" || gate == "hard_sigmoid", module,
              ": gate must be one of sigmoid, hard_sigmoid; got '", gate, "'");
}

GateFunction gate_function(const SqueezeExcitationImpl& m) {
  return m.options.gate() == "sigmoid" ? GateFunction::Sigmoid : GateFunction::HardSigmoid;
}
}  // namespace

torch::Tensor apply_channel_gate(const torch::Tensor& logits, const std::string& gate,
                                 const char* module) {
  check_gate_name(gate, module);
  return gate == "sigmoid" ? torch::sigmoid(logits) : torch::hardsigmoid(logits);
}

SqueezeExcitationImpl::SqueezeExcitationImpl(SqueezeExcitationOptions options_)
    : options(std::move(options_)) {
  reset();
}

void SqueezeExcitationImpl::reset() {
  const auto& o = options;
  check_gate_name(o.gate(), "SE");
  rd_channels = reduced_channels(o.channels(), o.reduction(), o.reduction_policy(), o.divisor(),
                                 o.rd_channels(), "SE");
  fc1 = register_module(
      "fc1", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.channels(), rd_channels, 1).bias(true)));
  fc2 = register_module(
      "fc2", torch::nn::Conv2d(torch::nn::Conv2dOptions(rd_channels, o.channels(), 1).bias(true)));
}

torch::Tensor SqueezeExcitationImpl::gate(const torch::Tensor& x) {
  check_attention_input("SE", x, options.channels());
  // mean rather than adaptive pooling: the same maths, one reduction kernel.
  auto z = x.mean({2, 3}, /*keepdim=*/true);
  auto hidden = conv1x1_on_pooled(*fc1, z).relu_();
  return apply_channel_gate(conv1x1_on_pooled(*fc2, hidden), options.gate(), "SE");
}

const KernelOp<SqueezeExcitationImpl::KernelCall>& SqueezeExcitationImpl::kernels() {
  using Call = KernelCall;
  static const KernelOp<Call> op(
      "se",
      {// Inference: one fused kernel instead of the ATen operators of gate().
       {"fused",
        [](const Call& c) {
          const auto& m = *c.self;
          return fused_gates_apply(c.x, {m.fc1->weight, m.fc1->bias, m.fc2->weight, m.fc2->bias});
        },
        [](const Call& c) {
          const auto& m = *c.self;
          return fused_squeeze_excitation(
              c.x, ChannelMlp{m.fc1->weight, m.fc1->bias, m.fc2->weight, m.fc2->bias},
              gate_function(m));
        }},
       // Training: one autograd node with a two-pass backward instead of ATen's operator chain.
       {"fused_train",
        [](const Call& c) {
          const auto& m = *c.self;
          return fused_gates_train_apply(c.x,
                                         {m.fc1->weight, m.fc1->bias, m.fc2->weight, m.fc2->bias});
        },
        [](const Call& c) {
          const auto& m = *c.self;
          return fused_squeeze_excitation_train(c.x, m.fc1->weight, m.fc1->bias, m.fc2->weight,
                                                m.fc2->bias, gate_function(m));
        }},
       {"aten", always_applies<Call>, [](const Call& c) { return c.x * c.self->gate(c.x); }}});
  return op;
}

torch::Tensor SqueezeExcitationImpl::forward(const torch::Tensor& x) {
  check_attention_input("SE", x, options.channels());
  return kernels()({this, x});
}

std::string SqueezeExcitationImpl::kernel_for(const torch::Tensor& x) {
  return kernels().chosen({this, x});
}

torch::Tensor SqueezeExcitationImpl::forward_with(const std::string& kernel,
                                                  const torch::Tensor& x) {
  check_attention_input("SE", x, options.channels());
  return kernels().run(kernel, {this, x});
}

AttentionOutput SqueezeExcitationImpl::forward_with_maps(const torch::Tensor& x) {
  return gated_output(x, gate(x));
}

void SqueezeExcitationImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::SqueezeExcitation(channels=" << options.channels()
         << ", rd_channels=" << rd_channels << ", gate=" << options.gate() << ")";
}

AttentionInfo squeeze_excitation_attention_info() {
  return {"se", "Squeeze-and-Excitation (Hu et al., CVPR 2018); r, rd, policy, divisor, gate",
          [](int64_t channels, const OptionMap& o) {
            o.check_known({"r", "rd", "policy", "divisor", "gate"});
            return torch::nn::AnyModule(
                SqueezeExcitation(SqueezeExcitationOptions(channels)
                                      .reduction(o.get_double("r", 16))
                                      .rd_channels(o.get_int("rd", 0))
                                      .reduction_policy(o.get_string("policy", "floor"))
                                      .divisor(o.get_int("divisor", 8))
                                      .gate(o.get_string("gate", "sigmoid"))));
          }};
}

}  // namespace dynattn
