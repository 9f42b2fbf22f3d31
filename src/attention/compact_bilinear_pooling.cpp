#include "dynattn/attention/compact_bilinear_pooling.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace dynattn {
namespace {

// +1 when the top bit is set: the high bits of mt19937_64 are as good as the low ones, and a
// fixed rule (rather than std::uniform_int_distribution, whose algorithm is unspecified) is what
// makes the draws identical across standard libraries.
float sign_of(uint64_t r) {
  return (r >> 63) ? 1.0f : -1.0f;
}

void check_compact_options(const char* module, const CompactBilinearOptions& o) {
  TORCH_CHECK(o.channels() > 0, module, ": channels must be positive, got ", o.channels());
  TORCH_CHECK(o.channels_b() >= 0, module, ": channels_b must be >= 0 (0: = channels), got ",
              o.channels_b());
  TORCH_CHECK(o.dim() > 0, module, ": the output dimension d must be positive, got ", o.dim());
  TORCH_CHECK(o.seed() >= 0, module, ": seed must be >= 0, got ", o.seed());
  check_bilinear_normalization(module, o.normalization());
  TORCH_CHECK(o.sketch_algorithm() == "auto" || o.sketch_algorithm() == "gram" ||
                  o.sketch_algorithm() == "fft",
              module, ": sketch_algorithm must be 'auto', 'gram' or 'fft', got '",
              o.sketch_algorithm(), "'");
}

int64_t channels_b_of(const CompactBilinearOptions& o) {
  return o.channels_b() > 0 ? o.channels_b() : o.channels();
}

// Validates a (and b when given) and returns both as [N, C, H*W].
std::pair<torch::Tensor, torch::Tensor> flatten_streams(const char* module,
                                                        const CompactBilinearOptions& o,
                                                        const torch::Tensor& a,
                                                        const torch::Tensor& b) {
  check_attention_input(module, a, o.channels());
  const int64_t n = a.size(0), hw = a.size(2) * a.size(3);
  const auto fa = a.reshape({n, a.size(1), hw});
  if (!b.defined()) {
    TORCH_CHECK(channels_b_of(o) == o.channels(), module,
                ": forward(x) is the symmetric form and needs channels_b = channels (",
                o.channels(), "), got channels_b = ", o.channels_b(),
                "; pass the second stream as forward(a, b)");
    return {fa, torch::Tensor()};
  }
  check_attention_input(module, b, channels_b_of(o));
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), module,
              ": the two streams must have the same N, H and W, got ", a.sizes(), " and ",
              b.sizes());
  return {fa, b.reshape({n, b.size(1), hw})};
}

torch::Tensor from_vector(const std::vector<float>& v, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<float*>(v.data()), shape, torch::kFloat).clone();
}

torch::Tensor from_vector(const std::vector<int64_t>& v) {
  return torch::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                          torch::kLong)
      .clone();
}

}  // namespace

SketchDraws draw_count_sketches(int64_t channels_a, int64_t channels_b, int64_t dim,
                                uint64_t seed) {
  TORCH_CHECK(channels_a > 0 && channels_b > 0 && dim > 0,
              "draw_count_sketches: channels and dim must be positive, got ", channels_a, ", ",
              channels_b, ", ", dim);
  std::mt19937_64 engine(seed);
  const auto d = static_cast<uint64_t>(dim);
  SketchDraws out;
  auto hashes = [&](int64_t c, std::vector<int64_t>& h) {
    for (int64_t i = 0; i < c; ++i) h.push_back(static_cast<int64_t>(engine() % d));
  };
  auto signs = [&](int64_t c, std::vector<float>& s) {
    for (int64_t i = 0; i < c; ++i) s.push_back(sign_of(engine()));
  };
  hashes(channels_a, out.h1);
  signs(channels_a, out.s1);
  hashes(channels_b, out.h2);
  signs(channels_b, out.s2);
  return out;
}

