#include "dynattn/models/cifar_resnet.h"

#include <optional>

#include "dynattn/models/attention_slot.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/reparam/fold_batch_norm.h"

namespace dynattn {
namespace {
// Without BN after it (the deployed form) a conv carries the folded bias.
torch::nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride, bool bias = false) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(bias));
}

// `conv` followed by `bn` folded into one conv registered under `conv_name` in `owner`; the BN
// is unregistered. Returns the new conv.
torch::nn::Conv2d fold_into(torch::nn::Module& owner, const std::string& conv_name,
                            const torch::nn::Conv2d& conv, const std::string& bn_name,
                            const torch::nn::BatchNorm2d& bn) {
  auto fused = fold_conv_bn(*conv, *bn, owner.name() + " " + bn_name);
  owner.unregister_module(bn_name);
  return torch::nn::Conv2d(owner.replace_module(conv_name, fused));
}

// Kaiming-normal (fan_out, ReLU) for convs as torchvision/timm ResNets do; BN to (1, 0).
// Called from reset(), i.e. from constructors: the module itself is not yet in a shared_ptr.
void init_conv_bn(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& sub : m.modules(/*include_self=*/false)) {
    if (auto* conv = sub->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = sub->as<torch::nn::BatchNorm2d>()) {
      bn->weight.fill_(1.0);
      bn->bias.zero_();
    }
  }
}
}  // namespace

BasicBlockImpl::BasicBlockImpl(BasicBlockOptions options_) : options(std::move(options_)) {
  reset();
}

void BasicBlockImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.shortcut() == "conv" || o.shortcut() == "pad",
              "BasicBlock: shortcut must be 'conv' or 'pad', got '", o.shortcut(), "'");
  TORCH_CHECK(o.stride() == 1 || o.stride() == 2, "BasicBlock: stride must be 1 or 2, got ",
              o.stride());
  const bool bn = !o.deployed();
  conv1 = register_module("conv1",
                          conv3x3(o.in_channels(), o.out_channels(), o.stride(), o.deployed()));
  bn1 = bn ? register_module("bn1", torch::nn::BatchNorm2d(o.out_channels())) : nullptr;
  conv2 = register_module("conv2", conv3x3(o.out_channels(), o.out_channels(), 1, o.deployed()));
  bn2 = bn ? register_module("bn2", torch::nn::BatchNorm2d(o.out_channels())) : nullptr;
  const bool reshapes = o.stride() != 1 || o.in_channels() != o.out_channels();
  downsample = nullptr;
  if (reshapes && o.shortcut() == "conv") {
    torch::nn::Sequential projection(
        torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), 1)
                              .stride(o.stride())
                              .bias(o.deployed())));
    if (bn) projection->push_back(torch::nn::BatchNorm2d(o.out_channels()));
    downsample = register_module("downsample", projection);
  }
  TORCH_CHECK(o.out_channels() >= o.in_channels() || o.shortcut() == "conv",
              "BasicBlock: the 'pad' shortcut cannot reduce channels (", o.in_channels(), " -> ",
              o.out_channels(), ")");
  // Before the slot is filled: attention modules keep their own initialisation (CBAM's spatial
  // BN starts at zero in the official code, the non-local block's BN gamma too).
  init_conv_bn(*this);
  attn = create_attention(o.attention(), o.out_channels());
  if (!attn.is_empty()) register_module("attn", attn.ptr());
  if (o.zero_init_last() && bn) {
    torch::NoGradGuard no_grad;
    bn2->weight.zero_();
  }
}

std::vector<std::string> BasicBlockImpl::reparameterize() {
  std::vector<std::string> merged;
  if (options.deployed()) return merged;
  conv1 = fold_into(*this, "conv1", conv1, "bn1", bn1);
  bn1 = nullptr;
  conv2 = fold_into(*this, "conv2", conv2, "bn2", bn2);
  bn2 = nullptr;
  merged = {"conv1+bn1", "conv2+bn2"};
  if (!downsample.is_empty()) {
    const auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(downsample->ptr(0));
    const auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(downsample->ptr(1));
    TORCH_CHECK(conv && bn, "BasicBlock: the projection shortcut is not conv + BN");
    auto fused = fold_conv_bn(*conv, *bn, "downsample");
    downsample =
        torch::nn::Sequential(replace_module("downsample", torch::nn::Sequential(fused).ptr()));
    merged.push_back("downsample.0+downsample.1");
  }
  options.deployed(true);
  return merged;
}

