#include "dynattn/ops/onednn_chain.h"
#include "dynattn/ops/dispatch.h"

#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "onednn_engine.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <unordered_map>

namespace dynattn {

bool onednn_chain_applicable(const torch::Tensor& x) {
  return dynattn_kernels_enabled() && at::hasMKLDNN() && x.is_cpu() && !x.is_mkldnn() &&
         x.scalar_type() == torch::kFloat && x.dim() == 4 && !torch::GradMode::is_enabled();
}

torch::Tensor PackedConv2d::packed(const torch::nn::Conv2dImpl& conv) {
  const auto& w = conv.weight;
  const auto& o = conv.options;
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  TORCH_CHECK(padding != nullptr, "PackedConv2d: needs explicit padding");
  auto pack = [&] {
    return at::mkldnn_reorder_conv2d_weight(w.detach().contiguous().to_mkldnn(), **padding,
                                            *o.stride(), *o.dilation(), o.groups());
  };
  // An inference tensor (made under InferenceMode) has no version counter, so an in-place
  // change could not be seen: such weights are packed on every call.
  if (w.is_inference()) return pack();
  std::lock_guard<std::mutex> lock(mutex_);
  if (!packed_.defined() || source_ != w.unsafeGetTensorImpl() || version_ != w._version()) {
    packed_ = pack();
    source_ = w.unsafeGetTensorImpl();
    version_ = w._version();
  }
  return packed_;
}

torch::Tensor PackedConv2d::forward(const torch::nn::Conv2dImpl& conv, const torch::Tensor& x) {
  TORCH_CHECK(x.is_mkldnn(), "PackedConv2d: the input must be in oneDNN layout (to_mkldnn())");
  const auto& o = conv.options;
  TORCH_CHECK(variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) != nullptr,
              "PackedConv2d: only zero padding");
  const auto weight = packed(conv);
  const auto* padding = variant_get_if<torch::ExpandingArray<2>>(&o.padding());
  return at::mkldnn_convolution(x, weight, conv.bias.defined() ? conv.bias : torch::Tensor(),
                                **padding, *o.stride(), *o.dilation(), o.groups());
}

namespace {
// Under WinogradPolicy::kMeasured, which candidate won for a layer configuration (input dims,
// weight dims, stride, dilation, padding, bias, thread count), process-wide, as
// cudnn.benchmark's cache: two stacks with the same layers then run the same algorithms and
// give bitwise-equal outputs, and a new model instance does not time its layers again.
class MeasuredChoices {
 public:
  // The winning candidate's index, or -1 when this configuration was never timed.
  int find(const std::vector<int64_t>& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = choices_.find(key);
    return it == choices_.end() ? -1 : it->second;
  }
  void remember(const std::vector<int64_t>& key, int winner) {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_.emplace(key, winner);
  }

 private:
  std::mutex mutex_;
  std::map<std::vector<int64_t>, int> choices_;
};

MeasuredChoices& measured_choices() {
  static MeasuredChoices choices;
  return choices;
}
}  // namespace

OnednnConvStack::OnednnConvStack() = default;
OnednnConvStack::~OnednnConvStack() = default;
OnednnConvStack::OnednnConvStack(const OnednnConvStack&) {}
OnednnConvStack& OnednnConvStack::operator=(const OnednnConvStack&) {
  std::lock_guard<std::mutex> lock(mutex_);
  plans_.clear();
  last_.reset();
  return *this;
}

bool OnednnConvStack::supports(const std::vector<const torch::nn::Conv2dImpl*>& convs) {
  if (!available() || convs.empty()) return false;
  for (const auto* conv : convs) {
    const auto& o = conv->options;
    if (variant_get_if<torch::enumtype::kZeros>(&o.padding_mode()) == nullptr ||
        variant_get_if<torch::ExpandingArray<2>>(&o.padding()) == nullptr)
      return false;
    if (!conv->weight.is_cpu() || conv->weight.scalar_type() != torch::kFloat) return false;
    if (conv->bias.defined() && conv->bias.scalar_type() != torch::kFloat) return false;
  }
  return true;
}

#ifndef DYNATTN_HAVE_ONEDNN

