#include "dynattn/data/dataset.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace dynattn {
namespace {

// splitmix64 finaliser: turns structured inputs (seed, epoch, batch) into well-spread seeds.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Independent streams so that, e.g., turning augmentation on does not change the shuffle.
enum class Stream : uint64_t { kSplit = 1, kShuffle = 2, kAugment = 3 };

std::mt19937_64 make_rng(uint64_t seed, Stream stream, uint64_t a, uint64_t b = 0) {
  uint64_t h = mix(seed);
  h = mix(h ^ static_cast<uint64_t>(stream));
  h = mix(h ^ a);
  h = mix(h ^ b);
  return std::mt19937_64(h);
}

// Fisher-Yates with mt19937_64 (whose output the standard fixes) rather than std::shuffle
// (whose algorithm it does not), so orders agree across standard libraries. The modulo bias
// is below N / 2^64.
std::vector<int64_t> permutation(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

torch::Tensor to_tensor(const std::vector<int64_t>& v) {
  return torch::tensor(torch::ArrayRef<int64_t>(v), torch::kInt64);
}

// Broadcastable [1, C, 1, 1] per-channel (mean, 1/stddev), or undefined tensors if both
// vectors are empty. `what` names the caller in errors.
std::pair<torch::Tensor, torch::Tensor> channel_stats(const std::vector<double>& mean,
                                                      const std::vector<double>& stddev,
                                                      int64_t channels, const torch::Device& device,
                                                      const char* what) {
  if (mean.empty() && stddev.empty()) return {};
  const auto ok_size = [&](size_t n) { return n == 1 || static_cast<int64_t>(n) == channels; };
  const std::string expected =
      channels == 1 ? "1 value" : "1 or " + std::to_string(channels) + " values (one per channel)";
  TORCH_CHECK(ok_size(mean.size()) && ok_size(stddev.size()), what, ": mean and stddev need ",
              expected, " each for ", channels, "-channel images, got ", mean.size(), " and ",
              stddev.size());
  std::vector<float> m(channels), inv(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double s = stddev.size() == 1 ? stddev[0] : stddev[c];
    TORCH_CHECK(s > 0 && std::isfinite(s), what, ": stddev must be positive and finite, got ", s,
                " for channel ", c);
    m[c] = static_cast<float>(mean.size() == 1 ? mean[0] : mean[c]);
    inv[c] = static_cast<float>(1.0 / s);
  }
  const auto make = [&](const std::vector<float>& v) {
    return torch::tensor(torch::ArrayRef<float>(v)).view({1, channels, 1, 1}).to(device);
  };
  return {make(m), make(inv)};
}

}  // namespace

// ---- InMemoryDataset ----

InMemoryDataset::InMemoryDataset(const torch::Tensor& images, const torch::Tensor& labels) {
  TORCH_CHECK(images.defined() && labels.defined(),
              "InMemoryDataset: images and labels must be "
              "defined tensors");
  TORCH_CHECK(images.dim() == 3 || images.dim() == 4,
              "InMemoryDataset: images must be [N, H, W] or [N, C, H, W], got ", images.sizes());
  TORCH_CHECK(labels.dim() == 1, "InMemoryDataset: labels must be [N], got ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != torch::kBool,
              "InMemoryDataset: labels must be integers, got ", labels.scalar_type());
  TORCH_CHECK(images.size(0) == labels.size(0), "InMemoryDataset: ", images.size(0), " images but ",
              labels.size(0), " labels");
  torch::Tensor x = images.dim() == 3 ? images.unsqueeze(1) : images;
  if (x.scalar_type() == torch::kUInt8) {
    x = x.to(torch::kFloat).div_(255.0);
  } else {
    TORCH_CHECK(at::isFloatingType(x.scalar_type()),
                "InMemoryDataset: images must be uint8 (0..255) or floating point (0..1), got ",
                x.scalar_type());
    x = x.to(torch::kFloat);
    if (x.numel() > 0) {
      // Catches float images still on the 0..255 scale, which would train but badly.
      const auto [lo, hi] = torch::aminmax(x);
      const double lo_v = lo.item<double>(), hi_v = hi.item<double>();
      TORCH_CHECK(lo_v >= 0.0 && hi_v <= 1.0,
                  "InMemoryDataset: floating-point images must lie "
                  "in [0, 1], got values in [",
                  lo_v, ", ", hi_v, "]");
    }
  }
  images_ = x.contiguous();
  labels_ = labels.to(images_.device(), torch::kInt64).contiguous();
}

InMemoryDataset InMemoryDataset::subset(const torch::Tensor& indices) const {
  TORCH_CHECK(indices.dim() == 1, "InMemoryDataset::subset: indices must be 1-D, got ",
              indices.sizes());
  TORCH_CHECK(!at::isFloatingType(indices.scalar_type()),
              "InMemoryDataset::subset: indices must be integers, got ", indices.scalar_type());
  const torch::Tensor idx = indices.to(images_.device(), torch::kInt64);
  if (idx.numel() > 0) {
    const auto [lo, hi] = torch::aminmax(idx);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < size(), "InMemoryDataset::subset: indices must lie in [0, ",
                size(), "), got values in [", lo_v, ", ", hi_v, "]");
  }
  InMemoryDataset out;
  out.images_ = images_.index_select(0, idx);
  out.labels_ = labels_.index_select(0, idx);
  return out;
}