std::pair<std::vector<float>, std::vector<float>> draw_rademacher(int64_t channels_a,
                                                                  int64_t channels_b, int64_t dim,
                                                                  uint64_t seed) {
  TORCH_CHECK(channels_a > 0 && channels_b > 0 && dim > 0,
              "draw_rademacher: channels and dim must be positive, got ", channels_a, ", ",
              channels_b, ", ", dim);
  // All 64 bits of each draw, most significant first, over w1 then w2: a d x C matrix needs
  // d*C/64 draws, which keeps constructing a d = 8192 module cheap.
  std::mt19937_64 engine(seed);
  const size_t size_a = static_cast<size_t>(dim * channels_a);
  std::vector<float> all(size_a + static_cast<size_t>(dim * channels_b));
  for (size_t i = 0; i < all.size(); i += 64) {
    const uint64_t bits = engine();
    const size_t count = std::min<size_t>(64, all.size() - i);
    for (size_t k = 0; k < count; ++k) all[i + k] = ((bits >> (63 - k)) & 1u) ? 1.0f : -1.0f;
  }
  return {std::vector<float>(all.begin(), all.begin() + size_a),
          std::vector<float>(all.begin() + size_a, all.end())};
}

// ---- Tensor Sketch ----

TensorSketchPoolingImpl::TensorSketchPoolingImpl(CompactBilinearOptions options_)
    : options(std::move(options_)) {
  reset();
}

void TensorSketchPoolingImpl::reset() {
  check_compact_options("TensorSketchPooling", options);
  const auto draws = draw_count_sketches(options.channels(), channels_b_of(options), options.dim(),
                                         static_cast<uint64_t>(options.seed()));
  h1 = register_buffer("h1", from_vector(draws.h1));
  s1 = register_buffer("s1", from_vector(draws.s1, {options.channels()}));
  h2 = register_buffer("h2", from_vector(draws.h2));
  s2 = register_buffer("s2", from_vector(draws.s2, {channels_b_of(options)}));
}

std::string TensorSketchPoolingImpl::algorithm() const {
  const auto& requested = options.sketch_algorithm();
  if (requested != "auto") return requested;
  const int64_t d = options.dim();
  int64_t log2d = 0;
  while ((int64_t{1} << log2d) < d) ++log2d;
  return options.channels() * channels_b_of(options) <= 4 * d * std::max<int64_t>(log2d, 1) ? "gram"
                                                                                            : "fft";
}

torch::Tensor TensorSketchPoolingImpl::pool(const torch::Tensor& a, const torch::Tensor& b) {
  const auto streams = flatten_streams("TensorSketchPooling", options, a, b);
  const auto& fa = streams.first;
  const auto fb = streams.second.defined() ? streams.second : fa;
  auto pooled = algorithm() == "gram" ? pool_gram(fa, fb) : pool_fft(fa, fb);
  if (options.average()) pooled = pooled / static_cast<double>(fa.size(2));
  return pooled;
}

torch::Tensor TensorSketchPoolingImpl::pool_fft(const torch::Tensor& fa, const torch::Tensor& fb) {
  const int64_t n = fa.size(0), hw = fa.size(2), d = options.dim();
  // Count sketch of every location at once: [N,C,HW] -> [N,d,HW], channel i added into bin
  // h(i) with sign s(i). The hashes may have been cast with the module's dtype: read as int64.
  auto sketch = [&](const torch::Tensor& f, const torch::Tensor& h, const torch::Tensor& s) {
    const auto signs = s.to(f.options()).view({1, -1, 1});
    return torch::zeros({n, d, hw}, f.options())
        .index_add(1, h.to(f.device(), torch::kLong), f * signs);
  };
  const auto f1 = torch::fft::rfft(sketch(fa, h1, s1), d, /*dim=*/1);
  const auto f2 = torch::fft::rfft(sketch(fb, h2, s2), d, /*dim=*/1);
  // Pool in the frequency domain: irfft is linear, so one inverse transform per sample.
  return torch::fft::irfft((f1 * f2).sum(2), d, /*dim=*/1);
}

torch::Tensor TensorSketchPoolingImpl::pool_gram(const torch::Tensor& fa, const torch::Tensor& fb) {
  const int64_t n = fa.size(0), d = options.dim();
  const auto phi = torch::bmm(fa, fb.transpose(1, 2)).reshape({n, -1});  // [N, Ca*Cb]
  const auto long_opts = torch::TensorOptions().dtype(torch::kLong).device(fa.device());
  const auto bins =
      (h1.to(long_opts).unsqueeze(1) + h2.to(long_opts).unsqueeze(0)).remainder(d).view({1, -1});
  const auto signs =
      (s1.to(fa.options()).unsqueeze(1) * s2.to(fa.options()).unsqueeze(0)).view({1, -1});
  // scatter_add runs one pass over all N*Ca*Cb entries (index_add would loop over Ca*Cb slices).
  return torch::zeros({n, d}, fa.options()).scatter_add(1, bins.expand({n, -1}), phi * signs);
}

