#include "dynattn/attention/non_local.h"

#include <algorithm>
#include <cmath>

namespace dynattn {
namespace {

constexpr const char* kModule = "NonLocalBlock";

torch::nn::AnyModule make_conv(int64_t dims, int64_t in, int64_t out) {
  switch (dims) {
    case 1:
      return torch::nn::AnyModule(torch::nn::Conv1d(torch::nn::Conv1dOptions(in, out, 1)));
    case 2:
      return torch::nn::AnyModule(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 1)));
    default:
      return torch::nn::AnyModule(torch::nn::Conv3d(torch::nn::Conv3dOptions(in, out, 1)));
  }
}

torch::nn::AnyModule make_batch_norm(int64_t dims, int64_t channels) {
  switch (dims) {
    case 1:
      return torch::nn::AnyModule(torch::nn::BatchNorm1d(channels));
    case 2:
      return torch::nn::AnyModule(torch::nn::BatchNorm2d(channels));
    default:
      return torch::nn::AnyModule(torch::nn::BatchNorm3d(channels));
  }
}

// The paper's video models pool space only (1x2x2), keeping every frame as a key.
torch::Tensor subsample_pool(const torch::Tensor& t, int64_t dims) {
  switch (dims) {
    case 1:
      return torch::max_pool1d(t, {2}, {2});
    case 2:
      return torch::max_pool2d(t, {2, 2}, {2, 2});
    default:
      return torch::max_pool3d(t, {1, 2, 2}, {1, 2, 2});
  }
}

// timm's make_divisible(v, divisor): round to the nearest multiple, at least `divisor`, and
// never more than 10% below v.
int64_t make_divisible(double v, int64_t divisor) {
  int64_t rounded = std::max(divisor, static_cast<int64_t>(v + divisor / 2.0) / divisor * divisor);
  if (rounded < 0.9 * v) rounded += divisor;
  return rounded;
}

}  // namespace

NonLocalOptions timm_non_local_options(int64_t channels) {
  return NonLocalOptions(channels)
      .inter_channels(make_divisible(channels / 8.0, 8))
      .dims(2)
      .mode("embedded")
      .subsample(false)
      .scale("channels");
}

// What forward needs once per input: the query side (theta, scaled) and the key side (phi, g).
struct NonLocalBlockImpl::Projections {
  torch::Tensor theta;        // [N, D, Q], logit scale (or 1/keys for dot) folded in
  torch::Tensor phi;          // [N, D, K]
  torch::Tensor g;            // [N, inter, K]
  torch::Tensor concat_rows;  // concat: w_theta^T theta_i / K, [N, Q, 1]
  torch::Tensor concat_keys;  // concat: w_phi^T phi_j / K, [N, 1, K]
};

NonLocalBlockImpl::NonLocalBlockImpl(NonLocalOptions options_) : options(std::move(options_)) {
  reset();
}

void NonLocalBlockImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.channels() > 0, kModule, ": channels must be positive, got ", o.channels());
  TORCH_CHECK(o.dims() >= 1 && o.dims() <= 3, kModule, ": dims must be 1, 2 or 3, got ", o.dims());
  const std::string& m = o.mode();
  if (m == "embedded" || m == "embedded_gaussian") {
    mode_ = Mode::Embedded;
  } else if (m == "gaussian") {
    mode_ = Mode::Gaussian;
  } else if (m == "dot" || m == "dot_product") {
    mode_ = Mode::Dot;
  } else if (m == "concat" || m == "concatenation") {
    mode_ = Mode::Concat;
  } else {
    TORCH_CHECK(false, kModule, ": mode must be embedded, gaussian, dot or concat, got '", m, "'");
  }
  if (o.inter_channels().has_value()) {
    inter_ = *o.inter_channels();
    TORCH_CHECK(inter_ > 0, kModule, ": inter_channels must be positive, got ", inter_);
  } else {
    TORCH_CHECK(o.inter_ratio() > 0, kModule, ": inter_ratio must be positive, got ",
                o.inter_ratio());
    inter_ = static_cast<int64_t>(std::floor(o.channels() * o.inter_ratio()));
    TORCH_CHECK(inter_ > 0, kModule, ": inter channels must be positive, got ", inter_, " = floor(",
                o.channels(), " * ", o.inter_ratio(), ")");
  }
  TORCH_CHECK(o.max_affinity_elements() > 0, kModule,
              ": max_affinity_elements must be positive, got ", o.max_affinity_elements());

  const bool softmax = mode_ == Mode::Embedded || mode_ == Mode::Gaussian;
  const std::string& s = o.scale();
  if (s == "auto") {
    logit_scale_ = mode_ == Mode::Embedded ? 1.0 / std::sqrt(static_cast<double>(inter_)) : 1.0;
  } else if (s == "none") {
    logit_scale_ = 1.0;
  } else if (s == "inter" || s == "channels") {
    TORCH_CHECK(softmax, kModule, ": scale '", s,
                "' applies to the softmax modes (embedded, gaussian) only, got mode '", m, "'");
    logit_scale_ = 1.0 / std::sqrt(static_cast<double>(s == "inter" ? inter_ : o.channels()));
  } else {
    TORCH_CHECK(false, kModule, ": scale must be auto, none, inter or channels, got '", s, "'");
  }

  const int64_t c = o.channels();
  theta = phi = torch::nn::AnyModule();
  if (mode_ != Mode::Gaussian) {
    theta = make_conv(o.dims(), c, inter_);
    phi = make_conv(o.dims(), c, inter_);
    register_module("theta", theta.ptr());
    register_module("phi", phi.ptr());
  }
  g = make_conv(o.dims(), c, inter_);
  register_module("g", g.ptr());
  z = make_conv(o.dims(), inter_, c);
  register_module("z", z.ptr());
  bn = make_batch_norm(o.dims(), c);
  register_module("bn", bn.ptr());
  concat_project = nullptr;
  if (mode_ == Mode::Concat) {
    concat_project =
        register_module("concat_project",
                        torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * inter_, 1, 1).bias(false)));
  }

  // The official code's init: convs N(0, 0.01) with zero bias; BN gamma 0 makes the block the
  // identity at the start, so it can be inserted into a pretrained network.
  torch::NoGradGuard no_grad;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    const std::string& name = p.key();
    if (name.rfind("bn.", 0) == 0) {
      p.value().zero_();
    } else if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      p.value().zero_();
    } else {
      p.value().normal_(0.0, 0.01);
    }
  }
}