std::pair<InMemoryDataset, InMemoryDataset> InMemoryDataset::split_validation(double fraction,
                                                                              uint64_t seed) const {
  TORCH_CHECK(fraction >= 0.0 && fraction < 1.0,
              "InMemoryDataset::split_validation: fraction must be in [0, 1), got ", fraction);
  const int64_t n = size();
  const auto n_val = static_cast<int64_t>(std::llround(fraction * static_cast<double>(n)));
  auto rng = make_rng(seed, Stream::kSplit, 0);
  const std::vector<int64_t> perm = permutation(n, rng);
  std::vector<char> is_val(n, 0);
  for (int64_t i = 0; i < n_val; ++i) is_val[perm[i]] = 1;
  std::vector<int64_t> train, val;
  train.reserve(n - n_val);
  val.reserve(n_val);
  for (int64_t i = 0; i < n; ++i) (is_val[i] ? val : train).push_back(i);
  return {subset(to_tensor(train)), subset(to_tensor(val))};
}

InMemoryDataset InMemoryDataset::to(const torch::Device& device) const {
  InMemoryDataset out;
  out.images_ = images_.to(device);
  out.labels_ = labels_.to(device);
  return out;
}

// ---- augmentation and normalisation ----

torch::Tensor augment_images(const torch::Tensor& images, const AugmentOptions& options,
                             std::mt19937_64& rng) {
  const int64_t p = options.crop_padding();
  const bool flip = options.horizontal_flip();
  TORCH_CHECK(p >= 0, "augment: crop_padding must be >= 0, got ", p);
  if (p == 0 && !flip) return images;
  TORCH_CHECK(images.dim() == 4, "augment: expected a batch [B, C, H, W], got ", images.sizes());
  const int64_t b = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);

  // Per-sample choices are drawn on the host (cheap, device-independent, reproducible);
  // everything per pixel is tensor ops on the batch's device.
  std::vector<int64_t> oy(b, 0), ox(b, 0), flipped;
  for (int64_t i = 0; i < b; ++i) {
    if (p > 0) {
      oy[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(2 * p + 1));
      ox[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(2 * p + 1));
    }
    if (flip && (rng() >> 63) != 0) flipped.push_back(i);
  }
  if (b == 0) return images;
  const auto dev = images.device();
  torch::Tensor out = images;
  if (p > 0) {
    // All (2p+1)^2 crop windows of every padded sample as one overlapping view
    // [B, C, 2p+1, 2p+1, H, W]; advanced indexing then picks window (oy[b], ox[b]) for each b.
    // Only [B]-sized index tensors are built: full-size int64 index maps cost more in page
    // faults than the gather itself.
    const int64_t hp = h + 2 * p, wp = w + 2 * p;
    const torch::Tensor padded = torch::constant_pad_nd(images, {p, p, p, p}, 0).contiguous();
    const torch::Tensor windows =
        padded.as_strided({b, c, 2 * p + 1, 2 * p + 1, h, w}, {c * hp * wp, hp * wp, wp, 1, wp, 1});
    const torch::Tensor b_idx =
        torch::arange(b, torch::TensorOptions().dtype(torch::kInt64).device(dev));
    out = windows.index(
        {b_idx, torch::indexing::Slice(), to_tensor(oy).to(dev), to_tensor(ox).to(dev)});
  }
  if (!flipped.empty()) {
    const torch::Tensor sel = to_tensor(flipped).to(dev);
    const torch::Tensor mirrored = out.index_select(0, sel).flip({3});
    // In place only on our own crop output, never on the caller's tensor.
    out = p > 0 ? out.index_copy_(0, sel, mirrored) : out.index_copy(0, sel, mirrored);
  }
  return out;
}

