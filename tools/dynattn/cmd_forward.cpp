// `dynattn forward`: runs one registered model or attention module in eval mode on a tensor read
// from a safetensors file and writes the result, so that a user can check a Python model against
// ours (weights from the Python implementation, optionally renamed by a key map).
#include <cstdio>

#include "cli_common.h"
#include "dynattn/attention/attention_maps.h"
#include "dynattn/core/compat.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/key_map.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/models/registry.h"

namespace dynattn::cli {
namespace {

struct ForwardArgs {
  std::string model;
  std::string weights;
  std::string key_map = "none";
  std::string input;
  std::string output;
  std::string input_key = "x";
  std::string output_key = "y";
  bool maps = false;
};

// The module's output and, when asked, its attention maps ("maps.<name>").
NamedTensors run_module(Model& model, const torch::Tensor& x, bool with_maps) {
  NamedTensors out;
  auto* module = model.ptr().get();
  if (with_maps) {
    AttentionOutput result;
    if (auto* attention = dynamic_cast<AttentionWithMaps*>(module)) {
      result = attention->forward_with_maps(x);
    } else if (auto* resnet = dynamic_cast<CifarResNetImpl*>(module)) {
      result = resnet->forward_with_maps(x);
    } else {
      TORCH_CHECK(false, "forward --maps: ", model.spec, " has no attention maps to give");
    }
    out.emplace_back("", result.output);
    for (auto& kv : result.maps) out.emplace_back("maps." + kv.first, kv.second);
    return out;
  }
  out.emplace_back("", model.forward(x));
  return out;
}

void run_forward(const ForwardArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  const torch::Device device = parse_device(g.device);
  Model model = model_from_weights(a.model, a.weights, a.key_map, "forward");
  model.ptr()->eval();
  model.ptr()->to(device);

  const SafetensorsFile in = read_safetensors(a.input);
  const torch::Tensor* x = in.find(a.input_key);
  if (x == nullptr) {
    std::string keys;
    for (const auto& kv : in.tensors) keys += (keys.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK(false, a.input, ": no tensor '", a.input_key,
                "' (it holds: ", keys.empty() ? std::string("nothing") : keys,
                "); choose one with --input-key");
  }
  TORCH_CHECK(x->is_floating_point(), a.input, ": tensor '", a.input_key,
              "' must be floating point, got ", x->scalar_type());
  // Computed in the model's dtype (float32 unless the weights say otherwise).
  const auto params = model.ptr()->parameters();
  const auto dtype = params.empty() ? torch::kFloat : params.front().scalar_type();

  NamedTensors result;
  {
    InferenceGuard guard;
    result = run_module(model, x->to(device, dtype), a.maps);
  }
  for (auto& kv : result) {
    kv.first = kv.first.empty() ? a.output_key : kv.first;
    kv.second = kv.second.to(torch::kCPU).contiguous();
  }
  write_safetensors(a.output, result, {{"model", model.spec}, {"weights", a.weights}});
  std::printf("%s: %s [%s] -> %s [%s] in %s\n", model.spec.c_str(), a.input_key.c_str(),
              c10::str(x->sizes()).c_str(), a.output_key.c_str(),
              c10::str(result.front().second.sizes()).c_str(), a.output.c_str());
  for (size_t i = 1; i < result.size(); ++i) {
    std::printf("  %s [%s]\n", result[i].first.c_str(), c10::str(result[i].second.sizes()).c_str());
  }
}

}  // namespace

void add_forward_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<ForwardArgs>();
  auto* cmd = app.add_subcommand(
      "forward", "Run a model or attention module (eval mode) on a tensor from a safetensors file");
  cmd->add_option("--model", a->model,
                  "model spec (resnet20:attn=se) or attention module with its channel count "
                  "(se:channels=64,r=8)")
      ->required();
  cmd->add_option("--weights", a->weights, "safetensors weights (default: fresh initialisation)")
      ->check(CLI::ExistingFile);
  std::string maps_help = "rename the weights' keys onto ours:";
  for (const auto& m : list_key_maps()) maps_help += "\n  " + m.name + ": " + m.description;
  cmd->add_option("--key-map", a->key_map, maps_help)->capture_default_str();
  cmd->add_option("--input", a->input, "safetensors file holding the input tensor")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--output", a->output, "safetensors file to write (atomically)")->required();
  cmd->add_option("--input-key", a->input_key, "name of the input tensor")->capture_default_str();
  cmd->add_option("--output-key", a->output_key, "name of the output tensor")
      ->capture_default_str();
  cmd->add_flag("--maps", a->maps, "also write the attention maps, as maps.<name>");
  cmd->callback([a, &g] { run_forward(*a, g); });
}

}  // namespace dynattn::cli