namespace {
// Runs an attention slot, asking for its maps when it can give them.
torch::Tensor run_attention(torch::nn::AnyModule& module, const torch::Tensor& x,
                            AttentionMaps* maps, const std::string& prefix) {
  if (maps != nullptr) {
    if (auto* with_maps = dynamic_cast<AttentionWithMaps*>(module.ptr().get())) {
      auto result = with_maps->forward_with_maps(x);
      for (auto& kv : result.maps) (*maps)[prefix + kv.first] = kv.second;
      return result.output;
    }
  }
  return module.forward(x);
}
}  // namespace

torch::Tensor BasicBlockImpl::residual(const torch::Tensor& x) {
  return residual_impl(x, nullptr, "");
}

torch::Tensor BasicBlockImpl::residual_with_maps(const torch::Tensor& x, AttentionMaps& maps,
                                                 const std::string& prefix) {
  return residual_impl(x, &maps, prefix);
}

torch::Tensor BasicBlockImpl::residual_impl(const torch::Tensor& x, AttentionMaps* maps,
                                            const std::string& prefix) {
  auto out = conv2d_forward(*conv1, x);
  if (!bn1.is_empty()) out = bn1(out);
  out = conv2d_forward(*conv2, out.relu_());
  if (!bn2.is_empty()) out = bn2(out);
  if (!attn.is_empty()) out = run_attention(attn, out, maps, prefix + "attn.");
  return out;
}

torch::Tensor BasicBlockImpl::shortcut(const torch::Tensor& x) {
  if (!downsample.is_empty()) return downsample->forward(x);
  if (options.stride() == 1 && options.in_channels() == options.out_channels()) return x;
  // Option A: subsample spatially and zero-pad the new channels.
  auto y =
      x.slice(2, 0, c10::nullopt, options.stride()).slice(3, 0, c10::nullopt, options.stride());
  const int64_t extra = options.out_channels() - options.in_channels();
  // constant_pad_nd returns NCHW whatever x is: keep x's layout, or what is added to it (a
  // gated residual, out of place) drags the rest of a channels-last network into NCHW.
  return torch::constant_pad_nd(y, {0, 0, 0, 0, extra / 2, extra - extra / 2})
      .contiguous(x.suggest_memory_format());
}

bool BasicBlockImpl::onednn_ready() const {
  if (!options.deployed() || !attn.is_empty()) return false;
  return !downsample.is_empty() ||
         (options.stride() == 1 && options.in_channels() == options.out_channels());
}

torch::Tensor BasicBlockImpl::forward_onednn(const torch::Tensor& x) {
  TORCH_CHECK(onednn_ready(),
              "BasicBlock: forward_onednn needs the deployed form without attention");
  auto out = packed_conv1_.forward(*conv1, x).relu_();
  out = packed_conv2_.forward(*conv2, out);
  if (downsample.is_empty()) {
    out.add_(x);
  } else {
    out.add_(packed_downsample_.forward(*downsample->ptr<torch::nn::Conv2dImpl>(0), x));
  }
  return out.relu_();
}

torch::Tensor BasicBlockImpl::forward_with_maps(const torch::Tensor& x, AttentionMaps& maps,
                                                const std::string& prefix) {
  auto out = residual_impl(x, &maps, prefix);
  out += shortcut(x);
  return torch::relu_(out);
}

torch::Tensor BasicBlockImpl::forward(const torch::Tensor& x) {
  // In place, as torchvision does: neither BN nor an attention gate saves its output.
  auto out = residual(x);
  out += shortcut(x);
  return torch::relu_(out);
}

void BasicBlockImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BasicBlock(" << options.in_channels() << " -> " << options.out_channels()
         << ", stride=" << options.stride() << ", attention=" << options.attention() << ")";
}

CifarResNetImpl::CifarResNetImpl(CifarResNetOptions options_) : options(std::move(options_)) {
  reset();
}

void CifarResNetImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.depth() >= 8 && (o.depth() - 2) % 6 == 0,
              "CifarResNet: depth must be 6n+2 (20, 32, 56, 110, ...), got ", o.depth());
  TORCH_CHECK(o.in_channels() > 0 && o.num_classes() > 0 && o.base_width() > 0,
              "CifarResNet: in_channels, num_classes and base_width must be positive");
  const int64_t n = (o.depth() - 2) / 6;
  const int64_t w = o.base_width();
  conv1 = register_module("conv1", conv3x3(o.in_channels(), w, 1, o.deployed()));
  bn1 = o.deployed() ? nullptr : register_module("bn1", torch::nn::BatchNorm2d(w));
  auto make_stage = [&](int64_t in, int64_t out, int64_t stride) {
    torch::nn::Sequential stage;
    for (int64_t i = 0; i < n; ++i) {
      stage->push_back(BasicBlock(BasicBlockOptions(i == 0 ? in : out, out)
                                      .stride(i == 0 ? stride : 1)
                                      .attention(o.attention())
                                      .shortcut(o.shortcut())
                                      .zero_init_last(o.zero_init_last())
                                      .deployed(o.deployed())));
    }
    return stage;
  };
  layer1 = register_module("layer1", make_stage(w, w, 1));
  layer2 = register_module("layer2", make_stage(w, 2 * w, 2));
  layer3 = register_module("layer3", make_stage(2 * w, 4 * w, 2));
  stage_attn.assign(3, torch::nn::AnyModule());
  if (parse_named_options(o.stage_attention(), "stage attention").name != "none") {
    TORCH_CHECK(!o.stage_attention_after().empty(), "CifarResNet: stage_attention '",
                o.stage_attention(), "' needs at least one stage in stage_attention_after");
    for (int64_t stage : o.stage_attention_after()) {
      TORCH_CHECK(stage >= 1 && stage <= 3,
                  "CifarResNet: stage_attention_after must list stages 1..3, got ", stage);
      auto& slot = stage_attn[stage - 1];
      TORCH_CHECK(slot.is_empty(), "CifarResNet: stage ", stage,
                  " listed twice in stage_attention_after");
      slot = create_attention(o.stage_attention(), w << (stage - 1));
      register_module("stage_attn" + std::to_string(stage), slot.ptr());
    }
  }
  fc = nullptr;
  bilinear_head = nullptr;
  if (o.head() == "avg") {
    fc = register_module("fc", torch::nn::Linear(4 * w, o.num_classes()));
  } else {
    bilinear_head = register_module("head", create_bilinear_head(o.head(), 4 * w, o.num_classes()));
  }
  std::vector<std::string> names;
  for (int64_t stage = 1; stage <= 3; ++stage)
    for (int64_t i = 0; i < n; ++i)
      names.push_back("layer" + std::to_string(stage) + "." + std::to_string(i));
  gates_ = make_stochastic_depth_gates(o.stochastic_depth(), names);
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(conv1->weight, 0.0, torch::kFanOut, torch::kReLU);
}

torch::Tensor CifarResNetImpl::features(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(), "CifarResNet: expected input [N,",
              options.in_channels(), ",H,W], got ", x.sizes());
  if (!bilinear_head.is_empty()) return bilinear_head->features(trunk(x, nullptr, nullptr));
  // mean over H, W rather than adaptive pooling: the same maths, a cheaper kernel.
  return trunk(x, nullptr, nullptr).mean({2, 3});
}

bool CifarResNetImpl::stochastic_depth_active() const {
  for (const auto& gate : gates_)
    if (gate.active(is_training())) return true;
  return false;
}