struct OnednnConvStack::Plan {};
bool OnednnConvStack::available() {
  return false;
}
torch::Tensor OnednnConvStack::forward(const std::vector<const torch::nn::Conv2dImpl*>&,
                                       const torch::Tensor&) {
  TORCH_CHECK(false, "OnednnConvStack: dynattn was built without the oneDNN library (libdnnl)");
}
torch::Tensor OnednnConvStack::try_forward(const std::vector<const torch::nn::Conv2dImpl*>&,
                                           const torch::Tensor&) {
  return {};
}
std::string OnednnConvStack::refusal() const {
  return "dynattn was built without the oneDNN library (libdnnl)";
}
std::vector<std::string> OnednnConvStack::implementations() const {
  return {};
}

#else

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

memory::dims to_dims(torch::IntArrayRef sizes) {
  return memory::dims(sizes.begin(), sizes.end());
}

// Bytes from LibTorch's allocator (64-byte aligned), for oneDNN memory objects.
torch::Tensor byte_buffer(size_t bytes) {
  return torch::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                      torch::TensorOptions().dtype(torch::kByte));
}
torch::Tensor buffer_for(const memory::desc& desc) {
  return byte_buffer(desc.get_size());
}

// One weight's identity and version, to see when the cached copy is stale.
struct Stamp {
  const void* impl = nullptr;
  int64_t version = -1;
  bool operator==(const Stamp& o) const { return impl == o.impl && version == o.version; }
};
Stamp stamp_of(const torch::Tensor& t) {
  if (!t.defined()) return {};
  return {t.unsafeGetTensorImpl(), t.is_inference() ? -1 : static_cast<int64_t>(t._version())};
}

}  // namespace

struct OnednnConvStack::Plan {
  struct Layer {
    dnnl::convolution_forward primitive;
    memory::desc src, dst, scratchpad;
    memory weights, bias;
    bool has_bias = false;
    std::string implementation;
    int64_t macs = 0;  // of the direct convolution, whatever the algorithm
  };
  std::vector<int64_t> input_sizes;
  bool channels_last = false;
  std::vector<Stamp> stamps;  // weight, bias per layer
  std::vector<Layer> layers;
  std::vector<int64_t> output_sizes;
  size_t scratchpad_bytes = 0;
  std::string refused;  // why the stack cannot run this input without a reference kernel

  bool matches(const torch::Tensor& x, bool cl, const std::vector<Stamp>& s) const {
    return channels_last == cl && x.sizes().vec() == input_sizes && stamps == s;
  }
};

bool OnednnConvStack::available() {
  return true;
}

namespace {

bool is_reference(const dnnl::convolution_forward::primitive_desc& pd) {
  return detail::is_reference_implementation(pd.impl_info_str());
}

std::string to_string(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Median-free quick timing: the best of a few runs, enough to tell algorithms 1.2x apart.
double best_time_ms(dnnl::convolution_forward& prim, const memory::desc& src_desc,
                    const memory::desc& dst_desc, const memory::desc& scratch_desc,
                    const memory& weights, const memory& bias, bool has_bias) {
  auto& engine = detail::onednn_cpu_engine();
  auto& stream = detail::onednn_cpu_stream();
  auto src_buf = buffer_for(src_desc).zero_();
  auto dst_buf = buffer_for(dst_desc);
  auto scratch_buf = buffer_for(scratch_desc);
  memory src(src_desc, engine, src_buf.data_ptr()), dst(dst_desc, engine, dst_buf.data_ptr()),
      scratch(scratch_desc, engine, scratch_buf.data_ptr());
  std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src},
                                          {DNNL_ARG_WEIGHTS, weights},
                                          {DNNL_ARG_DST, dst},
                                          {DNNL_ARG_SCRATCHPAD, scratch}};
  if (has_bias) args[DNNL_ARG_BIAS] = bias;
  prim.execute(stream, args);  // warm-up: first-touch of buffers, JIT caches
  stream.wait();
  double best = std::numeric_limits<double>::infinity();
  for (int run = 0; run < 3; ++run) {
    const auto start = std::chrono::steady_clock::now();
    prim.execute(stream, args);
    stream.wait();
    best = std::min(
        best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count());
  }
  return best;
}

}  // namespace

