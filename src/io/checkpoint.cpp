#include "dynattn/io/checkpoint.h"

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "dynattn/io/atomic_file.h"
#include "dynattn/io/safetensors.h"

namespace dynattn {
namespace {

constexpr const char* kMetaKey = "dynattn";

bool is_directory(const std::string& p) {
  std::error_code ec;
  return std::filesystem::is_directory(p, ec);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

nlohmann::json parse_meta(const std::string& text, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "checkpoint ", origin, ": metadata is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(j.is_object() && j.contains("model") && j["model"].is_string() &&
                  j.contains("epoch") && j["epoch"].is_number_integer(),
              "checkpoint ", origin, ": metadata must be an object with \"model\" and \"epoch\"");
  return j;
}

}  // namespace

NamedTensors state_dict(const torch::nn::Module& module) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value().detach());
  for (const auto& b : module.named_buffers()) out.emplace_back(b.key(), b.value().detach());
  return out;
}

void load_state_dict(torch::nn::Module& module, const NamedTensors& tensors,
                     const std::string& origin) {
  std::map<std::string, torch::Tensor> given(tensors.begin(), tensors.end());
  std::map<std::string, torch::Tensor> targets;
  for (const auto& p : module.named_parameters()) targets[p.key()] = p.value();
  for (const auto& b : module.named_buffers()) targets[b.key()] = b.value();

  std::string problems;
  auto add = [&](const std::string& s) { problems += "\n  " + s; };
  for (const auto& kv : targets) {
    auto it = given.find(kv.first);
    if (it == given.end()) {
      add("missing '" + kv.first + "'");
    } else if (it->second.sizes() != kv.second.sizes()) {
      std::ostringstream os;
      os << "'" << kv.first << "' has shape " << it->second.sizes() << ", the model expects "
         << kv.second.sizes();
      add(os.str());
    } else if (it->second.is_floating_point() != kv.second.is_floating_point()) {
      std::ostringstream os;
      os << "'" << kv.first << "' has dtype " << it->second.dtype() << ", the model expects "
         << kv.second.dtype();
      add(os.str());
    }
  }
  for (const auto& kv : given) {
    if (!targets.count(kv.first)) add("unexpected '" + kv.first + "'");
  }
  TORCH_CHECK(problems.empty(), "loading weights from ", origin, " into ", module.name(),
              " failed:", problems);
  torch::NoGradGuard no_grad;
  for (auto& kv : targets) kv.second.copy_(given.at(kv.first));
}

CheckpointPaths checkpoint_paths(const std::string& path) {
  std::error_code ec;
  TORCH_CHECK(std::filesystem::exists(path, ec), "checkpoint: '", path,
              "' does not exist (expected a run directory, its checkpoint.json or its "
              "model.safetensors)");
  std::string dir = path;
  if (!is_directory(path)) {
    const auto slash = path.find_last_of('/');
    dir = slash == std::string::npos ? "." : path.substr(0, slash);
  }
  CheckpointPaths p;
  p.dir = dir;
  p.weights = dir + "/model.safetensors";
  p.optimizer = dir + "/optimizer.safetensors";
  p.meta = dir + "/checkpoint.json";
  if (!is_directory(path) && ends_with(path, ".safetensors")) p.weights = path;
  return p;
}

void save_checkpoint(const std::string& dir, const torch::nn::Module& model,
                     const std::string& meta_json, const NamedTensors& optimizer_state) {
  const auto meta = parse_meta(meta_json, dir);
  const std::string compact = meta.dump();
  const auto paths = checkpoint_paths(dir);
  TORCH_CHECK(is_directory(dir), "checkpoint: output directory '", dir, "' does not exist");
  // Optimizer first and metadata last: each is atomic on its own, and read_checkpoint checks
  // that the epochs agree, so a crash between the renames is detected, never half-loaded.
  write_safetensors(paths.optimizer, optimizer_state, {{kMetaKey, compact}});
  write_safetensors(paths.weights, state_dict(model), {{kMetaKey, compact}, {"format", "pt"}});
  write_file_atomic(paths.meta, meta.dump(2) + "\n");
}

CheckpointData read_checkpoint(const std::string& path, bool with_optimizer) {
  CheckpointData data;
  data.paths = checkpoint_paths(path);
  auto file = read_safetensors(data.paths.weights);
  auto it = file.metadata.find(kMetaKey);
  TORCH_CHECK(it != file.metadata.end(), "checkpoint ", data.paths.weights,
              ": no dynattn metadata (a plain weights file? load it with `dynattn forward "
              "--weights` or load_state_dict)");
  const auto meta = parse_meta(it->second, data.paths.weights);
  data.meta_json = it->second;
  data.model_spec = meta["model"].get<std::string>();
  data.epoch = meta["epoch"].get<int64_t>();
  data.weights = std::move(file.tensors);
  if (with_optimizer) {
    auto opt = read_safetensors(data.paths.optimizer);
    auto oit = opt.metadata.find(kMetaKey);
    TORCH_CHECK(oit != opt.metadata.end(), "checkpoint ", data.paths.optimizer,
                ": no dynattn metadata");
    const auto ometa = parse_meta(oit->second, data.paths.optimizer);
    TORCH_CHECK(ometa["epoch"].get<int64_t>() == data.epoch, "checkpoint ", data.paths.dir,
                ": optimizer state is from epoch ", ometa["epoch"].get<int64_t>(),
                " but the weights are from epoch ", data.epoch,
                " (interrupted while saving?); cannot resume consistently");
    data.optimizer = std::move(opt.tensors);
  }
  return data;
}

Model load_checkpoint_model(const std::string& path, CheckpointData* out) {
  CheckpointData data = read_checkpoint(path);
  Model model = create_model(data.model_spec);
  load_state_dict(*model.ptr(), data.weights, data.paths.weights);
  model.ptr()->eval();
  if (out) *out = std::move(data);
  return model;
}

}  // namespace dynattn
