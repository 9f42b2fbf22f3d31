// `dynattn deploy`: the deployed form of a trained checkpoint (every conv + BN pair folded, see
// include/dynattn/reparam/deploy.h), written as a checkpoint that `eval` and `bench` accept.
#include <cstdio>
#include <filesystem>

#include "cli_common.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn::cli {
namespace {

struct DeployArgs {
  std::string checkpoint;
  std::string model, weights, key_map = "none";  // instead of --checkpoint: imported weights
  std::string out;
  std::string json;
};

void run_deploy(const DeployArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  TORCH_CHECK(a.checkpoint.empty() != a.model.empty(),
              "deploy: give either --checkpoint, or --model with --weights (and --key-map)");
  TORCH_CHECK(a.model.empty() || !a.weights.empty(),
              "deploy: --model needs --weights (deploying fresh random weights is pointless)");
  CheckpointData ckpt;
  Model model;
  std::string source;
  if (!a.checkpoint.empty()) {
    model = load_checkpoint_model(a.checkpoint, &ckpt);
    source = ckpt.paths.weights;
  } else {
    model = model_from_weights(a.model, a.weights, a.key_map, "deploy");
    ckpt.meta_json = nlohmann::json{{"model", model.spec}, {"epoch", 0}}.dump();
    source = a.weights;
  }
  model.ptr()->eval();
  const std::string trained_spec = model.spec;
  const DeployReport r = deploy(model, {2, model_in_channels(model), 28, 28});

  nlohmann::json meta = nlohmann::json::parse(ckpt.meta_json);
  meta["model"] = model.spec;
  meta["deployed_from"] = {{"checkpoint", source}, {"model", trained_spec}};
  if (!a.model.empty()) meta["deployed_from"]["key_map"] = a.key_map;
  // The optimizer state belongs to the trained form: a deployed checkpoint has none.
  std::filesystem::create_directories(a.out);
  save_checkpoint(a.out, *model.ptr(), meta.dump(), {});

  std::printf("%s -> %s\n", trained_spec.c_str(), model.spec.c_str());
  std::printf("merged %zu:", r.merged.size());
  for (const auto& m : r.merged) std::printf("\n  %s", m.c_str());
  std::printf("\nparameters %lld -> %lld, MACs/image %.2f M -> %.2f M\n",
              static_cast<long long>(r.parameters_before),
              static_cast<long long>(r.parameters_after), r.macs_before / 2e6, r.macs_after / 2e6);
  std::printf("max |output difference| %.3g (output scale %.3g) on random inputs\n", r.max_abs_diff,
              r.output_scale);
  std::printf("wrote %s\n", a.out.c_str());
  if (!a.json.empty()) {
    write_json(a.json, {{"model", model.spec},
                        {"trained_model", trained_spec},
                        {"merged", r.merged},
                        {"parameters_before", r.parameters_before},
                        {"parameters_after", r.parameters_after},
                        {"macs_per_image_before", r.macs_before / 2},
                        {"macs_per_image_after", r.macs_after / 2},
                        {"max_abs_diff", r.max_abs_diff},
                        {"output_scale", r.output_scale}});
  }
}

}  // namespace

void add_deploy_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<DeployArgs>();
  auto* cmd = app.add_subcommand(
      "deploy",
      "Fold a trained model into its inference form (conv + BN pairs and RepVGG branches merged)");
  cmd->add_option("--checkpoint", a->checkpoint, "run directory or model.safetensors");
  cmd->add_option("--model", a->model,
                  "instead of --checkpoint: model spec of --weights, e.g. repvgg_a0");
  cmd->add_option("--weights", a->weights, "safetensors weights for --model");
  cmd->add_option("--key-map", a->key_map,
                  "rename the weights' keys onto ours (timm, repvgg-official, ...; "
                  "`dynattn forward --help` lists them)")
      ->capture_default_str();
  cmd->add_option("--out", a->out, "directory for the deployed checkpoint")->required();
  cmd->add_option("--json", a->json, "also write the report as JSON");
  cmd->callback([a, &g] { run_deploy(*a, g); });
}

}  // namespace dynattn::cli
