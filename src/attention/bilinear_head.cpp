#include "dynattn/attention/bilinear_head.h"

#include "dynattn/core/options_string.h"

namespace dynattn {

BilinearHeadImpl::BilinearHeadImpl(BilinearHeadOptions options_) : options(std::move(options_)) {
  reset();
}

void BilinearHeadImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.channels() > 0 && o.num_classes() > 0,
              "BilinearHead: channels and num_classes must be positive, got ", o.channels(),
              " and ", o.num_classes());
  TORCH_CHECK(o.dropout() >= 0 && o.dropout() < 1, "BilinearHead: dropout must be in [0, 1), got ",
              o.dropout());
  TORCH_CHECK(o.kind() == "tensor_sketch" || o.sketch_algorithm() == "auto",
              "BilinearHead: sketch_algorithm applies to kind 'tensor_sketch' only, got '",
              o.sketch_algorithm(), "'");
  full = nullptr;
  tensor_sketch = nullptr;
  random_maclaurin = nullptr;
  if (o.kind() == "full") {
    full = register_module("pool", BilinearPooling(BilinearPoolingOptions(o.channels())
                                                       .average(o.average())
                                                       .matrix_sqrt(o.matrix_sqrt())
                                                       .matrix_sqrt_norm(o.matrix_sqrt_norm())
                                                       .normalization(o.normalization())));
  } else if (o.kind() == "tensor_sketch" || o.kind() == "random_maclaurin") {
    TORCH_CHECK(o.matrix_sqrt() == 0, "BilinearHead: matrix_sqrt applies to kind 'full' only, got ",
                "kind '", o.kind(), "' with matrix_sqrt=", o.matrix_sqrt());
    const auto compact = CompactBilinearOptions(o.channels(), o.dim())
                             .seed(o.seed())
                             .sketch_algorithm(o.sketch_algorithm())
                             .average(o.average())
                             .normalization(o.normalization());
    if (o.kind() == "tensor_sketch") {
      tensor_sketch = register_module("pool", TensorSketchPooling(compact));
    } else {
      random_maclaurin = register_module("pool", RandomMaclaurinPooling(compact));
    }
  } else {
    TORCH_CHECK(false, "BilinearHead: unknown kind '", o.kind(),
                "' (known: full, tensor_sketch, random_maclaurin)");
  }
  dropout = nullptr;
  if (o.dropout() > 0) dropout = register_module("dropout", torch::nn::Dropout(o.dropout()));
  fc = register_module("fc", torch::nn::Linear(feature_dim(), o.num_classes()));
}

int64_t BilinearHeadImpl::feature_dim() const {
  if (options.kind() == "full") return options.channels() * options.channels();
  return options.dim();
}

AttentionOutput BilinearHeadImpl::pool_with_maps(const torch::Tensor& x) {
  if (!full.is_empty()) return full->forward_with_maps(x);
  if (!tensor_sketch.is_empty()) return tensor_sketch->forward_with_maps(x);
  return random_maclaurin->forward_with_maps(x);
}

torch::Tensor BilinearHeadImpl::features(const torch::Tensor& x) {
  check_attention_input("BilinearHead", x, options.channels());
  if (!full.is_empty()) return full->forward(x);
  if (!tensor_sketch.is_empty()) return tensor_sketch->forward(x);
  return random_maclaurin->forward(x);
}

torch::Tensor BilinearHeadImpl::forward(const torch::Tensor& x) {
  auto f = features(x);
  if (!dropout.is_empty()) f = dropout(f);
  return fc(f);
}

AttentionOutput BilinearHeadImpl::forward_with_maps(const torch::Tensor& x) {
  check_attention_input("BilinearHead", x, options.channels());
  const auto pooled = pool_with_maps(x);
  AttentionOutput result;
  for (const auto& kv : pooled.maps) result.maps["pool." + kv.first] = kv.second;
  result.maps["features"] = pooled.output;
  auto f = pooled.output;
  if (!dropout.is_empty()) f = dropout(f);
  result.output = fc(f);
  return result;
}

void BilinearHeadImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BilinearHead(kind=" << options.kind() << ", channels=" << options.channels()
         << ", features=" << feature_dim() << ", classes=" << options.num_classes() << ")";
}

BilinearHeadOptions parse_bilinear_head(const std::string& spec, int64_t channels,
                                        int64_t num_classes) {
  const NamedOptions parsed = parse_named_options(spec, "bilinear head");
  const auto& kind = parsed.name;
  const auto& m = parsed.options;
  std::vector<std::string> known = {"average",   "signed_sqrt", "sqrt_eps",
                                    "sqrt_form", "l2",          "dropout"};
  if (kind == "full") {
    known.insert(known.end(), {"matrix_sqrt", "matrix_sqrt_norm"});
  } else if (kind == "tensor_sketch" || kind == "random_maclaurin") {
    known.insert(known.end(), {"d", "seed"});
    if (kind == "tensor_sketch") known.push_back("algorithm");
  } else {
    TORCH_CHECK(false, "bilinear head: unknown kind '", kind, "' in '", spec,
                "' (known: full, tensor_sketch, random_maclaurin)");
  }
  m.check_known(known);
  BilinearHeadOptions o(channels, num_classes);
  const BilinearNormalization defaults;
  o.kind(kind)
      .dim(m.get_int("d", o.dim()))
      .seed(m.get_int("seed", o.seed()))
      .sketch_algorithm(m.get_string("algorithm", o.sketch_algorithm()))
      .average(m.get_bool("average", o.average()))
      .matrix_sqrt(m.get_int("matrix_sqrt", o.matrix_sqrt()))
      .matrix_sqrt_norm(m.get_string("matrix_sqrt_norm", o.matrix_sqrt_norm()))
      .dropout(m.get_double("dropout", o.dropout()))
      .normalization(BilinearNormalization()
                         .signed_sqrt(m.get_bool("signed_sqrt", defaults.signed_sqrt()))
                         .sqrt_eps(m.get_double("sqrt_eps", defaults.sqrt_eps()))
                         .sqrt_form(m.get_string("sqrt_form", defaults.sqrt_form()))
                         .l2(m.get_bool("l2", defaults.l2())));
  return o;
}

BilinearHead create_bilinear_head(const std::string& spec, int64_t channels, int64_t num_classes) {
  return BilinearHead(parse_bilinear_head(spec, channels, num_classes));
}

}  // namespace dynattn