NonLocalBlockImpl::Projections NonLocalBlockImpl::project(const torch::Tensor& x) {
  const int64_t dims = options.dims();
  if (options.subsample()) {
    for (int64_t d = x.dim() - std::min<int64_t>(dims, 2); d < x.dim(); ++d) {
      TORCH_CHECK(x.size(d) >= 2, kModule, ": sub-sampling halves the last ",
                  std::min<int64_t>(dims, 2),
                  " dimension(s); expected each of them >= 2, got input ", x.sizes());
    }
  }
  Projections p;
  const auto keys_in = options.subsample() && options.pool_first() ? subsample_pool(x, dims) : x;
  auto key_projection = [&](torch::nn::AnyModule& conv) {
    auto out = conv.forward(keys_in);
    if (options.subsample() && !options.pool_first()) out = subsample_pool(out, dims);
    return out.flatten(2);
  };
  p.g = key_projection(g);
  const int64_t keys = p.g.size(2);
  switch (mode_) {
    case Mode::Gaussian:
      // f = exp(x_i^T x_j) on the input itself; max-pooling commutes with the identity.
      p.theta = x.flatten(2);
      p.phi = (options.subsample() ? subsample_pool(x, dims) : x).flatten(2);
      break;
    case Mode::Embedded:
    case Mode::Dot:
      p.theta = theta.forward(x).flatten(2);
      p.phi = key_projection(phi);
      break;
    case Mode::Concat: {
      // w^T [theta_i; phi_j] = w_t^T theta_i + w_p^T phi_j: two projections and a broadcast sum
      // instead of materialising the [2*inter, Q, K] concatenation.
      const auto w = concat_project->weight.view({2, inter_});
      const double inv_keys = 1.0 / static_cast<double>(keys);
      p.theta = theta.forward(x).flatten(2);
      p.phi = key_projection(phi);
      p.concat_rows = torch::matmul(p.theta.transpose(1, 2), w[0]).unsqueeze(2).mul(inv_keys);
      p.concat_keys = torch::matmul(w[1], p.phi).unsqueeze(1).mul(inv_keys);
      return p;
    }
  }
  // Folding the factor into theta costs N*D*Q multiplications instead of N*Q*K.
  const double factor = mode_ == Mode::Dot ? 1.0 / static_cast<double>(keys) : logit_scale_;
  if (factor != 1.0) p.theta = p.theta * factor;
  return p;
}

// Rows f(x_i, .)/C(x) for the queries given as theta columns [N, D, q] (concat: rows [N, q, 1]).
torch::Tensor NonLocalBlockImpl::affinity_rows(const Projections& p,
                                               const torch::Tensor& theta_rows,
                                               const torch::Tensor& concat_rows) const {
  switch (mode_) {
    case Mode::Gaussian:
    case Mode::Embedded:
      return torch::softmax(torch::bmm(theta_rows.transpose(1, 2), p.phi), -1);
    case Mode::Dot:
      return torch::bmm(theta_rows.transpose(1, 2), p.phi);
    case Mode::Concat:
    default:
      return torch::relu(concat_rows + p.concat_keys);
  }
}

