// `dynattn rebirth`: DeepRebirth on a trained inception_net checkpoint (reparam/deep_rebirth.h):
// fold BN, merge (streamline, branch or all), re-learn the merged stages from the original's
// outputs, fine-tune, and report test accuracy after each step, latency, throughput and peak
// memory of the original, folded and merged networks. Writes the merged checkpoint.
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli_common.h"
#include "dynattn/core/compat.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/profile/model_bench.h"
#include "dynattn/profile/peak_memory.h"
#include "dynattn/reparam/deep_rebirth.h"
#include "dynattn/train/evaluate.h"
#include "dynattn/train/trainer.h"

namespace dynattn::cli {
namespace {

struct RebirthArgs {
  std::string checkpoint, out, merge, json;
  std::string data = kFashionMnistDefaultRoot;
  int64_t relearn_steps = 300;
  int64_t relearn_batch = 64;
  double relearn_lr = 1e-3;
  int64_t finetune_epochs = 1;
  double finetune_lr = 1e-3;  // the merged net has no BN: larger rates diverge
  int64_t batch = 128;
  double weight_decay = 5e-4;
  double label_smoothing = 0.0;
  int64_t crop_padding = 0;
  bool flip = false;
  int64_t max_batches = 0;
  int64_t eval_limit = 0;
  double bench_time = 2.0;
  int bench_iters = 20;
  bool channels_last = false;
  uint64_t seed = 0;
};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Peak bytes the CPU allocator hands out during one inference forward pass at `batch`, after
// one untimed pass (one-time buffers are not the model's working memory).
int64_t forward_peak_bytes(Model& model, int64_t batch, int64_t in_channels, bool channels_last) {
  InferenceGuard guard;
  auto x = torch::randn({batch, in_channels, 28, 28});
  if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  model.forward(x);
  return measure_peak_memory([&] { model.forward(x); }).peak_bytes;
}

// Layers by kind: the "non-tensor" layers DeepRebirth removes are the BNs and the max-pools.
nlohmann::json layer_counts(const torch::nn::Module& net) {
  int64_t conv = 0, bn = 0, pool = 0;
  for (const auto& m : net.modules()) {
    conv += m->as<torch::nn::Conv2d>() != nullptr;
    bn += m->as<torch::nn::BatchNorm2d>() != nullptr;
    pool += m->as<torch::nn::MaxPool2d>() != nullptr;
  }
  return {{"conv", conv}, {"batch_norm", bn}, {"max_pool", pool}};
}

void run_rebirth(const RebirthArgs& a, const GlobalOptions& g) {
  const int threads = setup_runtime(g);
  torch::manual_seed(a.seed);
  CheckpointData ckpt;
  Model original = load_checkpoint_model(a.checkpoint, &ckpt);
  const auto& net = as_inception_net(original, "rebirth --checkpoint " + a.checkpoint);
  const int64_t in_channels = net.options.in_channels();
  auto splits = load_fashion_mnist_splits(a.data, 0.0, a.seed);
  InMemoryDataset test = splits.test;
  if (a.eval_limit > 0 && a.eval_limit < test.size())
    test = test.subset(torch::arange(a.eval_limit, torch::kLong));
  const auto eval_options = EvalOptions()
                                .channels_last(a.channels_last)
                                .mean({kFashionMnistMean})
                                .stddev({kFashionMnistStd});
  nlohmann::json accuracy = nlohmann::json::object(), loss = nlohmann::json::object(),
                 timings = nlohmann::json::object();
  auto record = [&](const std::string& step, Model& model) {
    const auto ev = evaluate(model, test, eval_options);
    accuracy[step] = ev.accuracy;
    loss[step] = ev.loss;
    std::printf("  %-10s test accuracy %6.2f%%  loss %.4f\n", step.c_str(), 100.0 * ev.accuracy,
                ev.loss);
  };
  std::printf("DeepRebirth merge=%s of %s (%s), %lld test images\n", a.merge.c_str(),
              original.spec.c_str(), ckpt.paths.weights.c_str(),
              static_cast<long long>(test.size()));
  record("original", original);

  auto start = Clock::now();
  RebirthModels r = rebirth_merge(original, a.merge);
  timings["merge_seconds"] = seconds_since(start);
  record("folded", r.folded);
  record("merged", r.merged);

  start = Clock::now();
  const auto relearned = relearn_merged_stages(r.folded, r.merged, r.relearn_stages, splits.train,
                                               RelearnOptions()
                                                   .steps(a.relearn_steps)
                                                   .batch_size(a.relearn_batch)
                                                   .lr(a.relearn_lr)
                                                   .seed(a.seed)
                                                   .mean({kFashionMnistMean})
                                                   .stddev({kFashionMnistStd}));
  timings["relearn_seconds"] = seconds_since(start);
  record("relearned", r.merged);

  nlohmann::json history = nlohmann::json::array();
  if (a.finetune_epochs > 0) {
    start = Clock::now();
    TrainOptions o;
    o.epochs(a.finetune_epochs)
        .batch_size(a.batch)
        .optimizer(OptimizerOptions().lr(a.finetune_lr).weight_decay(a.weight_decay))
        .warmup_epochs(0)
        .label_smoothing(a.label_smoothing)
        .crop_padding(a.crop_padding)
        .flip(a.flip)
        .seed(a.seed)
        .channels_last(a.channels_last)
        .mean({kFashionMnistMean})
        .stddev({kFashionMnistStd})
        .max_batches(a.max_batches);
    const TrainResult tr = train_model(r.merged, splits.train, nullptr, o);
    TORCH_CHECK(!tr.stopped, "rebirth: fine-tuning stopped: ", tr.stop_reason,
                "; try a smaller --finetune-lr");
    for (const auto& e : tr.history) history.push_back(nlohmann::json::parse(epoch_record_json(e)));
    r.merged.ptr()->eval();
    timings["finetune_seconds"] = seconds_since(start);
    record("finetuned", r.merged);
  }

  // Cost of the three forms, measured in alternating rounds.
  const std::vector<std::pair<std::string, Model*>> forms = {
      {"original", &original}, {"folded", &r.folded}, {"merged", &r.merged}};
  std::vector<Model*> models;
  for (const auto& f : forms) models.push_back(f.second);
  const auto bench = benchmark_models_alternating(models, ModelBenchOptions()
                                                              .batches({1, 64})
                                                              .channels_last(a.channels_last)
                                                              .input_shape({in_channels, 28, 28})
                                                              .min_seconds(a.bench_time)
                                                              .min_iters(a.bench_iters)
                                                              .warmup(std::min(10, a.bench_iters)));
  nlohmann::json cost = nlohmann::json::object();
  std::printf("\n%-9s %10s %9s %11s %14s %13s %14s %6s\n", "model", "params", "M MACs",
              "batch-1 ms", "batch-64 img/s", "peak KiB (1)", "peak KiB (64)", "pools");
  for (size_t i = 0; i < forms.size(); ++i) {
    Model& m = *forms[i].second;
    const auto& b = bench[i];
    const int64_t peak1 = forward_peak_bytes(m, 1, in_channels, a.channels_last);
    const int64_t peak64 = forward_peak_bytes(m, 64, in_channels, a.channels_last);
    const auto layers = layer_counts(*m.ptr());
    cost[forms[i].first] = {{"model", m.spec},
                            {"parameters", b.parameters},
                            {"macs_per_image", b.macs_per_image},
                            {"latency_ms_batch1", b.timings[0].stats.median_ms},
                            {"latency_p90_ms_batch1", b.timings[0].stats.p90_ms},
                            {"images_per_sec_batch64", b.timings[1].images_per_sec},
                            {"latency_ms_batch64", b.timings[1].stats.median_ms},
                            {"peak_bytes_batch1", peak1},
                            {"peak_bytes_batch64", peak64},
                            {"layers", layers}};
    std::printf("%-9s %10lld %9.2f %11.3f %14.1f %13.1f %14.1f %6lld\n", forms[i].first.c_str(),
                static_cast<long long>(b.parameters), b.macs_per_image / 1e6,
                b.timings[0].stats.median_ms, b.timings[1].images_per_sec, peak1 / 1024.0,
                peak64 / 1024.0, static_cast<long long>(layers["max_pool"].get<int64_t>()));
  }

  nlohmann::json steps = nlohmann::json::array();
  std::printf("\nmerges (%s):\n", r.merged.spec.c_str());
  for (const auto& s : r.steps) {
    steps.push_back({{"stage", s.stage}, {"layers", s.layers}, {"exact", s.exact}});
    std::printf("  %-12s %-10s %s\n", s.stage.c_str(), s.exact ? "exact" : "re-learned",
                s.layers.c_str());
  }
  nlohmann::json relearn = nlohmann::json::array();
  for (const auto& s : relearned) {
    relearn.push_back({{"stage", s.stage},
                       {"mse_before", s.mse_before},
                       {"mse_after", s.mse_after},
                       {"target_mean_square", s.target_mean_square}});
    std::printf("  re-learned %-12s relative MSE %.4f -> %.4f\n", s.stage.c_str(),
                s.mse_before / s.target_mean_square, s.mse_after / s.target_mean_square);
  }

  const nlohmann::json rebirth = {{"from_checkpoint", ckpt.paths.weights},
                                  {"from_model", original.spec},
                                  {"merge", a.merge},
                                  {"steps", steps},
                                  {"relearn_steps", a.relearn_steps},
                                  {"finetune_epochs", a.finetune_epochs}};
  nlohmann::json meta = {{"model", r.merged.spec}, {"epoch", ckpt.epoch}, {"rebirth", rebirth}};
  std::filesystem::create_directories(a.out);
  save_checkpoint(a.out, *r.merged.ptr(), meta.dump(), {});
  std::printf("wrote %s\n", a.out.c_str());

  if (!a.json.empty()) {
    write_json(a.json, {{"model", r.merged.spec},
                        {"original_model", original.spec},
                        {"checkpoint", ckpt.paths.weights},
                        {"merge", a.merge},
                        {"steps", steps},
                        {"fold_max_abs_diff", r.fold_max_abs_diff},
                        {"test_images", test.size()},
                        {"accuracy", accuracy},
                        {"loss", loss},
                        {"relearn",
                         {{"steps", a.relearn_steps},
                          {"batch", a.relearn_batch},
                          {"lr", a.relearn_lr},
                          {"stages", relearn}}},
                        {"finetune",
                         {{"epochs", a.finetune_epochs},
                          {"lr", a.finetune_lr},
                          {"batch", a.batch},
                          {"max_batches", a.max_batches},
                          {"history", history}}},
                        {"cost", cost},
                        {"seconds", timings},
                        {"threads", threads},
                        {"channels_last", a.channels_last},
                        {"bench_seconds", a.bench_time},
                        {"torch_version", torch_version_string()}});
  }
}

}  // namespace

void add_rebirth_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<RebirthArgs>();
  auto* sub = app.add_subcommand(
      "rebirth",
      "DeepRebirth: merge pooling and parallel branches of a trained inception_net into convs, "
      "re-learn, fine-tune, and measure accuracy, speed and peak memory");
  sub->add_option("--checkpoint", a->checkpoint, "trained inception_net run directory")->required();
  sub->add_option("--out", a->out, "directory for the merged checkpoint")->required();
  sub->add_option("--merge", a->merge,
                  "streamline (pools into strided convs), branch (parallel branches into wide "
                  "convs) or all")
      ->required()
      ->check(CLI::IsMember({"streamline", "branch", "all"}));
  sub->add_option("--data", a->data, "Fashion-MNIST directory")->capture_default_str();
  sub->add_option("--relearn-steps", a->relearn_steps,
                  "Adam steps re-learning the merged stages from the original's outputs")
      ->capture_default_str()
      ->check(kNonNegative);
  sub->add_option("--relearn-batch", a->relearn_batch, "images per re-learning step")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_option("--relearn-lr", a->relearn_lr, "Adam learning rate for re-learning")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_option("--finetune-epochs", a->finetune_epochs,
                  "epochs of cross-entropy fine-tuning of the whole merged net (0: none)")
      ->capture_default_str()
      ->check(kNonNegative);
  sub->add_option("--finetune-lr", a->finetune_lr, "peak SGD learning rate of fine-tuning")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_option("--batch", a->batch, "fine-tuning batch size")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_option("--wd", a->weight_decay, "fine-tuning weight decay")->capture_default_str();
  sub->add_option("--label-smoothing", a->label_smoothing, "fine-tuning label smoothing")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.99));
  sub->add_option("--crop-padding", a->crop_padding, "fine-tuning random crop padding (0: off)")
      ->capture_default_str();
  sub->add_flag("--flip", a->flip, "fine-tuning random horizontal flips");
  sub->add_option("--max-batches", a->max_batches,
                  "cap fine-tuning batches per epoch, 0: all (smoke runs)")
      ->check(kNonNegative);
  sub->add_option("--eval-limit", a->eval_limit,
                  "evaluate on the first N test images only, 0: all (smoke runs)")
      ->check(kNonNegative);
  sub->add_option("--bench-time", a->bench_time, "seconds of timed runs per model and batch size")
      ->capture_default_str()
      ->check(kNonNegative);
  sub->add_option("--bench-iters", a->bench_iters,
                  "at least this many timed runs per model, batch size and round (3 rounds)")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_flag("--channels-last", a->channels_last, "channels-last memory format");
  sub->add_option("--seed", a->seed, "seed for re-learning and fine-tuning batches")
      ->capture_default_str();
  sub->add_option("--json", a->json, "also write the report as JSON");
  sub->callback([a, &g] { run_rebirth(*a, g); });
}

}  // namespace dynattn::cli
