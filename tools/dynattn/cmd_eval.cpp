// `dynattn eval`: test accuracy, per-class accuracy and the confusion matrix of a checkpoint.
#include <cstdio>

#include "cli_common.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/train/evaluate.h"

namespace dynattn::cli {
namespace {

struct EvalArgs {
  std::string checkpoint;
  std::string data = kFashionMnistDefaultRoot;
  std::string json;
  int64_t batch = 256;
  bool channels_last = false;
  std::string thresholds;  // BranchyNet: ';'-separated threshold lists to evaluate
  int64_t max_batches = 0;
};

void run_eval(const EvalArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  const torch::Device device = parse_device(g.device);
  CheckpointData ckpt;
  Model model = load_checkpoint_model(a.checkpoint, &ckpt);
  TORCH_CHECK(a.thresholds.empty() || as_branchy(model) != nullptr,
              "eval --thresholds: ", model.spec,
              " has no early exits (expected a branchy_resnet* model)");
  model.ptr()->to(device);
  if (a.channels_last) to_memory_format(*model.ptr(), torch::MemoryFormat::ChannelsLast);
  const FashionMnist raw = load_fashion_mnist(a.data);
  InMemoryDataset test(raw.test_images, raw.test_labels);
  auto ev = evaluate(model, test,
                     EvalOptions()
                         .batch_size(a.batch)
                         .channels_last(a.channels_last)
                         .device(device)
                         .max_batches(a.max_batches)
                         .mean({kFashionMnistMean})
                         .stddev({kFashionMnistStd}));
  const auto& classes = fashion_mnist_classes();
  std::printf("model %s, epoch %lld (%s)\n", model.spec.c_str(), static_cast<long long>(ckpt.epoch),
              ckpt.paths.weights.c_str());
  std::printf("test accuracy %.2f%% on %lld images, loss %.4f, %.0f images/s\n",
              100.0 * ev.accuracy, static_cast<long long>(ev.count), ev.loss,
              ev.count / ev.seconds);
  std::printf("\n%-12s %8s\n", "class", "accuracy");
  for (size_t c = 0; c < classes.size(); ++c) {
    std::printf("%-12s %7.2f%%\n", classes[c].c_str(), 100.0 * ev.per_class[c]);
  }
  std::printf("\nconfusion matrix (rows: true class, columns: predicted)\n%-12s", "");
  for (size_t c = 0; c < classes.size(); ++c) std::printf("%6zu", c);
  std::printf("\n");
  auto conf = ev.confusion.accessor<int64_t, 2>();
  for (int64_t r = 0; r < conf.size(0); ++r) {
    std::printf("%-9s %2lld", classes[r].substr(0, 9).c_str(), static_cast<long long>(r));
    for (int64_t c = 0; c < conf.size(1); ++c)
      std::printf("%6lld", static_cast<long long>(conf[r][c]));
    std::printf("\n");
  }
  nlohmann::json branchy;
  if (as_branchy(model) != nullptr)
    branchy = branchy_eval(model, test, device, a.batch, a.max_batches, a.thresholds);
  if (!a.json.empty()) {
    nlohmann::json j{{"model", model.spec},     {"checkpoint", ckpt.paths.weights},
                     {"epoch", ckpt.epoch},     {"count", ev.count},
                     {"accuracy", ev.accuracy}, {"loss", ev.loss},
                     {"classes", classes},      {"per_class_accuracy", ev.per_class}};
    std::vector<std::vector<int64_t>> rows;
    for (int64_t r = 0; r < conf.size(0); ++r) {
      rows.emplace_back();
      for (int64_t c = 0; c < conf.size(1); ++c) rows.back().push_back(conf[r][c]);
    }
    j["confusion"] = rows;
    if (!branchy.is_null()) j["branchy"] = branchy;
    write_json(a.json, j);
    std::printf("\nwrote %s\n", a.json.c_str());
  }
}

}  // namespace

void add_eval_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<EvalArgs>();
  auto* sub = app.add_subcommand("eval", "evaluate a checkpoint on the Fashion-MNIST test set");
  sub->add_option("--checkpoint", a->checkpoint,
                  "run directory, its checkpoint.json or model.safetensors")
      ->required();
  sub->add_option("--data", a->data, "Fashion-MNIST directory")->capture_default_str();
  sub->add_option("--json", a->json, "also write the results as JSON to this file");
  sub->add_option("--batch", a->batch, "batch size")->capture_default_str()->check(kPositive);
  sub->add_flag("--channels-last", a->channels_last, "channels-last memory format");
  sub->add_option("--thresholds", a->thresholds,
                  "BranchyNet: evaluate these exit thresholds instead of the checkpoint's, "
                  "lists separated by ';' (e.g. '0.1/0.3;0.2/0.5')");
  sub->add_option("--max-batches", a->max_batches, "cap test batches, 0: all (smoke runs)")
      ->check(kNonNegative);
  sub->add_option("--device", g.device, "cpu or cuda[:N]")->capture_default_str();
  sub->callback([a, &g] { run_eval(*a, g); });
}

}  // namespace dynattn::cli