void OnednnConvStack::build(Plan& plan, const std::vector<const torch::nn::Conv2dImpl*>& convs,
                            bool may_measure) {
  auto& engine = detail::onednn_cpu_engine();
  auto& stream = detail::onednn_cpu_stream();
  const auto policy = kernel_policy().winograd;
  dnnl::primitive_attr attr;
  dnnl::post_ops relu;
  relu.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  attr.set_post_ops(relu);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto any = [](const memory::dims& dims) {
    return memory::desc(dims, memory::data_type::f32, Tag::any);
  };
  // Activations in the channel-blocked layout of this CPU's oneDNN kernels (16 channels on
  // AVX-512, 8 on AVX2 and older: ops/dispatch.h) wherever the channels allow. Left to choose
  // (`any`), oneDNN 2.6 picks NHWC for strided convs, which ran several times slower on an
  // AVX-512 CPU (3-5x for RepVGG-A0's stride-2 layers at batch 64). Given the other block size,
  // oneDNN has nothing but its reference kernel (1.9 s per image for RepVGG-A0 on an AVX2 CPU).
  const int64_t block = cpu_capability().onednn_block;
  const Tag blocked = block == 16 ? Tag::nChw16c : Tag::nChw8c;
  auto activations = [&](const std::vector<int64_t>& dims, bool prefer_blocked) {
    return prefer_blocked && dims[1] % block == 0
               ? memory::desc(to_dims(dims), memory::data_type::f32, blocked)
               : any(to_dims(dims));
  };

  std::vector<int64_t> sizes = plan.input_sizes;
  for (size_t i = 0; i < convs.size(); ++i) {
    const auto& conv = *convs[i];
    const auto& o = conv.options;
    const std::string where = "OnednnConvStack: layer " + std::to_string(i);
    TORCH_CHECK(sizes[1] == o.in_channels(), where, " expects ", o.in_channels(),
                " input channels, the layer before gives ", sizes[1]);
    const auto& padding = **variant_get_if<torch::ExpandingArray<2>>(&o.padding());
    const auto& kernel = *o.kernel_size();
    const auto& stride = *o.stride();
    const auto& dilation = *o.dilation();
    std::vector<int64_t> out = {sizes[0], o.out_channels(), 0, 0};
    for (int d = 0; d < 2; ++d) {
      out[2 + d] =
          (sizes[2 + d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) / stride[d] + 1;
      TORCH_CHECK(out[2 + d] > 0, where, ": input ", torch::IntArrayRef(sizes),
                  " is too small for its kernel, dilation and padding");
    }
    const int64_t groups = o.groups();
    auto weight = conv.weight.detach().contiguous();
    memory::dims weight_dims = groups == 1 ? to_dims(weight.sizes())
                                           : memory::dims{groups, o.out_channels() / groups,
                                                          weight.size(1), kernel[0], kernel[1]};
    const memory::desc user_weights(weight_dims, memory::data_type::f32,
                                    groups == 1 ? Tag::oihw : Tag::goihw);
    const bool has_bias = conv.bias.defined();
    const memory::desc bias_desc({o.out_channels()}, memory::data_type::f32, Tag::a);
    const memory::dims strides = {stride[0], stride[1]},
                       dilates = {dilation[0] - 1, dilation[1] - 1},
                       pads = {padding[0], padding[1]};

    auto make = [&](dnnl::algorithm alg, bool prefer_blocked) {
      const auto src = activations(sizes, prefer_blocked), dst = activations(out, prefer_blocked);
      const auto desc = has_bias
                            ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                              alg, src, any(weight_dims), bias_desc,
                                                              dst, strides, dilates, pads, pads)
                            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                              alg, src, any(weight_dims), dst,
                                                              strides, dilates, pads, pads);
      return dnnl::convolution_forward::primitive_desc(desc, attr, engine);
    };
    // Never a reference implementation: the blocked layout first, then `any`; a layer with
    // nothing else makes the whole stack refuse (the caller takes its next candidate).
    std::vector<dnnl::convolution_forward::primitive_desc> candidates;
    std::string refused;
    for (const bool prefer_blocked : {true, false}) {
      auto pd = make(dnnl::algorithm::convolution_direct, prefer_blocked);
      if (!is_reference(pd)) {
        candidates.push_back(std::move(pd));
        break;
      }
      refused = pd.impl_info_str();
    }
    if (candidates.empty()) {
      plan.refused = where + ": oneDNN offers only its reference convolution (" + refused +
                     ") for input " + to_string(sizes) + " and weight " +
                     to_string(weight.sizes().vec());
      plan.layers.clear();
      return;
    }
    if (policy != WinogradPolicy::kNever) {
      try {
        auto pd = make(dnnl::algorithm::convolution_winograd, true);
        if (!is_reference(pd)) candidates.push_back(std::move(pd));
      } catch (const dnnl::error&) {
        // Not supported for this shape or CPU (needs 3x3, stride 1, AVX-512): direct only.
      }
    }

    // Timing only when the plan is kept (cached), there is a choice and this process has not
    // timed the same configuration before; otherwise Winograd exactly when the policy insists
    // on it.
    std::vector<int64_t> choice_key = sizes;
    choice_key.insert(choice_key.end(), weight_dims.begin(), weight_dims.end());
    choice_key.insert(choice_key.end(),
                      {stride[0], stride[1], dilation[0], dilation[1], padding[0], padding[1],
                       has_bias ? 1 : 0, static_cast<int64_t>(at::get_num_threads())});
    const bool choosing = policy == WinogradPolicy::kMeasured && candidates.size() > 1;
    const int known = choosing ? measured_choices().find(choice_key) : -1;
    const bool measure = may_measure && choosing && known < 0;
    if (known >= 0) {
      candidates = {candidates[static_cast<size_t>(known)]};
    } else if (!measure) {
      // The direct conv is first, Winograd (when oneDNN offers it) last.
      if (policy == WinogradPolicy::kWhenSupported && candidates.size() > 1)
        candidates.erase(candidates.begin());
      candidates.resize(1);
    }
    Plan::Layer best;
    double best_ms = std::numeric_limits<double>::infinity();
    int winner = 0;
    for (size_t c = 0; c < candidates.size(); ++c) {
      const auto& pd = candidates[c];
      Plan::Layer layer;
      layer.primitive = dnnl::convolution_forward(pd);
      layer.src = pd.src_desc();
      layer.dst = pd.dst_desc();
      layer.scratchpad = pd.scratchpad_desc();
      layer.has_bias = has_bias;
      layer.implementation = pd.impl_info_str();
      layer.weights = memory(pd.weights_desc(), engine);
      memory user(user_weights, engine, weight.data_ptr());
      dnnl::reorder(user, layer.weights).execute(stream, user, layer.weights);
      if (has_bias) {
        layer.bias = memory(bias_desc, engine);
        std::memcpy(layer.bias.get_data_handle(), conv.bias.detach().contiguous().data_ptr<float>(),
                    sizeof(float) * o.out_channels());
      }
      stream.wait();
      const double ms = measure
                            ? best_time_ms(layer.primitive, layer.src, layer.dst, layer.scratchpad,
                                           layer.weights, layer.bias, has_bias)
                            : 0.0;
      if (!best.primitive || ms < best_ms) {
        best_ms = ms;
        best = std::move(layer);
        winner = static_cast<int>(c);
      }
    }
    if (measure) measured_choices().remember(choice_key, winner);
    best.macs = out[0] * out[2] * out[3] * conv.weight.numel();
    plan.scratchpad_bytes = std::max(plan.scratchpad_bytes, best.scratchpad.get_size());
    plan.layers.push_back(std::move(best));
    sizes = out;
  }
  plan.output_sizes = sizes;
}

