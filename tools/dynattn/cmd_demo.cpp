// `dynattn demo`: the main job. Trains ResNet-20 on Fashion-MNIST on a short schedule, then
// reports test accuracy, parameters, MACs, batch-1 latency and batch-64 throughput.
#include <cstdio>

#include "cli_common.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/profile/model_bench.h"
#include "dynattn/train/evaluate.h"
#include "dynattn/train/trainer.h"

namespace dynattn::cli {
namespace {

struct DemoArgs {
  std::string data = kFashionMnistDefaultRoot;
  std::string out = "runs/demo";
  int64_t epochs = 4;
};

void run_demo(const DemoArgs& a, const GlobalOptions& g) {
  const int threads = setup_runtime(g);
  torch::manual_seed(0);
  Model model = create_model("resnet20");
  auto splits = load_fashion_mnist_splits(a.data, 0.0, 0);
  std::printf(
      "dynattn demo: ResNet-20 on Fashion-MNIST, %lld epochs, batch 128, SGD + Nesterov, "
      "cosine schedule, %d threads\n",
      static_cast<long long>(a.epochs), threads);
  std::fflush(stdout);
  TrainOptions o;
  o.epochs(a.epochs)
      .batch_size(128)
      .optimizer(
          OptimizerOptions().name("sgd").lr(0.1).momentum(0.9).nesterov(true).weight_decay(5e-4))
      .warmup_epochs(0.5)
      .channels_last(true)
      .mean({kFashionMnistMean})
      .stddev({kFashionMnistStd})
      .out_dir(a.out);
  auto result = train_model(model, splits.train, nullptr, o);
  TORCH_CHECK(!result.stopped, "demo: training stopped: ", result.stop_reason);
  auto ev = evaluate(
      model, splits.test,
      EvalOptions().channels_last(true).mean({kFashionMnistMean}).stddev({kFashionMnistStd}));
  auto bench = benchmark_model(model, ModelBenchOptions().batches({1, 64}).channels_last(true));
  double train_rate = 0;
  for (const auto& r : result.history) train_rate += r.train_images_per_sec / result.history.size();
  std::printf("\n== dynattn demo result ==\n");
  std::printf("test accuracy      %.2f%% (%lld test images)\n", 100.0 * ev.accuracy,
              static_cast<long long>(ev.count));
  std::printf("parameters         %lld\n", static_cast<long long>(bench.parameters));
  std::printf("MACs per image     %.2f M (counted from executed operators)\n",
              bench.macs_per_image / 1e6);
  std::printf("latency, batch 1   %.3f ms median, %.3f ms p90\n", bench.timings[0].stats.median_ms,
              bench.timings[0].stats.p90_ms);
  std::printf("throughput, b 64   %.0f images/s (inference), training %.0f images/s\n",
              bench.timings[1].images_per_sec, train_rate);
  std::printf("checkpoint         %s (try: dynattn eval --checkpoint %s)\n", a.out.c_str(),
              a.out.c_str());
  write_json(a.out + "/demo.json", {{"test_accuracy", ev.accuracy},
                                    {"parameters", bench.parameters},
                                    {"macs_per_image", bench.macs_per_image},
                                    {"latency_b1_median_ms", bench.timings[0].stats.median_ms},
                                    {"latency_b1_p90_ms", bench.timings[0].stats.p90_ms},
                                    {"throughput_b64", bench.timings[1].images_per_sec},
                                    {"train_images_per_sec", train_rate},
                                    {"threads", threads},
                                    {"epochs", a.epochs}});
}

}  // namespace

void add_demo_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<DemoArgs>();
  auto* sub = app.add_subcommand("demo", "train ResNet-20 briefly and report accuracy and speed");
  sub->add_option("--data", a->data, "Fashion-MNIST directory")->capture_default_str();
  sub->add_option("--out", a->out, "run directory")->capture_default_str();
  sub->add_option("--epochs", a->epochs, "epochs")->capture_default_str()->check(kPositive);
  sub->callback([a, &g] { run_demo(*a, g); });
}

}  // namespace dynattn::cli