torch::Tensor CifarResNetImpl::gated_block(BasicBlockImpl& block, StochasticDepthGate& gate,
                                           const torch::Tensor& x, AttentionMaps* maps,
                                           const std::string& prefix, ExecutionTrace* trace) {
  auto residual = [&](const torch::Tensor& rows) {
    return maps != nullptr ? block.residual_with_maps(rows, *maps, prefix) : block.residual(rows);
  };
  auto result = gate.run(residual, x, block.shortcut(x), is_training(),
                         trace != nullptr && trace->counting());
  if (trace != nullptr) trace->add(gate.name(), result);
  // A dropped residual with the identity shortcut returns x itself: not to be changed in place.
  return result.output.is_same(x) ? torch::relu(x) : torch::relu_(result.output);
}

torch::Tensor CifarResNetImpl::trunk(const torch::Tensor& x, AttentionMaps* maps,
                                     ExecutionTrace* trace) {
  auto out = conv2d_forward(*conv1, x);
  if (!bn1.is_empty()) out = bn1(out);
  out.relu_();
  torch::nn::Sequential stages[] = {layer1, layer2, layer3};
  const bool gated = trace != nullptr || stochastic_depth_active();
  size_t index = 0;  // of the block, over all stages
  for (size_t k = 0; k < 3; ++k) {
    if (maps == nullptr && !gated) {
      out = stages[k]->forward(out);
      index += stages[k]->size();
    } else {
      for (size_t i = 0; i < stages[k]->size(); ++i, ++index) {
        auto& block = *stages[k]->ptr<BasicBlockImpl>(i);
        const std::string prefix =
            maps == nullptr ? "" : "layer" + std::to_string(k + 1) + "." + std::to_string(i) + ".";
        out = gated ? gated_block(block, gates_[index], out, maps, prefix, trace)
                    : block.forward_with_maps(out, *maps, prefix);
      }
    }
    if (!stage_attn[k].is_empty()) {
      out = run_attention(stage_attn[k], out, maps,
                          maps ? "stage_attn" + std::to_string(k + 1) + "." : std::string());
    }
  }
  return out;
}

AttentionOutput CifarResNetImpl::forward_with_maps(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(), "CifarResNet: expected input [N,",
              options.in_channels(), ",H,W], got ", x.sizes());
  AttentionOutput result;
  const auto trunk_out = trunk(x, &result.maps, nullptr);
  if (bilinear_head.is_empty()) {
    result.output = fc(trunk_out.mean({2, 3}));
  } else {
    auto head = bilinear_head->forward_with_maps(trunk_out);
    result.output = head.output;
    for (auto& kv : head.maps) result.maps["head." + kv.first] = kv.second;
  }
  return result;
}

bool CifarResNetImpl::onednn_ready() const {
  if (!options.deployed() || !bilinear_head.is_empty() || stochastic_depth_active()) return false;
  for (const auto& slot : stage_attn)
    if (!slot.is_empty()) return false;
  for (const auto& block : blocks())
    if (!block->onednn_ready()) return false;
  return true;
}

torch::Tensor CifarResNetImpl::forward(const torch::Tensor& x) {
  if (onednn_chain_applicable(x) && onednn_ready()) {
    TORCH_CHECK(x.size(1) == options.in_channels(), "CifarResNet: expected input [N,",
                options.in_channels(), ",H,W], got ", x.sizes());
    auto out = packed_conv1_.forward(*conv1, x.contiguous().to_mkldnn()).relu_();
    for (auto block : blocks()) out = block->forward_onednn(out);
    return fc(out.to_dense().mean({2, 3}));
  }
  if (!bilinear_head.is_empty()) {
    TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(),
                "CifarResNet: expected input [N,", options.in_channels(), ",H,W], got ", x.sizes());
    return bilinear_head->forward(trunk(x, nullptr, nullptr));
  }
  return fc(features(x));
}

