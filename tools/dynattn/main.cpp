// dynattn: train, evaluate, benchmark and inspect attention and dynamic networks.
#include <unistd.h>

#include <cstdio>

#include "cli_common.h"
#include "dynattn/core/version.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/io/atomic_file.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/key_map.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/ops/dispatch.h"

namespace dynattn::cli {

int setup_runtime(const GlobalOptions& g) {
  apply_malloc_policy(parse_malloc_policy(g.malloc));
  const int threads = configure_threads(g.threads);
  KernelPolicy policy;
  policy.dynattn = g.kernels == "dynattn";
  policy.winograd = g.winograd == "never"    ? WinogradPolicy::kNever
                    : g.winograd == "always" ? WinogradPolicy::kWhenSupported
                                             : WinogradPolicy::kMeasured;
  set_kernel_policy(policy);
  if (!g.quiet) {
    const BlasInfo blas = detect_blas();
    std::fprintf(stderr, "%s\n",
                 runtime_banner(threads, parse_malloc_policy(g.malloc), blas).c_str());
    if (blas.reference) std::fprintf(stderr, "%s\n", blas.warning.c_str());
  }
  return threads;
}

torch::Device parse_device(const std::string& text) {
  torch::Device d(torch::kCPU);
  try {
    d = torch::Device(text);
  } catch (const std::exception&) {
    TORCH_CHECK(false, "--device: expected cpu, cuda or cuda:N, got '", text, "'");
  }
  TORCH_CHECK(d.is_cpu() || d.is_cuda(), "--device: expected cpu, cuda or cuda:N, got '", text,
              "'");
  TORCH_CHECK(!d.is_cuda() || torch::cuda::is_available(), "--device ", text,
              ": CUDA is not available in this build or on this machine");
  return d;
}

FashionMnistSplits load_fashion_mnist_splits(const std::string& root, double val_fraction,
                                             uint64_t seed) {
  const FashionMnist raw = load_fashion_mnist(root);
  FashionMnistSplits s{
      InMemoryDataset(raw.train_images, raw.train_labels),
      InMemoryDataset(raw.train_images.slice(0, 0, 0), raw.train_labels.slice(0, 0, 0)),
      InMemoryDataset(raw.test_images, raw.test_labels)};
  if (val_fraction > 0) {
    auto parts = s.train.split_validation(val_fraction, seed);
    s.train = std::move(parts.first);
    s.val = std::move(parts.second);
  }
  return s;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  write_file_atomic(path, j.dump(2) + "\n");
}

int64_t model_in_channels(const Model& model) {
  for (const auto& p : model.ptr()->parameters())
    if (p.dim() == 4) return p.size(1);
  return 1;
}

Model model_from_weights(const std::string& spec, const std::string& weights,
                         const std::string& key_map, const std::string& command) {
  Model model = create_model_or_attention(spec);
  if (!weights.empty()) {
    const SafetensorsFile file = read_safetensors(weights);
    const NamedTensors mapped =
        apply_key_map(file.tensors, get_key_map(key_map), *model.ptr(), weights);
    load_state_dict(*model.ptr(), mapped, weights);
  } else {
    TORCH_CHECK(key_map == "none", command, ": --key-map needs --weights");
  }
  return model;
}

}  // namespace dynattn::cli

int main(int argc, char** argv) {
  using namespace dynattn::cli;
  // Before anything runs: if OpenBLAS fell back to its generic kernels, restart with the right
  // ones (OpenBLAS reads OPENBLAS_CORETYPE only when it is loaded). Returns only on failure.
  const std::string core = dynattn::openblas_core_fix();
  if (!core.empty()) {
    setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
    execv("/proc/self/exe", argv);
  }
  CLI::App app{"dynattn " + dynattn::version() +
               ": attention mechanisms and dynamic networks on LibTorch"};
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand: `dynattn bench --threads 2`
  app.set_version_flag("--version", dynattn::version());
  GlobalOptions g;
  app.add_option("--threads", g.threads,
                 "intra-op threads (default: OMP_NUM_THREADS if set, else every core)")
      ->check(kNonNegative);
  app.add_option("--malloc", g.malloc,
                 "allocator policy: tuned (keep large blocks mapped; default) or default")
      ->check(CLI::IsMember({"tuned", "default"}));
  app.add_flag("--quiet", g.quiet, "do not log the runtime banner");
  app.add_option("--kernels", g.kernels,
                 "CPU kernel choices (ops/dispatch.h): dynattn (the first candidate of each op "
                 "that is available on this CPU and applies), aten (ATen's own choices), or "
                 "list (print each op's candidates for this CPU and exit)")
      ->capture_default_str()
      ->check(CLI::IsMember({"dynattn", "aten", "list"}));
  app.add_option("--winograd", g.winograd,
                 "Winograd convolutions in deployed conv stacks (ops/onednn_chain.h): measured "
                 "(per layer, where timed faster on first use), always (where oneDNN supports "
                 "it) or never")
      ->capture_default_str()
      ->check(CLI::IsMember({"measured", "always", "never"}));
  add_train_command(app, g);
  add_eval_command(app, g);
  add_bench_command(app, g);
  add_zoo_command(app, g);
  add_demo_command(app, g);
  add_forward_command(app, g);
  add_visualize_command(app, g);
  add_deploy_command(app, g);
  add_rebirth_command(app, g);
  add_calibrate_command(app, g);
  // `dynattn --kernels list` needs no subcommand: the report, then exit.
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--kernels=list" ||
        (arg == "--kernels" && i + 1 < argc && std::string(argv[i + 1]) == "list")) {
      std::printf("%s", dynattn::kernel_list_report().c_str());
      return 0;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "dynattn: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dynattn: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
