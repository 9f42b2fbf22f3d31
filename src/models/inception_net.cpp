#include "dynattn/models/inception_net.h"

#include <cmath>

namespace dynattn {
namespace {

ConvBn conv_bn(int64_t in, int64_t out, int64_t kernel, int64_t stride, bool deployed) {
  return ConvBn(ConvBnOptions(in, out, kernel).stride(stride).relu(true).deployed(deployed));
}

torch::nn::MaxPool2d max_pool(int64_t stride) {
  return torch::nn::MaxPool2d(torch::nn::MaxPool2dOptions(3).stride(stride).padding(1));
}

// Kaiming-normal (fan_out, ReLU) for convs, BN to (1, 0), as the ResNets here start.
void init_conv_bn(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& sub : m.modules(/*include_self=*/false)) {
    if (auto* conv = sub->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
      if (conv->bias.defined()) conv->bias.zero_();
    } else if (auto* bn = sub->as<torch::nn::BatchNorm2d>()) {
      bn->weight.fill_(1.0);
      bn->bias.zero_();
    }
  }
}

}  // namespace

// ---- Inception module ----

InceptionImpl::InceptionImpl(InceptionOptions options_) : options(std::move(options_)) {
  reset();
}

void InceptionImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.in_channels() > 0 && o.ch1x1() > 0 && o.ch3x3red() > 0 && o.ch3x3() > 0 &&
                  o.ch5x5red() > 0 && o.ch5x5() > 0 && o.pool_proj() > 0,
              "Inception: every channel count must be positive, got in=", o.in_channels(),
              " ch1x1=", o.ch1x1(), " ch3x3red=", o.ch3x3red(), " ch3x3=", o.ch3x3(),
              " ch5x5red=", o.ch5x5red(), " ch5x5=", o.ch5x5(), " pool_proj=", o.pool_proj());
  TORCH_CHECK(o.stride() == 1 || o.stride() == 2, "Inception: stride must be 1 or 2, got ",
              o.stride());
  branch1 = reduce = downsample = branch2 = branch3 = nullptr;
  branch2_seq = branch3_seq = branch4_seq = nullptr;
  const int64_t s = o.stride(), in = o.in_channels();
  const bool d = o.deployed();
  // A branch's last conv absorbs the 3x3/2 pool that followed the module: stride 2 and a kernel
  // that covers the receptive field of conv + pool (k + 2: 1x1 -> 3x3, 3x3 -> 5x5).
  const int64_t k1 = s == 1 ? 1 : 3, k3 = s == 1 ? 3 : 5;
  if (!o.merge_branches()) {
    branch1 = register_module("branch1", conv_bn(in, o.ch1x1(), k1, s, d));
    branch2_seq = register_module(
        "branch2", torch::nn::Sequential(conv_bn(in, o.ch3x3red(), 1, 1, d),
                                         conv_bn(o.ch3x3red(), o.ch3x3(), k3, s, d)));
    branch3_seq = register_module(
        "branch3", torch::nn::Sequential(conv_bn(in, o.ch5x5red(), 1, 1, d),
                                         conv_bn(o.ch5x5red(), o.ch5x5(), k3, s, d)));
    branch4_seq = register_module(
        "branch4", torch::nn::Sequential(max_pool(1), conv_bn(in, o.pool_proj(), k1, s, d)));
  } else if (s == 1) {
    reduce = register_module(
        "reduce", conv_bn(in, o.ch1x1() + o.ch3x3red() + o.ch5x5red() + o.pool_proj(), 1, 1, d));
    branch2 = register_module("branch2", conv_bn(o.ch3x3red(), o.ch3x3(), 3, 1, d));
    branch3 = register_module("branch3", conv_bn(o.ch5x5red(), o.ch5x5(), 3, 1, d));
  } else {
    reduce = register_module("reduce", conv_bn(in, o.ch3x3red() + o.ch5x5red(), 1, 1, d));
    downsample = register_module("downsample", conv_bn(in, o.ch1x1() + o.pool_proj(), k1, 2, d));
    branch2 = register_module("branch2", conv_bn(o.ch3x3red(), o.ch3x3(), k3, 2, d));
    branch3 = register_module("branch3", conv_bn(o.ch5x5red(), o.ch5x5(), k3, 2, d));
  }
}

torch::Tensor InceptionImpl::forward(const torch::Tensor& x) {
  const auto& o = options;
  TORCH_CHECK(x.dim() == 4 && x.size(1) == o.in_channels(), "Inception: expected input [N, ",
              o.in_channels(), ", H, W], got ", x.sizes());
  if (!o.merge_branches()) {
    return torch::cat(
        {branch1(x), branch2_seq->forward(x), branch3_seq->forward(x), branch4_seq->forward(x)}, 1);
  }
  const auto r = reduce(x);
  if (o.stride() == 1) {
    const int64_t c1 = o.ch1x1(), c2 = o.ch3x3red(), c3 = o.ch5x5red();
    return torch::cat({r.narrow(1, 0, c1), branch2(r.narrow(1, c1, c2)),
                       branch3(r.narrow(1, c1 + c2, c3)), r.narrow(1, c1 + c2 + c3, o.pool_proj())},
                      1);
  }
  const auto wide = downsample(x);
  return torch::cat(
      {wide.narrow(1, 0, o.ch1x1()), branch2(r.narrow(1, 0, o.ch3x3red())),
       branch3(r.narrow(1, o.ch3x3red(), o.ch5x5red())), wide.narrow(1, o.ch1x1(), o.pool_proj())},
      1);
}

std::vector<std::string> InceptionImpl::reparameterize() {
  options.deployed(true);
  return {};
}

void InceptionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  stream << "dynattn::Inception(" << o.in_channels() << ", " << o.ch1x1() << ", " << o.ch3x3red()
         << ", " << o.ch3x3() << ", " << o.ch5x5red() << ", " << o.ch5x5() << ", " << o.pool_proj();
  if (o.stride() != 1) stream << ", stride=" << o.stride();
  if (o.merge_branches()) stream << ", merged branches";
  if (o.deployed()) stream << ", deployed";
  stream << ")";
}

// ---- the network ----

std::string InceptionNetOptions::merge_name() const {
  if (streamline_ && merge_branches_) return "all";
  if (streamline_) return "streamline";
  if (merge_branches_) return "branch";
  return "none";
}

InceptionNetOptions& InceptionNetOptions::merge(const std::string& name) {
  TORCH_CHECK(name == "none" || name == "streamline" || name == "branch" || name == "all",
              "InceptionNet: merge must be none, streamline, branch or all, got '", name, "'");
  streamline_ = name == "streamline" || name == "all";
  merge_branches_ = name == "branch" || name == "all";
  return *this;
}

const std::vector<std::string>& InceptionNetImpl::stage_names() {
  static const std::vector<std::string> names = {"conv1", "inception3a", "inception3b",
                                                 "inception4a", "inception4b"};
  return names;
}

InceptionNetImpl::InceptionNetImpl(InceptionNetOptions options_) : options(std::move(options_)) {
  reset();
}

void InceptionNetImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.width() > 0, "InceptionNet: width must be positive, got ", o.width());
  TORCH_CHECK(o.in_channels() > 0 && o.num_classes() > 0,
              "InceptionNet: in_channels and num_classes must be positive, got ", o.in_channels(),
              " and ", o.num_classes());
  auto w = [&](int64_t c) {
    return std::max<int64_t>(1, static_cast<int64_t>(std::lround(c * o.width())));
  };
  const bool d = o.deployed(), s = o.streamline(), m = o.merge_branches();
  maxpool1 = maxpool3 = nullptr;
  // Streamlined, conv1 absorbs maxpool1: 5x5 stride 2 covers the receptive field of both.
  conv1 = register_module("conv1", conv_bn(o.in_channels(), w(192), s ? 5 : 3, s ? 2 : 1, d));
  if (!s) maxpool1 = register_module("maxpool1", max_pool(2));
  auto module = [&](const std::string& name, int64_t in, std::vector<int64_t> c, int64_t stride) {
    return register_module(
        name, Inception(InceptionOptions(in, w(c[0]), w(c[1]), w(c[2]), w(c[3]), w(c[4]), w(c[5]))
                            .stride(stride)
                            .merge_branches(m)
                            .deployed(d)));
  };
  // torchvision's widths of inception3a, 3b, 4a, 4b.
  inception3a = module("inception3a", w(192), {64, 96, 128, 16, 32, 32}, 1);
  inception3b = module("inception3b", inception3a->options.out_channels(),
                       {128, 128, 192, 32, 96, 64}, s ? 2 : 1);
  if (!s) maxpool3 = register_module("maxpool3", max_pool(2));
  inception4a =
      module("inception4a", inception3b->options.out_channels(), {192, 96, 208, 16, 48, 64}, 1);
  inception4b =
      module("inception4b", inception4a->options.out_channels(), {160, 112, 224, 24, 64, 64}, 1);
  fc = register_module("fc",
                       torch::nn::Linear(inception4b->options.out_channels(), o.num_classes()));
  init_conv_bn(*this);
}

torch::Tensor InceptionNetImpl::stage(int64_t index, const torch::Tensor& x) {
  switch (index) {
    case 0: {
      TORCH_CHECK(x.dim() == 4 && x.size(1) == options.in_channels(),
                  "InceptionNet: expected input [N, ", options.in_channels(), ", H, W], got ",
                  x.sizes());
      auto y = conv1(x);
      return maxpool1.is_empty() ? y : maxpool1(y);
    }
    case 1:
      return inception3a(x);
    case 2: {
      auto y = inception3b(x);
      return maxpool3.is_empty() ? y : maxpool3(y);
    }
    case 3:
      return inception4a(x);
    case 4:
      return inception4b(x);
    default:
      TORCH_CHECK(false, "InceptionNet: stage index must be in [0, ", kNumStages, "), got ", index);
  }
}

std::vector<torch::Tensor> InceptionNetImpl::stage_outputs(const torch::Tensor& x) {
  std::vector<torch::Tensor> out;
  auto y = x;
  for (int64_t i = 0; i < kNumStages; ++i) out.push_back(y = stage(i, y));
  return out;
}

torch::Tensor InceptionNetImpl::head(const torch::Tensor& features) {
  return fc(features.mean({2, 3}));
}

torch::Tensor InceptionNetImpl::forward(const torch::Tensor& x) {
  auto y = x;
  for (int64_t i = 0; i < kNumStages; ++i) y = stage(i, y);
  return head(y);
}

std::vector<std::shared_ptr<torch::nn::Module>> InceptionNetImpl::stage_modules(
    int64_t index) const {
  switch (index) {
    case 0:
      return {conv1.ptr()};
    case 1:
      return {inception3a.ptr()};
    case 2:
      return {inception3b.ptr()};
    case 3:
      return {inception4a.ptr()};
    case 4:
      return {inception4b.ptr()};
    default:
      TORCH_CHECK(false, "InceptionNet: stage index must be in [0, ", kNumStages, "), got ", index);
  }
}

std::vector<std::string> InceptionNetImpl::reparameterize() {
  options.deployed(true);
  return {};
}

std::vector<Inception> InceptionNetImpl::modules_in_order() const {
  return {inception3a, inception3b, inception4a, inception4b};
}

}  // namespace dynattn