torch::Tensor normalize_images(const torch::Tensor& images, const std::vector<double>& mean,
                               const std::vector<double>& stddev) {
  TORCH_CHECK(images.dim() == 4, "normalize: expected a batch [B, C, H, W], got ", images.sizes());
  const auto [m, inv] = channel_stats(mean, stddev, images.size(1), images.device(), "normalize");
  if (!m.defined()) return images;
  return (images - m) * inv;
}

// ---- DataLoader ----

DataLoader::DataLoader(const InMemoryDataset& dataset, DataLoaderOptions options)
    : dataset_(dataset), options_(std::move(options)) {
  TORCH_CHECK(dataset_.images().defined(),
              "DataLoader: the dataset is empty (default-"
              "constructed)");
  TORCH_CHECK(options_.batch_size() > 0, "DataLoader: batch_size must be positive, got ",
              options_.batch_size());
  TORCH_CHECK(options_.augment().crop_padding() >= 0,
              "DataLoader: augment.crop_padding must be >= 0, got ",
              options_.augment().crop_padding());
  std::tie(mean_, inv_std_) = channel_stats(options_.mean(), options_.stddev(), dataset_.channels(),
                                            options_.device(), "DataLoader");
  start_epoch(0);
}

void DataLoader::start_epoch(int64_t epoch) {
  TORCH_CHECK(epoch >= 0, "DataLoader::start_epoch: epoch must be >= 0, got ", epoch);
  epoch_ = epoch;
  const int64_t n = dataset_.size();
  const auto dev = dataset_.images().device();
  if (options_.shuffle()) {
    auto rng = make_rng(options_.seed(), Stream::kShuffle, static_cast<uint64_t>(epoch));
    order_ = to_tensor(permutation(n, rng)).to(dev);
  } else {
    order_ = torch::arange(n, torch::TensorOptions().dtype(torch::kInt64).device(dev));
  }
}

int64_t DataLoader::num_batches() const {
  const int64_t n = dataset_.size(), bs = options_.batch_size();
  return options_.drop_last() ? n / bs : (n + bs - 1) / bs;
}

Batch DataLoader::batch(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < num_batches(), "DataLoader::batch: index ", i,
              " out of range; this epoch has ", num_batches(), " batches");
  const int64_t bs = options_.batch_size();
  const int64_t begin = i * bs, end = std::min(dataset_.size(), begin + bs);
  const torch::Tensor idx = order_.slice(0, begin, end);
  Batch out;
  out.images = dataset_.images().index_select(0, idx).to(options_.device());
  out.labels = dataset_.labels().index_select(0, idx).to(options_.device());

  auto rng = make_rng(options_.seed(), Stream::kAugment, static_cast<uint64_t>(epoch_),
                      static_cast<uint64_t>(i));
  out.images = augment_images(out.images, options_.augment(), rng);
  // In place: out.images is always a fresh tensor here (index_select copies).
  if (mean_.defined()) out.images.sub_(mean_).mul_(inv_std_);
  if (options_.channels_last()) {
    out.images = out.images.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  return out;
}

}  // namespace dynattn
