#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <vector>

#include "dynattn/data/dataset.h"
#include "dynattn/data/fashion_mnist.h"

using dynattn::AugmentOptions;
using dynattn::Batch;
using dynattn::DataLoader;
using dynattn::DataLoaderOptions;
using dynattn::InMemoryDataset;

namespace {

// N distinct uint8 images [N, H, W] and labels 0..N-1, so a label identifies its sample.
InMemoryDataset numbered(int64_t n, int64_t h = 4, int64_t w = 4) {
  torch::Tensor images = (torch::arange(n * h * w) % 256).to(torch::kUInt8).view({n, h, w});
  return InMemoryDataset(images, torch::arange(n));
}

std::vector<int64_t> to_vec(const torch::Tensor& t) {
  const torch::Tensor c = t.to(torch::kCPU, torch::kInt64).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Labels of every batch of the current epoch, concatenated.
std::vector<int64_t> epoch_labels(const DataLoader& loader) {
  std::vector<int64_t> out;
  for (Batch b : loader) {
    const auto v = to_vec(b.labels);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

}  // namespace

TEST(InMemoryDataset, ScalesUint8AndAddsChannel) {
  const torch::Tensor images = torch::tensor({0, 51, 255, 102}, torch::kUInt8).view({1, 2, 2});
  InMemoryDataset ds(images, torch::tensor({3}, torch::kUInt8));
  EXPECT_EQ(ds.size(), 1);
  EXPECT_EQ(ds.images().sizes(), (std::vector<int64_t>{1, 1, 2, 2}));
  EXPECT_EQ(ds.images().scalar_type(), torch::kFloat);
  EXPECT_TRUE(ds.images().allclose(torch::tensor({0.0f, 0.2f, 1.0f, 0.4f}).view({1, 1, 2, 2})));
  EXPECT_EQ(ds.labels().scalar_type(), torch::kInt64);
  EXPECT_EQ(ds.channels(), 1);
  EXPECT_EQ(ds.height(), 2);
}

TEST(InMemoryDataset, RejectsBadInput) {
  const torch::Tensor img = torch::zeros({4, 1, 2, 2}, torch::kUInt8);
  EXPECT_THROW(InMemoryDataset(img, torch::arange(3)), c10::Error);
  EXPECT_THROW(InMemoryDataset(img, torch::zeros({4}, torch::kFloat)), c10::Error);
  EXPECT_THROW(InMemoryDataset(torch::zeros({4, 2}), torch::arange(4)), c10::Error);
  try {
    InMemoryDataset(torch::full({4, 1, 2, 2}, 255.0), torch::arange(4));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("[0, 1]"), std::string::npos);
  }
}

TEST(InMemoryDataset, SubsetKeepsGivenOrder) {
  const auto ds = numbered(10);
  const auto sub = ds.subset(torch::tensor({7, 2, 2}));
  EXPECT_EQ(to_vec(sub.labels()), (std::vector<int64_t>{7, 2, 2}));
  EXPECT_TRUE(sub.images()[0].equal(ds.images()[7]));
  EXPECT_THROW(ds.subset(torch::tensor({10})), c10::Error);
  EXPECT_THROW(ds.subset(torch::tensor({-1})), c10::Error);
}

TEST(InMemoryDataset, SplitValidationSizesAndDisjoint) {
  const auto ds = numbered(100);
  const auto [train, val] = ds.split_validation(0.2, 7);
  EXPECT_EQ(train.size(), 80);
  EXPECT_EQ(val.size(), 20);
  std::set<int64_t> all;
  for (int64_t v : to_vec(train.labels())) all.insert(v);
  for (int64_t v : to_vec(val.labels())) EXPECT_TRUE(all.insert(v).second) << v << " in both";
  EXPECT_EQ(all.size(), 100u);
  // Each side keeps the original relative order.
  const auto tv = to_vec(train.labels());
  EXPECT_TRUE(std::is_sorted(tv.begin(), tv.end()));
  // Seeded: same seed same split, different seed different split.
  EXPECT_TRUE(ds.split_validation(0.2, 7).second.labels().equal(val.labels()));
  EXPECT_FALSE(ds.split_validation(0.2, 8).second.labels().equal(val.labels()));
  // A validation subset is not just the head of the data.
  EXPECT_FALSE(val.labels().equal(torch::arange(20)));
}

TEST(InMemoryDataset, SplitValidationFractionRange) {
  const auto ds = numbered(10);
  EXPECT_EQ(ds.split_validation(0.0, 1).second.size(), 0);
  EXPECT_EQ(ds.split_validation(0.0, 1).first.size(), 10);
  EXPECT_THROW(ds.split_validation(1.0, 1), c10::Error);
  EXPECT_THROW(ds.split_validation(-0.1, 1), c10::Error);
  EXPECT_THROW(ds.split_validation(std::nan(""), 1), c10::Error);
}

TEST(DataLoader, SameSeedSameBatches) {
  const auto ds = numbered(50);
  const auto opts = DataLoaderOptions().batch_size(8).seed(3).augment(
      AugmentOptions().crop_padding(1).horizontal_flip(true));
  DataLoader a(ds, opts), b(ds, opts);
  ASSERT_EQ(a.num_batches(), b.num_batches());
  for (int64_t i = 0; i < a.num_batches(); ++i) {
    const Batch x = a.batch(i), y = b.batch(i);
    EXPECT_TRUE(x.labels.equal(y.labels));
    EXPECT_TRUE(x.images.equal(y.images));
  }
  // Random access: asking again (or out of order) gives the same batch.
  EXPECT_TRUE(a.batch(2).images.equal(a.batch(2).images));
  DataLoader c(ds, DataLoaderOptions(opts).seed(4));
  EXPECT_NE(epoch_labels(a), epoch_labels(c));
}

TEST(DataLoader, EpochsDifferAndResumeReproduces) {
  const auto ds = numbered(64);
  const auto opts = DataLoaderOptions().batch_size(10).seed(11).augment(
      AugmentOptions().crop_padding(2).horizontal_flip(true));
  DataLoader a(ds, opts);
  const auto e0 = epoch_labels(a);
  a.start_epoch(1);
  const auto e1 = epoch_labels(a);
  EXPECT_NE(e0, e1);
  a.start_epoch(3);
  const Batch a3 = a.batch(4);
  // A fresh loader jumping straight to epoch 3 sees exactly the same data.
  DataLoader resumed(ds, opts);
  resumed.start_epoch(3);
  EXPECT_EQ(resumed.epoch(), 3);
  EXPECT_EQ(epoch_labels(resumed), epoch_labels(a));
  EXPECT_TRUE(resumed.batch(4).images.equal(a3.images));
  resumed.start_epoch(0);
  EXPECT_EQ(epoch_labels(resumed), e0);
}

TEST(DataLoader, EverySampleOncePerEpoch) {
  const auto ds = numbered(103);
  DataLoader loader(ds, DataLoaderOptions().batch_size(16).seed(5));
  EXPECT_EQ(loader.num_batches(), 7);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    loader.start_epoch(epoch);
    auto labels = epoch_labels(loader);
    ASSERT_EQ(labels.size(), 103u);
    std::sort(labels.begin(), labels.end());
    for (int64_t i = 0; i < 103; ++i) ASSERT_EQ(labels[i], i);
  }
}

TEST(DataLoader, BatchesPairImagesWithTheirLabels) {
  const auto ds = numbered(30);
  DataLoader loader(ds, DataLoaderOptions().batch_size(7).seed(2));
  for (Batch b : loader) {
    const auto labels = to_vec(b.labels);
    for (size_t k = 0; k < labels.size(); ++k) {
      EXPECT_TRUE(b.images[k].equal(ds.images()[labels[k]]));
    }
  }
}

TEST(DataLoader, DropLast) {
  const auto ds = numbered(10);
  DataLoader keep(ds, DataLoaderOptions().batch_size(4));
  EXPECT_EQ(keep.num_batches(), 3);
  EXPECT_EQ(keep.batch(2).images.size(0), 2);
  DataLoader drop(ds, DataLoaderOptions().batch_size(4).drop_last(true));
  EXPECT_EQ(drop.num_batches(), 2);
  EXPECT_EQ(epoch_labels(drop).size(), 8u);
  EXPECT_THROW(drop.batch(2), c10::Error);
  EXPECT_EQ(DataLoader(ds, DataLoaderOptions().batch_size(20).drop_last(true)).num_batches(), 0);
}

TEST(DataLoader, NoShuffleIsSequential) {
  const auto ds = numbered(10);
  DataLoader loader(ds, DataLoaderOptions().batch_size(3).shuffle(false));
  loader.start_epoch(5);
  std::vector<int64_t> expected(10);
  for (int64_t i = 0; i < 10; ++i) expected[i] = i;
  EXPECT_EQ(epoch_labels(loader), expected);
}

TEST(DataLoader, RejectsBadOptions) {
  const auto ds = numbered(10);
  EXPECT_THROW(DataLoader(ds, DataLoaderOptions().batch_size(0)), c10::Error);
  EXPECT_THROW(DataLoader(ds, DataLoaderOptions().augment(AugmentOptions().crop_padding(-1))),
               c10::Error);
  EXPECT_THROW(DataLoader(ds, DataLoaderOptions().mean({0.5, 0.5}).stddev({1.0})), c10::Error);
  EXPECT_THROW(DataLoader(ds, DataLoaderOptions().mean({0.5})), c10::Error);
  EXPECT_THROW(DataLoader(ds, DataLoaderOptions().mean({0.5}).stddev({0.0})), c10::Error);
}

TEST(Augment, IdentityWithoutPaddingOrFlip) {
  const auto ds = numbered(20, 5, 6);
  DataLoader loader(ds, DataLoaderOptions().batch_size(20).shuffle(false));
  EXPECT_TRUE(loader.batch(0).images.equal(ds.images()));
  std::mt19937_64 rng(1);
  const torch::Tensor x = torch::rand({3, 2, 5, 5});
  EXPECT_TRUE(dynattn::augment_images(x, AugmentOptions(), rng).equal(x));
}

TEST(Augment, HorizontalFlipOfKnownImage) {
  // Row r, column c holds 10 * r + c: a flip must map column c to W-1-c.
  const torch::Tensor one = (torch::arange(3).view({3, 1}) * 10 + torch::arange(4).view({1, 4}))
                                .to(torch::kFloat)
                                .div(100.0)
                                .view({1, 1, 3, 4});
  const torch::Tensor flipped = torch::tensor({3, 2, 1, 0, 13, 12, 11, 10, 23, 22, 21, 20})
                                    .to(torch::kFloat)
                                    .div(100.0)
                                    .view({1, 1, 3, 4});
  const torch::Tensor batch = one.expand({64, 2, 3, 4}).contiguous();
  std::mt19937_64 rng(9);
  const torch::Tensor out =
      dynattn::augment_images(batch, AugmentOptions().horizontal_flip(true), rng);
  ASSERT_EQ(out.sizes(), batch.sizes());
  int n_flipped = 0;
  for (int64_t i = 0; i < 64; ++i) {
    const bool is_flip = out[i].equal(flipped[0].expand({2, 3, 4}));
    const bool is_same = out[i].equal(one[0].expand({2, 3, 4}));
    EXPECT_TRUE(is_flip != is_same) << "sample " << i;
    n_flipped += is_flip;
  }
  // p = 0.5 per sample: 64 samples all one way would be a 2^-63 event.
  EXPECT_GT(n_flipped, 10);
  EXPECT_LT(n_flipped, 54);
}

TEST(Augment, CropIsAShiftedWindowOfThePaddedInput) {
  const int64_t p = 2, h = 6, w = 5;
  const torch::Tensor x = torch::rand({40, 3, h, w}) + 0.01;  // nonzero, so zeros are padding
  const torch::Tensor padded = torch::constant_pad_nd(x, {p, p, p, p}, 0);
  for (bool flip : {false, true}) {
    std::mt19937_64 rng(4);
    const torch::Tensor out =
        dynattn::augment_images(x, AugmentOptions().crop_padding(p).horizontal_flip(flip), rng);
    ASSERT_EQ(out.sizes(), x.sizes());
    std::set<std::pair<int64_t, int64_t>> offsets;
    for (int64_t i = 0; i < x.size(0); ++i) {
      bool found = false;
      for (int64_t dy = 0; dy <= 2 * p && !found; ++dy) {
        for (int64_t dx = 0; dx <= 2 * p && !found; ++dx) {
          const torch::Tensor window = padded[i].slice(1, dy, dy + h).slice(2, dx, dx + w);
          if (out[i].equal(window) || (flip && out[i].equal(window.flip({2})))) {
            found = true;
            offsets.insert({dy, dx});
          }
        }
      }
      EXPECT_TRUE(found) << "sample " << i << " is no window of the padded input";
    }
    // 40 samples over 25 offsets: many different ones must occur.
    EXPECT_GT(offsets.size(), 8u);
  }
}

TEST(Normalize, KnownValues) {
  // Channels 0.5, 0.25, 1.0 with per-channel mean/std.
  const torch::Tensor x =
      torch::tensor({0.5f, 0.25f, 1.0f}).view({1, 3, 1, 1}).expand({2, 3, 2, 2}).contiguous();
  const torch::Tensor y = dynattn::normalize_images(x, {0.5, 0.0, 0.2}, {1.0, 0.5, 0.4});
  const torch::Tensor expected =
      torch::tensor({0.0f, 0.5f, 2.0f}).view({1, 3, 1, 1}).expand({2, 3, 2, 2});
  EXPECT_TRUE(y.allclose(expected, 1e-6, 1e-6));
  // One value applies to all channels; none means no change.
  EXPECT_TRUE(dynattn::normalize_images(x, {0.25}, {0.5}).allclose((x - 0.25) / 0.5));
  EXPECT_TRUE(dynattn::normalize_images(x, {}, {}).equal(x));

  // Through the loader, with the Fashion-MNIST constants.
  InMemoryDataset ds(torch::full({4, 1, 2, 2}, 0.75), torch::arange(4));
  DataLoader loader(ds, DataLoaderOptions()
                            .batch_size(4)
                            .mean({dynattn::kFashionMnistMean})
                            .stddev({dynattn::kFashionMnistStd}));
  const double v = (0.75 - dynattn::kFashionMnistMean) / dynattn::kFashionMnistStd;
  EXPECT_TRUE(loader.batch(0).images.allclose(torch::full({4, 1, 2, 2}, v), 1e-6, 1e-6));
}

TEST(DataLoader, ChannelsLast) {
  InMemoryDataset ds(torch::randint(0, 256, {12, 3, 5, 5}).to(torch::kUInt8), torch::arange(12));
  const auto opts = DataLoaderOptions().batch_size(6).seed(1).augment(
      AugmentOptions().crop_padding(1).horizontal_flip(true));
  DataLoader plain(ds, opts);
  DataLoader cl(ds, DataLoaderOptions(opts).channels_last(true));
  const Batch a = plain.batch(1), b = cl.batch(1);
  EXPECT_TRUE(b.images.is_contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_FALSE(b.images.is_contiguous());
  EXPECT_TRUE(a.images.is_contiguous());
  EXPECT_TRUE(a.images.equal(b.images));
}

TEST(DataLoader, OtherDeviceMatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto ds = numbered(40, 8, 8);
  const auto opts = DataLoaderOptions().batch_size(16).seed(2).mean({0.3}).stddev({0.4}).augment(
      AugmentOptions().crop_padding(2).horizontal_flip(true));
  DataLoader cpu(ds, opts);
  DataLoader gpu(ds, DataLoaderOptions(opts).device(torch::kCUDA));
  DataLoader gpu_resident(ds.to(torch::kCUDA), DataLoaderOptions(opts).device(torch::kCUDA));
  for (int64_t i = 0; i < cpu.num_batches(); ++i) {
    const Batch c = cpu.batch(i), g = gpu.batch(i), r = gpu_resident.batch(i);
    EXPECT_TRUE(g.images.is_cuda());
    EXPECT_TRUE(g.labels.is_cuda());
    EXPECT_TRUE(c.images.allclose(g.images.cpu()));
    EXPECT_TRUE(c.images.allclose(r.images.cpu()));
    EXPECT_TRUE(c.labels.equal(r.labels.cpu()));
  }
}