torch::Tensor OnednnConvStack::run(const Plan& plan, const torch::Tensor& x) {
  auto& engine = detail::onednn_cpu_engine();
  auto& stream = detail::onednn_cpu_stream();
  auto scratch_buf = byte_buffer(plan.scratchpad_bytes);
  const memory::desc user_src(to_dims(x.sizes()), memory::data_type::f32,
                              plan.channels_last ? Tag::nhwc : Tag::nchw);
  memory current(user_src, engine, x.data_ptr());
  torch::Tensor current_buf;  // keeps `current`'s storage alive
  for (const auto& layer : plan.layers) {
    if (current.get_desc() != layer.src) {
      auto buf = buffer_for(layer.src);
      memory reordered(layer.src, engine, buf.data_ptr());
      dnnl::reorder(current, reordered).execute(stream, current, reordered);
      current = reordered;
      current_buf = buf;
    }
    auto dst_buf = buffer_for(layer.dst);
    memory dst(layer.dst, engine, dst_buf.data_ptr());
    memory scratch(layer.scratchpad, engine, scratch_buf.data_ptr());
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, current},
                                            {DNNL_ARG_WEIGHTS, layer.weights},
                                            {DNNL_ARG_DST, dst},
                                            {DNNL_ARG_SCRATCHPAD, scratch}};
    if (layer.has_bias) args[DNNL_ARG_BIAS] = layer.bias;
    // Outside ATen's operators: counted as aten::convolution would count it.
    record_macs("dynattn::onednn_conv", layer.macs);
    layer.primitive.execute(stream, args);
    current = dst;
    current_buf = dst_buf;
  }
  const memory::desc out_desc(to_dims(plan.output_sizes), memory::data_type::f32, Tag::nchw);
  if (current.get_desc() == out_desc) {
    stream.wait();
    return current_buf.view(torch::kFloat)
        .narrow(0, 0, out_desc.get_size() / sizeof(float))
        .view(plan.output_sizes);
  }
  auto out = torch::empty(plan.output_sizes, x.options());
  memory result(out_desc, engine, out.data_ptr());
  dnnl::reorder(current, result).execute(stream, current, result);
  stream.wait();
  return out;
}

