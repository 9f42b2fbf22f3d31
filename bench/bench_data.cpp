// The data pipeline's cost per batch: augmentation + normalisation of a Fashion-MNIST batch,
// and a whole DataLoader batch (gather from 60k images, augment, normalise).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <random>

#include "dynattn/data/dataset.h"
#include "dynattn/data/fashion_mnist.h"

namespace {

void BM_AugmentNormalize(benchmark::State& state) {
  const torch::Tensor x = torch::rand({state.range(0), 1, 28, 28});
  const auto aug = dynattn::AugmentOptions().crop_padding(2).horizontal_flip(true);
  std::mt19937_64 rng(0);
  for (auto _ : state) {
    auto y = dynattn::augment_images(x, aug, rng);
    benchmark::DoNotOptimize(
        dynattn::normalize_images(y, {dynattn::kFashionMnistMean}, {dynattn::kFashionMnistStd}));
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_AugmentNormalize)->Arg(128)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_DataLoaderBatch(benchmark::State& state) {
  dynattn::InMemoryDataset data(torch::randint(0, 256, {60000, 28, 28}, torch::kUInt8),
                                torch::randint(0, 10, {60000}, torch::kInt64));
  dynattn::DataLoader loader(
      data, dynattn::DataLoaderOptions()
                .batch_size(state.range(0))
                .augment(dynattn::AugmentOptions().crop_padding(2).horizontal_flip(true))
                .mean({dynattn::kFashionMnistMean})
                .stddev({dynattn::kFashionMnistStd}));
  int64_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(loader.batch(i));
    i = (i + 1) % loader.num_batches();
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_DataLoaderBatch)->Arg(128)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
