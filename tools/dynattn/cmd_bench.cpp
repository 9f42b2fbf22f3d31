// `dynattn bench`: parameters, MACs, latency and throughput of a model, next to the machine's
// measured conv peak; optionally the same run with glibc's default allocator settings.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <tuple>

#include "cli_common.h"
#include "dynattn/core/compat.h"
#include "dynattn/core/runtime.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/io/atomic_file.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/models/repvgg.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/profile/model_bench.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn::cli {
namespace {

struct BenchArgs {
  std::string model = "resnet20";
  std::string attn;
  std::string checkpoint;
  std::vector<int64_t> batches{1, 64};
  bool channels_last = false;
  std::string json;
  double min_time = 2.0;
  bool no_peak = false;
  bool compare_malloc = false;
  bool compare_deployed = false;
  bool compare_kernels = false;
  int64_t train_batch = 0;
  std::string data = kFashionMnistDefaultRoot;  // BranchyNet: real test images
  std::string thresholds;
  int64_t images = 1024;
  int rounds = 3;
  bool stream = false;
  std::vector<std::string> argv;  // for re-running under the other allocator policy
};

nlohmann::json bench_json(const std::string& spec, int threads, const BenchArgs& a,
                          const GlobalOptions& g, const ModelBenchResult& r, double peak) {
  nlohmann::json j{{"model", spec},
                   {"threads", threads},
                   {"channels_last", a.channels_last},
                   {"malloc", g.malloc},
                   {"kernels", g.kernels},
                   {"winograd", g.winograd},
                   {"device", g.device},
                   {"parameters", r.parameters},
                   {"macs_per_image", r.macs_per_image},
                   {"conv_peak_gflops", peak},
                   {"torch_version", torch_version_string()},
                   // lets a comparison run another program on the same OpenBLAS kernels
                   {"openblas_core", openblas_core()}};
  j["batches"] = nlohmann::json::array();
  for (const auto& t : r.timings) {
    j["batches"].push_back({{"batch", t.batch},
                            {"median_ms", t.stats.median_ms},
                            {"p90_ms", t.stats.p90_ms},
                            {"mean_ms", t.stats.mean_ms},
                            {"min_ms", t.stats.min_ms},
                            {"iterations", t.stats.iterations},
                            {"images_per_sec", t.images_per_sec},
                            {"gflops", t.gflops}});
  }
  return j;
}

// 'arg' for sh, with embedded single quotes escaped.
std::string shell_quote(const std::string& arg) {
  std::string out = "'";
  for (char c : arg) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs this same bench in a child process with the other allocator policy (mallopt settings
// cannot be undone inside one process) and returns its JSON.
nlohmann::json run_child_with_malloc(const BenchArgs& a, const std::string& policy) {
  char tmpl[] = "/tmp/dynattn-bench-XXXXXX";
  const int fd = mkstemp(tmpl);
  TORCH_CHECK(fd >= 0, "bench: cannot create a temporary file");
  close(fd);
  // std::system runs a shell, for which /proc/self/exe is the shell itself.
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  TORCH_CHECK(n > 0, "bench: cannot find this executable's path");
  exe[n] = '\0';
  std::string cmd =
      shell_quote(exe) + " --quiet --malloc " + policy + " bench --json " + shell_quote(tmpl);
  for (const auto& arg : a.argv) cmd += " " + shell_quote(arg);
  cmd += " > /dev/null";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(tmpl);
  nlohmann::json j;
  if (rc == 0 && in) j = nlohmann::json::parse(in, nullptr, false);
  std::remove(tmpl);
  TORCH_CHECK(rc == 0 && j.is_object(), "bench: the run with --malloc ", policy, " failed");
  return j;
}

void print_result(const nlohmann::json& j) {
  const double peak = j["conv_peak_gflops"].get<double>();
  for (const auto& b : j["batches"]) {
    std::printf("  batch %4lld  median %8.3f ms  p90 %8.3f ms  %9.1f images/s  %6.1f GFLOP/s",
                static_cast<long long>(b["batch"].get<int64_t>()), b["median_ms"].get<double>(),
                b["p90_ms"].get<double>(), b["images_per_sec"].get<double>(),
                b["gflops"].get<double>());
    if (peak > 0) std::printf(" (%4.1f%% of peak)", 100.0 * b["gflops"].get<double>() / peak);
    std::printf("\n");
  }
}

// Per batch size, the round whose median is the median of the rounds.
ModelBenchResult median_round(const std::vector<ModelBenchResult>& rounds) {
  ModelBenchResult out = rounds.front();
  for (size_t b = 0; b < out.timings.size(); ++b) {
    std::vector<BatchTiming> t;
    for (const auto& r : rounds) t.push_back(r.timings[b]);
    std::sort(t.begin(), t.end(), [](const BatchTiming& x, const BatchTiming& y) {
      return x.stats.median_ms < y.stats.median_ms;
    });
    out.timings[b] = t[t.size() / 2];
  }
  return out;
}

// One model under one kernel policy (ops/dispatch.h), among those a bench compares.
struct Contender {
  Model* model;
  bool dynattn_kernels;
};

// The contenders measured in alternating rounds, so that drift on a shared machine affects them
// alike: per contender, every round.
std::vector<std::vector<ModelBenchResult>> bench_alternating(
    const std::vector<Contender>& contenders, ModelBenchOptions options, int rounds) {
  options.min_seconds(options.min_seconds() / rounds);
  std::vector<std::vector<ModelBenchResult>> results(contenders.size());
  for (int i = 0; i < rounds; ++i) {
    for (size_t c = 0; c < contenders.size(); ++c) {
      auto policy = kernel_policy();
      policy.dynattn = contenders[c].dynattn_kernels;
      KernelPolicyGuard guard(policy);
      results[c].push_back(benchmark_model(*contenders[c].model, options));
    }
  }
  return results;
}

// Per batch size, how many times faster `fast` ran than `slow`: the median over rounds of the
// ratio of the two medians measured next to each other in that round (a pair shares the
// machine's state of the moment, which drifts over seconds here).
nlohmann::json speedups(const std::vector<ModelBenchResult>& slow,
                        const std::vector<ModelBenchResult>& fast) {
  auto out = nlohmann::json::array();
  for (size_t b = 0; b < slow.front().timings.size(); ++b) {
    std::vector<double> ratios;
    double slow_min = std::numeric_limits<double>::infinity(), fast_min = slow_min;
    for (size_t i = 0; i < slow.size(); ++i) {
      ratios.push_back(slow[i].timings[b].stats.median_ms / fast[i].timings[b].stats.median_ms);
      slow_min = std::min(slow_min, slow[i].timings[b].stats.min_ms);
      fast_min = std::min(fast_min, fast[i].timings[b].stats.min_ms);
    }
    std::sort(ratios.begin(), ratios.end());
    const double median = ratios.size() % 2 == 1
                              ? ratios[ratios.size() / 2]
                              : 0.5 * (ratios[ratios.size() / 2 - 1] + ratios[ratios.size() / 2]);
    out.push_back({{"batch", slow.front().timings[b].batch},
                   {"speedup", median},
                   {"speedup_min", ratios.front()},
                   {"speedup_max", ratios.back()},
                   // interference only adds time: the fastest runs are the least disturbed
                   {"speedup_of_min", slow_min / fast_min},
                   {"rounds", ratios.size()}});
  }
  return out;
}

void print_speedups(const nlohmann::json& s, const char* what) {
  for (const auto& b : s)
    std::printf("  batch %4lld  %s %.2fx (rounds %.2f to %.2f; fastest runs %.2fx)\n",
                static_cast<long long>(b["batch"].get<int64_t>()), what, b["speedup"].get<double>(),
                b["speedup_min"].get<double>(), b["speedup_max"].get<double>(),
                b["speedup_of_min"].get<double>());
}

void run_bench(const BenchArgs& a, const GlobalOptions& g) {
  const int threads = setup_runtime(g);
  const torch::Device device = parse_device(g.device);
  Model model = a.checkpoint.empty() ? create_model(model_with_attention(a.model, a.attn))
                                     : load_checkpoint_model(a.checkpoint);
  // With --compare-kernels an early-exit model is timed as its static forward: the comparison is
  // of kernels, not of exits.
  if (as_branchy(model) != nullptr && !a.compare_kernels) {
    // Early exits depend on the data: timed on test images, against the last exit alone.
    TORCH_CHECK(!a.compare_deployed && !a.compare_malloc && a.train_batch == 0,
                "bench: ", model.spec,
                " (early exits) supports --batch, --min-time, --images, "
                "--channels-last, --thresholds, --rounds, --stream and --json only");
    std::printf("model %s, threads %d, device %s; %d alternating rounds\n", model.spec.c_str(),
                threads, g.device.c_str(), a.rounds);
    auto j = branchy_bench(model, a.data, device, a.batches, a.min_time, a.images, a.thresholds,
                           a.rounds, a.stream, a.channels_last);
    j["threads"] = threads;
    j["torch_version"] = torch_version_string();
    if (!a.json.empty()) write_json(a.json, j);
    return;
  }
  TORCH_CHECK(!a.stream, "bench --stream: ", model.spec,
              " has no early exits (expected a branchy_resnet* model)");
  TORCH_CHECK(a.thresholds.empty(), "bench --thresholds: ", model.spec,
              " has no early exits (expected a branchy_resnet* model)");
  const auto options = ModelBenchOptions()
                           .batches(a.batches)
                           .channels_last(a.channels_last)
                           .device(device)
                           .min_seconds(a.min_time);
  Model deployed;
  if (a.compare_deployed) {
    deployed = a.checkpoint.empty() ? create_model(model_with_attention(a.model, a.attn))
                                    : load_checkpoint_model(a.checkpoint);
    // The same weights in both (a fresh model is initialised from the same seed otherwise).
    load_state_dict(*deployed.ptr(), state_dict(*model.ptr()), "bench --compare-deployed");
    deployed.ptr()->eval();
    const auto report = deploy(deployed, {2, model_in_channels(deployed), 28, 28});
    TORCH_CHECK(!report.merged.empty(), "bench --compare-deployed: ", model.spec,
                " has nothing to merge");
  }
  // Contenders: the model under the policy in force, then (--compare-deployed) its deployed
  // form, then (--compare-kernels) each of them under ATen's kernel choices.
  const bool own_kernels = kernel_policy().dynattn;
  std::vector<Contender> contenders = {{&model, own_kernels}};
  if (a.compare_deployed) contenders.push_back({&deployed, own_kernels});
  if (a.compare_kernels) {
    contenders.push_back({&model, false});
    if (a.compare_deployed) contenders.push_back({&deployed, false});
  }
  const auto rounds =
      contenders.size() > 1
          ? bench_alternating(contenders, options, a.rounds)
          : std::vector<std::vector<ModelBenchResult>>{{benchmark_model(model, options)}};
  std::vector<ModelBenchResult> results;
  for (const auto& r : rounds) results.push_back(median_round(r));
  const ModelBenchResult& r = results[0];
  const size_t deployed_at = 1, aten_at = a.compare_deployed ? 2 : 1, deployed_aten_at = 3;
  const double peak = a.no_peak ? 0.0 : measure_conv_peak_gflops();
  auto j = bench_json(model.spec, threads, a, g, r, peak);
  if (a.compare_deployed) {
    j["deployed"] = bench_json(deployed.spec, threads, a, g, results[deployed_at], peak);
    j["deployed_speedup"] = speedups(rounds[0], rounds[deployed_at]);
  }
  if (a.compare_kernels) {
    j["aten_kernels"] = bench_json(model.spec, threads, a, g, results[aten_at], peak);
    j["aten_kernels"]["kernels"] = "aten";
    // > 1: dynattn's choices are faster than ATen's.
    j["kernels_speedup"] = speedups(rounds[aten_at], rounds[0]);
    if (a.compare_deployed) {
      j["deployed"]["aten_kernels"] =
          bench_json(deployed.spec, threads, a, g, results[deployed_aten_at], peak);
      j["deployed"]["aten_kernels"]["kernels"] = "aten";
      j["deployed"]["kernels_speedup"] = speedups(rounds[deployed_aten_at], rounds[deployed_at]);
    }
  }
  BatchTiming train;
  if (a.train_batch > 0) {
    // A fresh copy: the timed steps change the weights.
    Model fresh = a.checkpoint.empty() ? create_model(model_with_attention(a.model, a.attn))
                                       : load_checkpoint_model(a.checkpoint);
    train = benchmark_train_step(
        fresh, a.train_batch,
        ModelBenchOptions().channels_last(a.channels_last).device(device).min_seconds(a.min_time));
    j["train"] = {{"batch", train.batch},
                  {"median_ms", train.stats.median_ms},
                  {"p90_ms", train.stats.p90_ms},
                  {"iterations", train.stats.iterations},
                  {"images_per_sec", train.images_per_sec}};
  }
  std::printf("model %s%s: %lld parameters, %.2f M MACs per image\n", model.spec.c_str(),
              a.channels_last ? " (channels-last)" : "", static_cast<long long>(r.parameters),
              r.macs_per_image / 1e6);
  std::printf("threads %d, malloc %s, device %s", threads, g.malloc.c_str(), g.device.c_str());
  if (peak > 0) std::printf(", conv peak %.1f GFLOP/s (measured: large 3x3 convolution)", peak);
  std::printf("\n");
  print_result(j);
  if (a.train_batch > 0) {
    std::printf(
        "  train step, batch %lld: median %.2f ms, %.1f images/s (forward, backward, SGD)\n",
        static_cast<long long>(train.batch), train.stats.median_ms, train.images_per_sec);
  }
  if (a.compare_deployed) {
    std::printf("deployed form %s (measured in alternating rounds with the above): %.2f M MACs\n",
                deployed.spec.c_str(), results[deployed_at].macs_per_image / 1e6);
    j["deployed"]["conv_peak_gflops"] = peak;
    print_result(j["deployed"]);
    if (auto* repvgg = dynamic_cast<RepVGGImpl*>(deployed.ptr().get())) {
      const auto kernels = repvgg->onednn_implementations();
      if (!kernels.empty()) {
        const auto winograd = std::count_if(kernels.begin(), kernels.end(), [](const auto& k) {
          return k.find("wino") != std::string::npos;
        });
        std::printf("  oneDNN conv stack (last batch): %lld of %zu convs as Winograd\n",
                    static_cast<long long>(winograd), kernels.size());
        j["deployed"]["onednn_kernels"] = kernels;
      }
    }
    print_speedups(j["deployed_speedup"], "deployed speed-up");
  }
  if (a.compare_kernels) {
    std::printf("with --kernels aten (alternating rounds with the above):\n");
    j["aten_kernels"]["conv_peak_gflops"] = peak;
    print_result(j["aten_kernels"]);
    print_speedups(j["kernels_speedup"], "dynattn's kernels vs ATen's:");
    if (a.compare_deployed) {
      std::printf("deployed form with --kernels aten:\n");
      j["deployed"]["aten_kernels"]["conv_peak_gflops"] = peak;
      print_result(j["deployed"]["aten_kernels"]);
      print_speedups(j["deployed"]["kernels_speedup"], "deployed, dynattn's kernels vs ATen's:");
    }
  }
  if (a.compare_malloc) {
    const std::string other = g.malloc == "tuned" ? "default" : "tuned";
    auto child = run_child_with_malloc(a, other);
    std::printf("same run with --malloc %s (separate process):\n", other.c_str());
    child["conv_peak_gflops"] = peak;
    print_result(child);
    if (child.contains("train")) {
      std::printf("  train step, batch %lld: median %.2f ms, %.1f images/s\n",
                  static_cast<long long>(child["train"]["batch"].get<int64_t>()),
                  child["train"]["median_ms"].get<double>(),
                  child["train"]["images_per_sec"].get<double>());
    }
    j["compare_malloc"] = child;
  }
  if (!a.json.empty()) write_json(a.json, j);
}

}  // namespace

void add_bench_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<BenchArgs>();
  auto* sub = app.add_subcommand("bench", "measure parameters, MACs, latency and throughput");
  auto* model = sub->add_option("--model", a->model, "model spec")->capture_default_str();
  auto* attn = sub->add_option("--attn", a->attn, "attention in every block (model option attn)");
  sub->add_option("--checkpoint", a->checkpoint, "benchmark a trained checkpoint instead")
      ->excludes(model)
      ->excludes(attn);
  sub->add_option("--batch", a->batches, "batch sizes, comma separated")
      ->delimiter(',')
      ->capture_default_str()
      ->check(kPositive);
  sub->add_flag("--channels-last", a->channels_last, "channels-last memory format");
  sub->add_option("--json", a->json, "also write the results as JSON to this file");
  sub->add_option("--min-time", a->min_time, "seconds of timed runs per batch size")
      ->capture_default_str()
      ->check(kNonNegative);
  sub->add_flag("--no-peak", a->no_peak, "skip measuring the machine's conv peak");
  sub->add_option("--train-batch", a->train_batch,
                  "also time one training step (forward, backward, SGD) at this batch size")
      ->check(kNonNegative);
  sub->add_flag("--compare-malloc", a->compare_malloc,
                "also run with the other allocator policy, in a child process");
  sub->add_flag("--compare-deployed", a->compare_deployed,
                "also measure the deployed form (deploy(): conv+BN folded, RepVGG branches "
                "merged), alternating rounds with the model as given");
  sub->add_flag("--compare-kernels", a->compare_kernels,
                "also measure with ATen's kernel choices (--kernels aten), alternating rounds "
                "with dynattn's in one process (with --compare-deployed, for both forms)");
  sub->add_option("--data", a->data, "BranchyNet: Fashion-MNIST directory (timed on test images)")
      ->capture_default_str();
  sub->add_option("--thresholds", a->thresholds,
                  "BranchyNet: exit thresholds to measure instead of the checkpoint's, lists "
                  "separated by ';'");
  sub->add_option("--images", a->images, "BranchyNet: test images cycled through while timing")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_option("--rounds", a->rounds,
                  "alternating rounds of the runs compared (--compare-deployed, "
                  "--compare-kernels; BranchyNet: the dynamic model and its last exit); each "
                  "batch size's --min-time is shared among them, the median round is reported")
      ->capture_default_str()
      ->check(kPositive);
  sub->add_flag("--stream", a->stream,
                "BranchyNet: also the throughput of BranchyStream (queues behind each exit run "
                "once they hold a batch) for each batch size > 1");
  sub->add_option("--device", g.device, "cpu or cuda[:N]")->capture_default_str();
  sub->callback([a, &g, sub] {
    // The child run repeats this subcommand's arguments (minus --json/--compare-malloc).
    a->argv.clear();
    for (const auto* opt : sub->get_options()) {
      if (opt->count() == 0 || opt->get_name() == "--json" ||
          opt->get_name() == "--compare-malloc" || opt->get_name() == "--help") {
        continue;
      }
      const auto name = opt->get_name();
      if (opt->get_expected_min() == 0) {
        a->argv.push_back(name);
      } else {
        a->argv.push_back(name);
        std::string joined;
        for (const auto& r : opt->results()) joined += (joined.empty() ? "" : ",") + r;
        a->argv.push_back(joined);
      }
    }
    if (g.threads > 0) {
      a->argv.push_back("--threads");
      a->argv.push_back(std::to_string(g.threads));
    }
    run_bench(*a, g);
  });
}

}  // namespace dynattn::cli