namespace {
// The normalised sketch as output, the raw pooled sketch as the map "sketch".
AttentionOutput with_sketch_map(const torch::Tensor& pooled, const BilinearNormalization& norm) {
  AttentionOutput result;
  result.maps["sketch"] = pooled;
  result.output = normalize_bilinear(pooled, norm);
  return result;
}
}  // namespace

torch::Tensor TensorSketchPoolingImpl::forward(const torch::Tensor& a, const torch::Tensor& b) {
  return normalize_bilinear(pool(a, b), options.normalization());
}

AttentionOutput TensorSketchPoolingImpl::forward_with_maps(const torch::Tensor& a,
                                                           const torch::Tensor& b) {
  return with_sketch_map(pool(a, b), options.normalization());
}

void TensorSketchPoolingImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::TensorSketchPooling(channels=" << options.channels();
  if (options.channels_b() > 0) stream << ", channels_b=" << options.channels_b();
  stream << ", d=" << options.dim() << ", seed=" << options.seed()
         << ", average=" << options.average() << ", algorithm=" << algorithm() << ")";
}

// ---- Random Maclaurin ----

RandomMaclaurinPoolingImpl::RandomMaclaurinPoolingImpl(CompactBilinearOptions options_)
    : options(std::move(options_)) {
  reset();
}

void RandomMaclaurinPoolingImpl::reset() {
  check_compact_options("RandomMaclaurinPooling", options);
  TORCH_CHECK(options.sketch_algorithm() == "auto",
              "RandomMaclaurinPooling: sketch_algorithm applies to Tensor Sketch only, got '",
              options.sketch_algorithm(), "'");
  const int64_t cb = channels_b_of(options);
  const auto draws =
      draw_rademacher(options.channels(), cb, options.dim(), static_cast<uint64_t>(options.seed()));
  w1 = register_buffer("w1", from_vector(draws.first, {options.dim(), options.channels()}));
  w2 = register_buffer("w2", from_vector(draws.second, {options.dim(), cb}));
}

torch::Tensor RandomMaclaurinPoolingImpl::pool(const torch::Tensor& a, const torch::Tensor& b) {
  const auto streams = flatten_streams("RandomMaclaurinPooling", options, a, b);
  const int64_t n = a.size(0), hw = streams.first.size(2), d = options.dim();
  // Locations as rows, [N*HW, C], so each projection is one matrix product.
  auto rows = [&](const torch::Tensor& f) { return f.transpose(1, 2).reshape({n * hw, -1}); };
  torch::Tensor p1, p2;
  if (!streams.second.defined()) {
    // One product with [W1; W2] for the symmetric form.
    const auto w = torch::cat({w1, w2}).to(a.options());
    const auto p = torch::mm(rows(streams.first), w.t());
    p1 = p.narrow(1, 0, d);
    p2 = p.narrow(1, d, d);
  } else {
    p1 = torch::mm(rows(streams.first), w1.to(a.options()).t());
    p2 = torch::mm(rows(streams.second), w2.to(a.options()).t());
  }
  auto pooled = (p1 * p2).view({n, hw, d}).sum(1);
  const double scale =
      (options.average() ? 1.0 / static_cast<double>(hw) : 1.0) / std::sqrt(static_cast<double>(d));
  return pooled * scale;
}

torch::Tensor RandomMaclaurinPoolingImpl::forward(const torch::Tensor& a, const torch::Tensor& b) {
  return normalize_bilinear(pool(a, b), options.normalization());
}

AttentionOutput RandomMaclaurinPoolingImpl::forward_with_maps(const torch::Tensor& a,
                                                              const torch::Tensor& b) {
  return with_sketch_map(pool(a, b), options.normalization());
}

void RandomMaclaurinPoolingImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::RandomMaclaurinPooling(channels=" << options.channels();
  if (options.channels_b() > 0) stream << ", channels_b=" << options.channels_b();
  stream << ", d=" << options.dim() << ", seed=" << options.seed()
         << ", average=" << options.average() << ")";
}

}  // namespace dynattn