torch::Tensor NonLocalBlockImpl::run(const torch::Tensor& x, AttentionMaps* maps) {
  check_attention_input(kModule, x, options.channels(), options.dims());
  const Projections p = project(x);
  const int64_t batch = x.size(0);
  const int64_t queries = p.theta.size(2);
  const int64_t keys = p.g.size(2);
  const bool concat = mode_ == Mode::Concat;

  // y^T = g a^T: [N, inter, K] x [N, K, q] lands in [N, inter, Q] layout without a transpose.
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, options.max_affinity_elements() / std::max<int64_t>(1, batch * keys));
  torch::Tensor y;
  if (rows_per_chunk >= queries) {
    y = torch::bmm(p.g, affinity_rows(p, p.theta, p.concat_rows).transpose(1, 2));
  } else {
    std::vector<torch::Tensor> parts;
    for (int64_t start = 0; start < queries; start += rows_per_chunk) {
      const int64_t rows = std::min(rows_per_chunk, queries - start);
      const auto a = affinity_rows(p, p.theta.narrow(2, start, rows),
                                   concat ? p.concat_rows.narrow(1, start, rows) : torch::Tensor());
      parts.push_back(torch::bmm(p.g, a.transpose(1, 2)));
    }
    y = torch::cat(parts, 2);
  }
  auto spatial = x.sizes().vec();
  spatial[1] = inter_;
  auto out = bn.forward(z.forward(y.view(spatial)));
  // In place is safe: BN's backward does not need its output.
  out.add_(x);

  if (maps != nullptr) {
    std::vector<int64_t> selected = options.map_queries();
    if (selected.empty()) {
      int64_t centre = 0;
      for (int64_t d = 2; d < x.dim(); ++d) centre = centre * x.size(d) + x.size(d) / 2;
      selected.push_back(centre);
    }
    for (int64_t q : selected) {
      TORCH_CHECK(q >= 0 && q < queries, kModule, ": map query ", q, " is outside [0, ", queries,
                  ") for input ", x.sizes());
    }
    const auto index =
        torch::tensor(selected, torch::TensorOptions().dtype(torch::kLong)).to(x.device());
    (*maps)["affinity"] =
        affinity_rows(p, p.theta.index_select(2, index),
                      concat ? p.concat_rows.index_select(1, index) : torch::Tensor());
  }
  return out;
}

torch::Tensor NonLocalBlockImpl::forward(const torch::Tensor& x) {
  return run(x, nullptr);
}

AttentionOutput NonLocalBlockImpl::forward_with_maps(const torch::Tensor& x) {
  AttentionOutput result;
  result.output = run(x, &result.maps);
  return result;
}

void NonLocalBlockImpl::pretty_print(std::ostream& stream) const {
  static const char* const kModes[] = {"gaussian", "embedded", "dot", "concat"};
  stream << "dynattn::NonLocalBlock(channels=" << options.channels() << ", inter=" << inter_
         << ", dims=" << options.dims() << ", mode=" << kModes[static_cast<int>(mode_)]
         << ", subsample=" << (options.subsample() ? "true" : "false")
         << ", pool_first=" << (options.pool_first() ? "true" : "false")
         << ", logit_scale=" << logit_scale_ << ")";
}

AttentionInfo non_local_attention_info() {
  return {"nl",
          "non-local block (Wang et al., CVPR 2018); options mode=embedded|gaussian|dot|concat, "
          "inter (default C/2) or ratio, subsample=1, pool_first=1, "
          "scale=auto|none|inter|channels, dims=2, max_affinity=16777216",
          [](int64_t channels, const OptionMap& o) {
            o.check_known({"mode", "inter", "ratio", "subsample", "pool_first", "scale", "dims",
                           "max_affinity"});
            TORCH_CHECK(!(o.has("inter") && o.has("ratio")), "attention nl: give inter or ratio, ",
                        "not both");
            NonLocalOptions n(channels);
            if (o.has("inter")) n.inter_channels(o.get_int("inter", 0));
            n.inter_ratio(o.get_double("ratio", n.inter_ratio()))
                .mode(o.get_string("mode", n.mode()))
                .subsample(o.get_bool("subsample", n.subsample()))
                .pool_first(o.get_bool("pool_first", n.pool_first()))
                .scale(o.get_string("scale", n.scale()))
                .dims(o.get_int("dims", n.dims()))
                .max_affinity_elements(o.get_int("max_affinity", n.max_affinity_elements()));
            return torch::nn::AnyModule(NonLocalBlock(std::move(n)));
          }};
}

}  // namespace dynattn
