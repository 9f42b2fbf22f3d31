#include "dynattn/viz/attention_sheet.h"

#include <cmath>

namespace dynattn {
namespace {

// Per-sample min-max normalisation of [N, ...] to [0,1]; constant samples become 0.
torch::Tensor normalise_per_sample(const torch::Tensor& x) {
  const auto flat = x.reshape({x.size(0), -1}).to(torch::kFloat);
  const auto lo = std::get<0>(flat.min(1, true));
  const auto hi = std::get<0>(flat.max(1, true));
  const auto range = (hi - lo).clamp_min(1e-12);
  return ((flat - lo) / range).reshape(x.sizes());
}

}  // namespace

torch::Tensor jet_colormap(const torch::Tensor& values) {
  const auto v = values.to(torch::kFloat).clamp(0.0, 1.0);
  // The piecewise-linear jet: each channel is a tent centred at 0.75 (R), 0.5 (G), 0.25 (B).
  auto tent = [&](double centre) { return (1.5 - (4.0 * v - 4.0 * centre).abs()).clamp(0.0, 1.0); };
  return torch::stack({tent(0.75), tent(0.5), tent(0.25)}, -1).mul(255.0).round().to(torch::kUInt8);
}

torch::Tensor spatial_map_for_display(const torch::Tensor& map) {
  if (!map.defined()) return {};
  torch::Tensor grid;
  if (map.dim() == 4 && map.size(1) == 1) {
    grid = map.select(1, 0);
  } else if (map.dim() == 3) {
    const int64_t keys = map.size(2);
    const auto side = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(keys))));
    if (side * side != keys) return {};
    grid = map.select(1, 0).reshape({map.size(0), side, side});
  } else {
    return {};
  }
  return normalise_per_sample(grid.detach().to(torch::kCPU));
}

torch::Tensor attention_sheet(const torch::Tensor& images,
                              const std::vector<std::pair<std::string, torch::Tensor>>& maps,
                              const AttentionSheetOptions& o) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 1,
              "attention_sheet: expected images [N,1,H,W], got ", images.sizes());
  TORCH_CHECK(o.scale() >= 1 && o.border() >= 0 && o.alpha() >= 0 && o.alpha() <= 1,
              "attention_sheet: scale >= 1, border >= 0 and alpha in [0,1] expected");
  const int64_t n = images.size(0), h = images.size(2) * o.scale(), w = images.size(3) * o.scale();
  for (const auto& m : maps) {
    TORCH_CHECK(m.second.dim() == 3 && m.second.size(0) == n, "attention_sheet: map '", m.first,
                "' must be [N,h,w] with N=", n, ", got ", m.second.sizes());
  }
  auto up = [&](const torch::Tensor& x, bool smooth) {  // [N,h',w'] -> [N,h,w]
    namespace F = torch::nn::functional;
    auto opts = F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w});
    opts = smooth ? opts.mode(torch::kBilinear).align_corners(false) : opts.mode(torch::kNearest);
    return F::interpolate(x.unsqueeze(1).to(torch::kFloat), opts).squeeze(1);
  };
  const auto grey = up(normalise_per_sample(images.detach().to(torch::kCPU).select(1, 0)), false);
  const auto grey_rgb = grey.unsqueeze(-1).expand({n, h, w, 3}).mul(255.0);

  const int64_t cols = 1 + static_cast<int64_t>(maps.size()), b = o.border();
  auto sheet = torch::full({n * (h + b) + b, cols * (w + b) + b, 3}, 255, torch::kUInt8);
  auto cell = [&](int64_t row, int64_t col) {
    return sheet.narrow(0, b + row * (h + b), h).narrow(1, b + col * (w + b), w);
  };
  for (int64_t i = 0; i < n; ++i) cell(i, 0).copy_(grey_rgb[i].round().to(torch::kUInt8));
  for (size_t m = 0; m < maps.size(); ++m) {
    const auto colour = jet_colormap(up(maps[m].second.to(torch::kCPU), true)).to(torch::kFloat);
    const auto blended =
        (grey_rgb * (1.0 - o.alpha()) + colour * o.alpha()).round().to(torch::kUInt8);
    for (int64_t i = 0; i < n; ++i) cell(i, static_cast<int64_t>(m) + 1).copy_(blended[i]);
  }
  return sheet;
}

}  // namespace dynattn
