// BranchyNet in the CLI: `dynattn calibrate` (thresholds on a validation split held out from the
// training set, written into a new checkpoint's spec), and the early-exit reports of `eval`
// (accuracy, exit histogram, executed MACs per image) and `bench` (the dynamic model against
// the same network run to its last exit, measured in alternating rounds on test images).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli_common.h"
#include "dynattn/core/compat.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/dynamic/branchy_calibration.h"
#include "dynattn/dynamic/branchy_stream.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/profile/model_bench.h"

namespace dynattn::cli {

BranchyResNetImpl* as_branchy(const Model& model) {
  return dynamic_cast<BranchyResNetImpl*>(model.ptr().get());
}

namespace {
ScoreOptions fashion_mnist_scoring(torch::Device device, int64_t batch, int64_t max_batches) {
  return ScoreOptions()
      .batch_size(batch)
      .device(device)
      .mean({kFashionMnistMean})
      .stddev({kFashionMnistStd})
      .max_batches(max_batches);
}

nlohmann::json threshold_json(const ThresholdResult& r) {
  return {{"thresholds", r.thresholds},
          {"thresholds_spec", format_thresholds(r.thresholds)},
          {"accuracy", r.accuracy},
          {"mean_macs", r.mean_macs},
          {"exit_histogram", r.exit_histogram}};
}

nlohmann::json eval_json(const BranchyResNetImpl& net, const BranchyEvalResult& r) {
  return {
      {"thresholds", net.thresholds()},  {"thresholds_spec", format_thresholds(net.thresholds())},
      {"exec", net.options.execution()}, {"count", r.count},
      {"accuracy", r.accuracy},          {"exit_histogram", r.exit_histogram},
      {"macs_mean", r.macs_mean},        {"macs_std", r.macs_std},
      {"macs_min", r.macs_min},          {"macs_max", r.macs_max}};
}

void print_eval(const nlohmann::json& j) {
  std::printf(
      "  thresholds %-22s accuracy %6.2f%%  MACs/image mean %.2f M (std %.2f M, min %.2f M, "
      "max %.2f M)  exits",
      j["thresholds_spec"].get<std::string>().c_str(), 100.0 * j["accuracy"].get<double>(),
      j["macs_mean"].get<double>() / 1e6, j["macs_std"].get<double>() / 1e6,
      j["macs_min"].get<int64_t>() / 1e6, j["macs_max"].get<int64_t>() / 1e6);
  for (const auto& h : j["exit_histogram"])
    std::printf(" %lld", static_cast<long long>(h.get<int64_t>()));
  std::printf("\n");
}

// The model's threshold lists to run: the given ones (';'-separated), or its own.
std::vector<std::vector<double>> threshold_lists(const BranchyResNetImpl& net,
                                                 const std::string& text) {
  if (text.empty()) return {net.thresholds()};
  return parse_threshold_lists(text, "--thresholds");
}

struct StreamTiming {
  double stream_ms = 0.0, last_exit_ms = 0.0;  // per pass over the images
};

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Passes over `xs` by BranchyStream (push each batch and take what finished, flush at the end: all
// the work is inside the pass) and by the last exit alone, in alternating rounds; per side the
// round with the median mean.
StreamTiming time_stream(const Model& model, Model& last, const std::vector<torch::Tensor>& xs,
                         int64_t batch, double min_time, int rounds, torch::Device device) {
  BranchyResNet net(std::dynamic_pointer_cast<BranchyResNetImpl>(model.ptr()));
  net->eval();
  last.ptr()->eval();
  InferenceGuard guard;
  auto stream_pass = [&] {
    BranchyStream stream(net, batch);
    for (const auto& x : xs) {
      stream.push(x);
      stream.take();
    }
    stream.flush();
    stream.take();
  };
  auto last_pass = [&] {
    for (const auto& x : xs) last.forward(x);
  };
  const double per_round = min_time / rounds / 2;
  std::vector<double> s, l;
  for (int r = 0; r < rounds; ++r) {
    s.push_back(time_callable(stream_pass, 1, 2, per_round, device).mean_ms);
    l.push_back(time_callable(last_pass, 1, 2, per_round, device).mean_ms);
  }
  return {median_of(s), median_of(l)};
}
}  // namespace

nlohmann::json branchy_eval(Model& model, const InMemoryDataset& data, torch::Device device,
                            int64_t batch, int64_t max_batches, const std::string& thresholds) {
  auto& net = *as_branchy(model);
  const auto own = net.thresholds();
  nlohmann::json j{{"exit_macs", net.exit_macs({1, 28, 28})}, {"runs", nlohmann::json::array()}};
  std::printf("\nearly exits (%s mode), MACs per image at each exit:",
              net.options.execution().c_str());
  for (auto m : j["exit_macs"]) std::printf(" %.2f M", m.get<int64_t>() / 1e6);
  std::printf("\n");
  for (const auto& t : threshold_lists(net, thresholds)) {
    net.set_thresholds(t);
    const auto r = evaluate_branchy(net, data, fashion_mnist_scoring(device, batch, max_batches));
    j["runs"].push_back(eval_json(net, r));
    print_eval(j["runs"].back());
  }
  net.set_thresholds(own);
  return j;
}

nlohmann::json branchy_bench(Model& model, const std::string& data_root, torch::Device device,
                             const std::vector<int64_t>& batches, double min_time, int64_t images,
                             const std::string& thresholds, int rounds, bool stream,
                             bool channels_last) {
  auto& net = *as_branchy(model);
  const auto own = net.thresholds();
  const FashionMnist raw = load_fashion_mnist(data_root);
  InMemoryDataset test(raw.test_images, raw.test_labels);
  TORCH_CHECK(images > 0 && images <= test.size(), "bench --images: expected 1..", test.size(),
              ", got ", images);
  test = test.subset(torch::arange(images, torch::kLong));
  const auto inputs = (test.images() - kFashionMnistMean) / kFashionMnistStd;
  // The same weights run to the last exit: the backbone alone.
  Model last{model.spec + " (last exit only)", torch::nn::AnyModule(net.backbone)};
  const auto bench_options = ModelBenchOptions()
                                 .batches(batches)
                                 .device(device)
                                 .min_seconds(min_time)
                                 .inputs(inputs)
                                 .channels_last(channels_last);
  nlohmann::json j{{"model", model.spec},
                   {"images", images},
                   {"channels_last", channels_last},
                   {"rounds", rounds},
                   {"exit_macs", net.exit_macs({1, 28, 28})},
                   {"points", nlohmann::json::array()}};
  for (const auto& t : threshold_lists(net, thresholds)) {
    net.set_thresholds(t);
    const auto ev = evaluate_branchy(net, test, fashion_mnist_scoring(device, 256, 0));
    std::vector<Model*> models{&model, &last};
    const auto r = benchmark_models_alternating(models, bench_options, rounds);
    nlohmann::json p = eval_json(net, ev);
    p["last_exit_macs"] = r[1].macs_per_image;
    p["mac_saving"] = r[1].macs_per_image / ev.macs_mean;
    p["batches"] = nlohmann::json::array();
    std::printf(
        "thresholds %s (%s): accuracy %.2f%% on %lld test images, MACs/image %.2f M vs %.2f M "
        "at the last exit (%.2fx fewer)\n",
        format_thresholds(t).c_str(), net.options.execution().c_str(), 100.0 * ev.accuracy,
        static_cast<long long>(ev.count), ev.macs_mean / 1e6, r[1].macs_per_image / 1e6,
        p["mac_saving"].get<double>());
    for (size_t b = 0; b < batches.size(); ++b) {
      const auto& d = r[0].timings[b];
      const auto& l = r[1].timings[b];
      // Means: with early exits the time per call is multimodal, the median misleads.
      const double speedup = l.stats.mean_ms / d.stats.mean_ms;
      p["batches"].push_back(
          {{"batch", d.batch},
           {"dynamic_mean_ms", d.stats.mean_ms},
           {"dynamic_median_ms", d.stats.median_ms},
           {"last_exit_mean_ms", l.stats.mean_ms},
           {"last_exit_median_ms", l.stats.median_ms},
           {"dynamic_images_per_sec", d.batch / (d.stats.mean_ms / 1000.0)},
           {"last_exit_images_per_sec", l.batch / (l.stats.mean_ms / 1000.0)},
           {"speedup", speedup},
           {"speedup_over_mac_saving", speedup / p["mac_saving"].get<double>()}});
      std::printf(
          "  batch %4lld  dynamic %8.3f ms (%8.1f images/s)  last exit %8.3f ms  "
          "speed-up %.2fx  (speed-up / MAC saving %.2f)\n",
          static_cast<long long>(d.batch), d.stats.mean_ms, d.batch / (d.stats.mean_ms / 1000.0),
          l.stats.mean_ms, speedup, speedup / p["mac_saving"].get<double>());
      if (!stream || d.batch < 2) continue;
      std::vector<torch::Tensor> xs;
      for (int64_t i = 0; i + d.batch <= images; i += d.batch)
        xs.push_back(inputs.slice(0, i, i + d.batch)
                         .to(device)
                         .contiguous(channels_last ? torch::MemoryFormat::ChannelsLast
                                                   : torch::MemoryFormat::Contiguous));
      TORCH_CHECK(!xs.empty(), "bench --stream: ", images, " images do not fill a batch of ",
                  d.batch);
      const auto st = time_stream(model, last, xs, d.batch, min_time, rounds, device);
      const double n = static_cast<double>(xs.size() * d.batch);
      const double stream_speedup = st.last_exit_ms / st.stream_ms;
      auto& jb = p["batches"].back();
      jb["stream_images_per_sec"] = n / (st.stream_ms / 1000.0);
      jb["stream_last_exit_images_per_sec"] = n / (st.last_exit_ms / 1000.0);
      jb["stream_speedup"] = stream_speedup;
      jb["stream_speedup_over_mac_saving"] = stream_speedup / p["mac_saving"].get<double>();
      std::printf(
          "  batch %4lld  stream  %8.1f images/s  last exit %8.1f images/s  speed-up %.2fx  "
          "(speed-up / MAC saving %.2f)\n",
          static_cast<long long>(d.batch), jb["stream_images_per_sec"].get<double>(),
          jb["stream_last_exit_images_per_sec"].get<double>(), stream_speedup,
          stream_speedup / p["mac_saving"].get<double>());
    }
    j["points"].push_back(p);
  }
  net.set_thresholds(own);
  return j;
}

namespace {
struct CalibrateArgs {
  std::string checkpoint, out, json;
  std::string data = kFashionMnistDefaultRoot;
  double max_accuracy_drop = -1.0, target_macs = -1.0;
  double val_split = 0.0;
  int64_t seed = -1;
  std::string exec = "compact";
  int64_t batch = 256;
  int64_t max_batches = 0;
};

void run_calibrate(const CalibrateArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  const torch::Device device = parse_device(g.device);
  CheckpointData ckpt;
  Model model = load_checkpoint_model(a.checkpoint, &ckpt);
  auto* net = as_branchy(model);
  TORCH_CHECK(net != nullptr, "calibrate: ", model.spec,
              " has no early exits (expected a branchy_resnet* checkpoint)");
  model.ptr()->to(device);
  // The split the training run held out, when it held one out.
  const auto meta = nlohmann::json::parse(ckpt.meta_json);
  double val_split = a.val_split;
  if (val_split <= 0) val_split = meta.value("val_split", 0.0);
  uint64_t seed = a.seed >= 0 ? static_cast<uint64_t>(a.seed) : 0;
  if (a.seed < 0 && meta.contains("train_options"))
    seed = meta["train_options"].value("seed", uint64_t{0});
  if (val_split <= 0) {
    val_split = 0.1;
    std::fprintf(stderr,
                 "calibrate: the checkpoint was trained without --val-split; calibrating on 10%% "
                 "of the training set, which the model has seen\n");
  }
  auto splits = load_fashion_mnist_splits(a.data, val_split, seed);
  const auto scores =
      score_exits(*net, splits.val, fashion_mnist_scoring(device, a.batch, a.max_batches));
  const auto c = calibrate_thresholds(
      scores,
      CalibrationOptions().max_accuracy_drop(a.max_accuracy_drop).target_macs(a.target_macs));
  std::printf("calibrated %s on %lld validation images (val_split %.3g, seed %llu)\n",
              model.spec.c_str(), static_cast<long long>(scores.samples()), val_split,
              static_cast<unsigned long long>(seed));
  std::printf("  last exit alone: accuracy %.2f%%, %.2f M MACs/image\n",
              100.0 * c.last_exit.accuracy, c.last_exit.mean_macs / 1e6);
  std::printf("  chosen thresholds %s: accuracy %.2f%%, %.2f M MACs/image (%.2fx fewer), exits",
              format_thresholds(c.chosen.thresholds).c_str(), 100.0 * c.chosen.accuracy,
              c.chosen.mean_macs / 1e6, c.last_exit.mean_macs / c.chosen.mean_macs);
  for (auto h : c.chosen.exit_histogram) std::printf(" %lld", static_cast<long long>(h));
  std::printf("%s\n", c.met ? "" : "  (target NOT met: the closest thresholds)");

  NamedOptions spec = parse_named_options(model.spec, "model");
  spec.options.set("thresholds", format_thresholds(c.chosen.thresholds));
  spec.options.set("exec", a.exec);
  net->set_thresholds(c.chosen.thresholds);
  net->set_execution_mode(parse_execution_mode(a.exec, "calibrate --exec"));
  nlohmann::json report{{"model", spec.to_string()},
                        {"calibrated_from", ckpt.paths.weights},
                        {"val_split", val_split},
                        {"seed", seed},
                        {"samples", scores.samples()},
                        {"target", a.max_accuracy_drop >= 0
                                       ? nlohmann::json{{"max_accuracy_drop", a.max_accuracy_drop}}
                                       : nlohmann::json{{"target_macs", a.target_macs}}},
                        {"met", c.met},
                        {"evaluated", c.evaluated},
                        {"exit_macs", scores.exit_macs},
                        {"last_exit", threshold_json(c.last_exit)},
                        {"chosen", threshold_json(c.chosen)},
                        {"front", nlohmann::json::array()}};
  for (const auto& r : c.front) report["front"].push_back(threshold_json(r));
  if (!a.out.empty()) {
    nlohmann::json out_meta = meta;
    out_meta["model"] = spec.to_string();
    out_meta["calibration"] = report;
    out_meta["calibration"].erase("front");
    std::filesystem::create_directories(a.out);
    save_checkpoint(a.out, *model.ptr(), out_meta.dump(), {});
    std::printf("wrote %s (model %s)\n", a.out.c_str(), spec.to_string().c_str());
  }
  if (!a.json.empty()) write_json(a.json, report);
  TORCH_CHECK(c.met || a.target_macs > 0, "calibrate: no thresholds met the target");
}
}  // namespace

void add_calibrate_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<CalibrateArgs>();
  auto* sub = app.add_subcommand(
      "calibrate",
      "pick BranchyNet exit thresholds on a validation split (from the training set) for a target");
  sub->add_option("--checkpoint", a->checkpoint, "run directory of a branchy_resnet* model")
      ->required();
  sub->add_option("--out", a->out, "write the calibrated checkpoint (thresholds in its spec) here");
  sub->add_option("--json", a->json, "write the calibration (chosen, Pareto front) as JSON");
  sub->add_option("--data", a->data, "Fashion-MNIST directory")->capture_default_str();
  auto* drop = sub->add_option("--max-accuracy-drop", a->max_accuracy_drop,
                               "accuracy points below the last exit alone on the split")
                   ->check(kNonNegative);
  sub->add_option("--target-macs", a->target_macs, "mean executed MACs per image")
      ->check(kPositive)
      ->excludes(drop);
  sub->add_option("--val-split", a->val_split,
                  "fraction of train held out (default: the checkpoint's, else 0.1)")
      ->check(CLI::Range(0.0, 0.9));
  sub->add_option("--seed", a->seed, "split seed (default: the checkpoint's training seed)");
  sub->add_option("--exec", a->exec, "execution mode written into the spec")
      ->capture_default_str()
      ->check(CLI::IsMember({"compact", "mask"}));
  sub->add_option("--batch", a->batch, "batch size")->capture_default_str()->check(kPositive);
  sub->add_option("--max-batches", a->max_batches, "cap validation batches (smoke runs)")
      ->check(kNonNegative);
  sub->add_option("--device", g.device, "cpu or cuda[:N]")->capture_default_str();
  sub->callback([a, &g] {
    TORCH_CHECK(a->max_accuracy_drop >= 0 || a->target_macs > 0,
                "calibrate: give a target, --max-accuracy-drop POINTS or --target-macs MACS");
    run_calibrate(*a, g);
  });
}

}  // namespace dynattn::cli