torch::Tensor OnednnConvStack::forward(const std::vector<const torch::nn::Conv2dImpl*>& convs,
                                       const torch::Tensor& input) {
  auto out = try_forward(convs, input);
  TORCH_CHECK(out.defined(), "OnednnConvStack: ", refusal());
  return out;
}

torch::Tensor OnednnConvStack::try_forward(const std::vector<const torch::nn::Conv2dImpl*>& convs,
                                           const torch::Tensor& input) {
  TORCH_CHECK(!convs.empty(), "OnednnConvStack: no layers");
  TORCH_CHECK(supports(convs),
              "OnednnConvStack: every conv needs zero padding given as numbers and float CPU "
              "weights");
  TORCH_CHECK(input.dim() == 4 && input.is_cpu() && input.scalar_type() == torch::kFloat &&
                  input.layout() == torch::kStrided,
              "OnednnConvStack: expected a dense float CPU tensor [N, C, H, W], got ",
              input.sizes(), " ", input.scalar_type(), " on ", input.device());
  TORCH_CHECK(input.numel() > 0, "OnednnConvStack: empty input ", input.sizes());
  TORCH_CHECK(input.size(1) == convs.front()->options.in_channels(),
              "OnednnConvStack: layer 0 expects ", convs.front()->options.in_channels(),
              " input channels, got ", input.sizes());
  const bool channels_last =
      input.is_contiguous(torch::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  const auto x = input.contiguous(channels_last ? torch::MemoryFormat::ChannelsLast
                                                : torch::MemoryFormat::Contiguous);
  std::vector<Stamp> stamps;
  bool cacheable = true;
  for (const auto* conv : convs) {
    stamps.push_back(stamp_of(conv->weight));
    stamps.push_back(stamp_of(conv->bias));
    cacheable = cacheable && !conv->weight.is_inference() &&
                !(conv->bias.defined() && conv->bias.is_inference());
  }

  std::shared_ptr<Plan> plan;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& p : plans_)
      if (p->matches(x, channels_last, stamps)) plan = p;
    if (!plan) {
      plan = std::make_shared<Plan>();
      plan->input_sizes = x.sizes().vec();
      plan->channels_last = channels_last;
      plan->stamps = stamps;
      try {
        build(*plan, convs, cacheable);
      } catch (const dnnl::error& e) {
        TORCH_CHECK(false, "OnednnConvStack: oneDNN refused the layers for input ", x.sizes(), ": ",
                    e.what());
      }
      if (cacheable) {
        // Plans for other weights are stale; other shapes stay (batch 1 and 64 alternate).
        plans_.erase(std::remove_if(plans_.begin(), plans_.end(),
                                    [&](const auto& p) { return !(p->stamps == stamps); }),
                     plans_.end());
        if (plans_.size() >= 8) plans_.erase(plans_.begin());
        plans_.push_back(plan);
      }
    }
    last_ = plan;
  }
  if (!plan->refused.empty()) return {};
  try {
    return run(*plan, x);
  } catch (const dnnl::error& e) {
    TORCH_CHECK(false, "OnednnConvStack: oneDNN failed on input ", x.sizes(), ": ", e.what());
  }
}

std::string OnednnConvStack::refusal() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_ ? last_->refused : std::string();
}

std::vector<std::string> OnednnConvStack::implementations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> out;
  if (last_)
    for (const auto& layer : last_->layers) out.push_back(layer.implementation);
  return out;
}

#endif

}  // namespace dynattn
