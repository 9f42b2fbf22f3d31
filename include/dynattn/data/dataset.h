// In-memory image classification data: a dataset held as one float tensor, and a loader that
// cuts it into shuffled, augmented, normalised batches on any device. Every random choice is
// a pure function of (seed, epoch, batch index), so a run resumed at epoch k sees exactly the
// batches it would have seen without the interruption.
#pragma once
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <iterator>
#include <random>
#include <utility>
#include <vector>

namespace dynattn {

struct Batch {
  torch::Tensor images;  // float [B, C, H, W]
  torch::Tensor labels;  // int64 [B]
};

// Images as float [N, C, H, W] in [0, 1] plus int64 labels [N], on one device.
class InMemoryDataset {
 public:
  InMemoryDataset() = default;
  // `images`: uint8 [N,H,W] or [N,C,H,W] (scaled by 1/255), or floating point already in
  // [0,1]; `labels`: any integer type, [N].
  InMemoryDataset(const torch::Tensor& images, const torch::Tensor& labels);

  int64_t size() const { return labels_.defined() ? labels_.size(0) : 0; }
  const torch::Tensor& images() const { return images_; }
  const torch::Tensor& labels() const { return labels_; }
  int64_t channels() const { return images_.size(1); }
  int64_t height() const { return images_.size(2); }
  int64_t width() const { return images_.size(3); }

  // The samples at `indices` (int64 [K], any device), in that order.
  InMemoryDataset subset(const torch::Tensor& indices) const;
  // Seeded random split into (train, validation) with round(fraction * N) validation
  // samples; both keep the original relative order. `fraction` must lie in [0, 1).
  std::pair<InMemoryDataset, InMemoryDataset> split_validation(double fraction,
                                                               uint64_t seed) const;
  // A copy on `device` (e.g. the whole set on the GPU so batches never cross PCIe).
  InMemoryDataset to(const torch::Device& device) const;

 private:
  torch::Tensor images_;
  torch::Tensor labels_;
};

// Training-time augmentation, applied per sample but vectorised over the batch.
struct AugmentOptions {
  // Random crop back to the original size from the image zero-padded by this many pixels on
  // every side (offsets uniform in [0, 2p] per axis); 0 disables it.
  TORCH_ARG(int64_t, crop_padding) = 0;
  // Mirror left-right with probability 0.5 per sample.
  TORCH_ARG(bool, horizontal_flip) = false;
};

struct DataLoaderOptions {
  TORCH_ARG(int64_t, batch_size) = 128;
  TORCH_ARG(bool, shuffle) = true;
  TORCH_ARG(uint64_t, seed) = 0;
  // Drop the last, smaller batch (keeps batch-norm statistics and step counts uniform).
  TORCH_ARG(bool, drop_last) = false;
  TORCH_ARG(AugmentOptions, augment) = {};
  // Per-channel (x - mean) / stddev; one value applies to every channel, empty = none.
  TORCH_ARG(std::vector<double>, mean) = {};
  TORCH_ARG(std::vector<double>, stddev) = {};
  // Batches are produced here (augmentation runs on this device too).
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  // Return images in channels-last memory format (faster convolutions on some backends).
  TORCH_ARG(bool, channels_last) = false;
};

// Random-access batches of one epoch. start_epoch(e) fixes the order for epoch e; batch(i)
// may then be called in any order, any number of times, with the same result.
class DataLoader {
 public:
  DataLoader(const InMemoryDataset& dataset, DataLoaderOptions options);

  // Reorders the samples deterministically from (seed, epoch). The constructor starts epoch 0.
  void start_epoch(int64_t epoch);
  int64_t epoch() const { return epoch_; }
  int64_t num_batches() const;
  Batch batch(int64_t i) const;
  // Sample indices of the current epoch in batch order (all N, including a dropped tail).
  const torch::Tensor& order() const { return order_; }
  const DataLoaderOptions& options() const { return options_; }
  const InMemoryDataset& dataset() const { return dataset_; }

  // `for (Batch b : loader)` walks the batches of the current epoch.
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = const Batch*;
    using reference = Batch;
    Iterator(const DataLoader* loader, int64_t i) : loader_(loader), i_(i) {}
    Batch operator*() const { return loader_->batch(i_); }
    Iterator& operator++() {
      ++i_;
      return *this;
    }
    bool operator==(const Iterator& o) const { return i_ == o.i_ && loader_ == o.loader_; }
    bool operator!=(const Iterator& o) const { return !(*this == o); }

   private:
    const DataLoader* loader_;
    int64_t i_;
  };
  Iterator begin() const { return Iterator(this, 0); }
  Iterator end() const { return Iterator(this, num_batches()); }

 private:
  InMemoryDataset dataset_;
  DataLoaderOptions options_;
  int64_t epoch_ = 0;
  torch::Tensor order_;    // int64 [N] on the dataset's device
  torch::Tensor mean_;     // float [1, C, 1, 1] on options.device, undefined = none
  torch::Tensor inv_std_;  // float [1, C, 1, 1]
};

// Random crop / flip of a float batch [B, C, H, W] on its own device, drawing the per-sample
// choices from `rng` (a fixed number of draws per sample, in sample order). With padding 0
// and no flip it returns `images` unchanged.
torch::Tensor augment_images(const torch::Tensor& images, const AugmentOptions& options,
                             std::mt19937_64& rng);

// (images - mean) / stddev per channel of [B, C, H, W]; `mean`/`stddev` have 1 or C values.
torch::Tensor normalize_images(const torch::Tensor& images, const std::vector<double>& mean,
                               const std::vector<double>& stddev);

}  // namespace dynattn
