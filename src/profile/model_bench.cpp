#include "dynattn/profile/model_bench.h"

#include <algorithm>

#include "dynattn/core/compat.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/train/optimizer.h"

namespace dynattn {

namespace {
torch::Tensor random_input(int64_t batch, const ModelBenchOptions& o) {
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), o.input_shape().begin(), o.input_shape().end());
  auto x = torch::randn(shape, torch::TensorOptions().device(o.device()));
  return o.channels_last() ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
}

void prepare(Model& model, const ModelBenchOptions& o) {
  TORCH_CHECK(o.input_shape().size() == 3, "bench: input shape must be [C,H,W]");
  model.ptr()->to(o.device());
  if (o.channels_last()) to_memory_format(*model.ptr(), torch::MemoryFormat::ChannelsLast);
}
}  // namespace

BatchTiming benchmark_train_step(Model& model, int64_t batch, const ModelBenchOptions& o) {
  TORCH_CHECK(batch > 0, "bench: training batch must be positive, got ", batch);
  prepare(model, o);
  model.ptr()->train();
  auto x = random_input(batch, o);
  auto y = torch::randint(0, 10, {batch},
                          torch::TensorOptions().dtype(torch::kInt64).device(o.device()));
  auto opt = make_optimizer(*model.ptr(), OptimizerOptions().lr(0.01));
  BatchTiming t;
  t.batch = batch;
  t.stats = time_callable(
      [&] {
        auto loss = torch::nn::functional::cross_entropy(model.forward(x), y);
        opt->zero_grad();
        loss.backward();
        opt->step();
        synchronize(o.device());
      },
      std::max(2, o.warmup() / 5), std::max(5, o.min_iters() / 2), o.min_seconds());
  t.images_per_sec = batch / (t.stats.median_ms / 1000.0);
  return t;
}

ModelBenchResult benchmark_model(Model& model, const ModelBenchOptions& o) {
  TORCH_CHECK(!o.batches().empty(), "bench: no batch sizes given");
  prepare(model, o);
  auto& net = *model.ptr();
  net.eval();
  // Batches of the given inputs, or one random batch, on the device.
  auto make_inputs = [&](int64_t batch) {
    std::vector<torch::Tensor> xs;
    if (!o.inputs().defined()) return std::vector<torch::Tensor>{random_input(batch, o)};
    TORCH_CHECK(o.inputs().dim() == 4 && o.inputs().size(0) >= batch, "bench: ", o.inputs().size(0),
                " input images given, batch ", batch, " needs at least that");
    for (int64_t i = 0; i + batch <= o.inputs().size(0); i += batch) {
      auto x = o.inputs().slice(0, i, i + batch).to(o.device());
      xs.push_back(o.channels_last() ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x);
    }
    return xs;
  };
  auto make_input = [&](int64_t batch) { return make_inputs(batch).front(); };
  ModelBenchResult r;
  r.parameters = count_parameters(net);
  {
    auto x = make_input(1);
    r.macs_per_image = count_macs([&] { model.forward(x); }).macs;
  }
  InferenceGuard guard;
  for (int64_t batch : o.batches()) {
    TORCH_CHECK(batch > 0, "bench: batch sizes must be positive, got ", batch);
    const auto xs = make_inputs(batch);
    size_t next = 0;
    BatchTiming t;
    t.batch = batch;
    t.stats = time_callable(
        [&] {
          model.forward(xs[next]);
          next = (next + 1) % xs.size();
          synchronize(o.device());
        },
        o.warmup(), o.min_iters(), o.min_seconds());
    t.images_per_sec = batch / (t.stats.median_ms / 1000.0);
    t.gflops = 2.0 * r.macs_per_image * batch / (t.stats.median_ms * 1e6);
    r.timings.push_back(t);
  }
  return r;
}

std::vector<ModelBenchResult> benchmark_models_alternating(const std::vector<Model*>& models,
                                                           const ModelBenchOptions& options,
                                                           int rounds) {
  TORCH_CHECK(rounds >= 1, "bench: rounds must be >= 1, got ", rounds);
  ModelBenchOptions per_round = options;
  per_round.min_seconds(options.min_seconds() / rounds);
  std::vector<std::vector<ModelBenchResult>> all(models.size());
  for (int i = 0; i < rounds; ++i)
    for (size_t m = 0; m < models.size(); ++m)
      all[m].push_back(benchmark_model(*models[m], per_round));
  std::vector<ModelBenchResult> out;
  for (const auto& results : all) {
    ModelBenchResult r = results.front();
    for (size_t b = 0; b < r.timings.size(); ++b) {
      std::vector<BatchTiming> t;
      for (const auto& x : results) t.push_back(x.timings[b]);
      std::sort(t.begin(), t.end(), [](const BatchTiming& x, const BatchTiming& y) {
        return x.stats.median_ms < y.stats.median_ms;
      });
      r.timings[b] = t[t.size() / 2];
    }
    out.push_back(r);
  }
  return out;
}

}  // namespace dynattn