DynamicOutput CifarResNetImpl::forward_dynamic(const torch::Tensor& x, bool count_macs) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(), "CifarResNet: expected input [N,",
              options.in_channels(), ",H,W], got ", x.sizes());
  ExecutionTrace trace(x.size(0), count_macs);
  std::optional<MacCounter> counter;
  if (count_macs) counter.emplace();
  const auto out = trunk(x, nullptr, &trace);
  auto logits = bilinear_head.is_empty() ? fc(out.mean({2, 3})) : bilinear_head->forward(out);
  return trace.finish(std::move(logits), execution_mode(), count_macs ? counter->macs() : 0);
}

void CifarResNetImpl::set_execution_mode(ExecutionMode mode) {
  for (auto& gate : gates_) gate.set_mode(mode);
  options.stochastic_depth().execution(execution_mode_name(mode));
}

ExecutionMode CifarResNetImpl::execution_mode() const {
  return parse_execution_mode(options.stochastic_depth().execution(),
                              "CifarResNet stochastic_depth.execution");
}

std::vector<std::string> CifarResNetImpl::fold_survival_scaling() {
  std::vector<std::string> scaled;
  const auto all = blocks();
  bool convertible = false;
  for (size_t i = 0; i < all.size(); ++i) {
    if (!all[i]->attn.is_empty()) return scaled;
    convertible |= gates_[i].survival() < 1.0 && gates_[i].test_time() == TestTimeScaling::kScale;
  }
  if (!convertible) return scaled;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < all.size(); ++i) {
    auto& gate = gates_[i];
    const double p = gate.survival();
    gate.set_test_time(TestTimeScaling::kIdentity);
    if (p >= 1.0) continue;
    auto& block = *all[i];
    // The branch ends in bn2 (or the conv2 it was folded into): an affine map, scaled by p.
    const bool bn = !block.bn2.is_empty();
    auto& weight = bn ? block.bn2->weight : block.conv2->weight;
    auto& bias = bn ? block.bn2->bias : block.conv2->bias;
    TORCH_CHECK(weight.defined() && bias.defined(), "CifarResNet: block ", gate.name(),
                " has no affine ", bn ? "bn2" : "conv2", " weight and bias to scale by p_l");
    weight.mul_(p);
    bias.mul_(p);
    scaled.push_back(c10::str(gate.name(), ": ", bn ? "bn2" : "conv2", " * p_l (", p, ")"));
  }
  options.stochastic_depth().test_time("identity");
  return scaled;
}

std::vector<BasicBlock> CifarResNetImpl::blocks() const {
  std::vector<BasicBlock> out;
  for (const auto& stage : {layer1, layer2, layer3}) {
    for (const auto& m : *stage)
      out.emplace_back(std::dynamic_pointer_cast<BasicBlockImpl>(m.ptr()));
  }
  return out;
}

std::vector<std::string> CifarResNetImpl::reparameterize() {
  // Before the blocks fold: the survival scaling goes into bn2, then with it into conv2.
  std::vector<std::string> merged = fold_survival_scaling();
  if (options.deployed()) return merged;
  conv1 = fold_into(*this, "conv1", conv1, "bn1", bn1);
  bn1 = nullptr;
  options.deployed(true);
  merged.insert(merged.begin(), "conv1+bn1");
  return merged;
}

std::vector<std::pair<std::string, std::string>> CifarResNetImpl::deployed_options() const {
  std::vector<std::pair<std::string, std::string>> out = {{"deployed", "true"}};
  if (options.stochastic_depth().schedule() != "none" &&
      options.stochastic_depth().test_time() == "identity")
    out.emplace_back("sd_test", "identity");
  return out;
}

void CifarResNetImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::CifarResNet(depth=" << options.depth() << ", width=" << options.base_width()
         << ", attention=" << options.attention() << ", shortcut=" << options.shortcut();
  if (options.stage_attention() != "none")
    stream << ", stage_attention=" << options.stage_attention();
  const auto& sd = options.stochastic_depth();
  if (sd.schedule() != "none")
    stream << ", stochastic_depth=" << sd.schedule() << "(p_L=" << sd.survival() << ", "
           << sd.granularity() << ", " << sd.execution() << ", test " << sd.test_time() << ")";
  stream << ")";
}

}  // namespace dynattn
