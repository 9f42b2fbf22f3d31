#include "dynattn/train/evaluate.h"

#include <chrono>

#include "dynattn/core/compat.h"

namespace dynattn {

EvalResult evaluate(Model& model, const InMemoryDataset& data, const EvalOptions& o) {
  TORCH_CHECK(o.num_classes() >= 0, "evaluate: num_classes must be >= 0");
  auto& net = *model.ptr();
  const bool was_training = net.is_training();
  net.eval();
  const auto start = std::chrono::steady_clock::now();
  DataLoader loader(data, DataLoaderOptions()
                              .batch_size(o.batch_size())
                              .shuffle(false)
                              .drop_last(false)
                              .mean(o.mean())
                              .stddev(o.stddev())
                              .device(o.device())
                              .channels_last(o.channels_last()));
  loader.start_epoch(0);
  int64_t k = o.num_classes();
  torch::Tensor confusion;
  double loss_sum = 0.0;
  int64_t count = 0;
  int64_t batches = loader.num_batches();
  if (o.max_batches() > 0) batches = std::min(batches, o.max_batches());
  {
    InferenceGuard guard;
    for (int64_t b = 0; b < batches; ++b) {
      Batch batch = loader.batch(b);
      auto logits = model.forward(batch.images);
      if (k == 0 && logits.dim() == 2) k = logits.size(1);
      TORCH_CHECK(logits.dim() == 2 && logits.size(1) == k && k > 0, "evaluate: model ", model.spec,
                  " returned logits of shape ", logits.sizes(), ", expected [N, ", k, "]");
      if (!confusion.defined()) confusion = torch::zeros({k * k}, torch::kInt64);
      const int64_t max_label = batch.labels.max().item<int64_t>();
      TORCH_CHECK(batch.labels.min().item<int64_t>() >= 0 && max_label < k, "evaluate: label ",
                  max_label, " out of range for a model with ", k, " classes");
      loss_sum += torch::nn::functional::cross_entropy(
                      logits, batch.labels,
                      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                      .item<double>();
      auto pred = logits.argmax(1);
      confusion.index_add_(0, (batch.labels * k + pred).to(torch::kCPU),
                           torch::ones({pred.size(0)}, torch::kInt64));
      count += pred.size(0);
    }
  }
  if (was_training) net.train();
  EvalResult r;
  if (!confusion.defined()) confusion = torch::zeros({k * k}, torch::kInt64);
  r.count = count;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.confusion = confusion.view({k, k});
  r.loss = count ? loss_sum / count : 0.0;
  r.accuracy = count ? static_cast<double>(r.confusion.trace().item<int64_t>()) / count : 0.0;
  auto rows = r.confusion.sum(1);
  for (int64_t c = 0; c < k; ++c) {
    const int64_t total = rows[c].item<int64_t>();
    r.per_class.push_back(total ? static_cast<double>(r.confusion[c][c].item<int64_t>()) / total
                                : 0.0);
  }
  return r;
}

}  // namespace dynattn
