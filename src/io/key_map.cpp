#include "dynattn/io/key_map.h"

#include <map>
#include <set>

#include "dynattn/core/named_registry.h"
#include "dynattn/io/checkpoint.h"

namespace dynattn {
namespace {

NamedRegistry<KeyMap>& key_map_registry() {
  static NamedRegistry<KeyMap> registry("key map", [](std::map<std::string, KeyMap>& table) {
    table["none"] = {"none", "keys are used as they are", {}};
    table["timm"] = {
        "timm",
        "timm layers: SEModule (fc1, fc2: same names), EcaModule (conv: same), CbamModule "
        "(spatial.conv.conv/bn -> spatial.conv/bn; build cbam with max_first=false,"
        "mlp_bias=false), NonLocalAttn (t/p/g/z/norm -> theta/phi/g/z/bn), ByobNet RepVGG "
        "(stem -> stage0, stages.N -> stage<N+1>, conv_kxk/conv_1x1/identity/reparam_conv -> "
        "rbr_dense/rbr_1x1/rbr_identity/rbr_reparam, head.fc -> linear)",
        {{"spatial.conv.conv", "spatial.conv"},
         {"spatial.conv.bn", "spatial.bn"},
         {"t", "theta"},
         {"p", "phi"},
         {"norm", "bn"},
         {"stem", "stage0"},
         {"stages.0", "stage1"},
         {"stages.1", "stage2"},
         {"stages.2", "stage3"},
         {"stages.3", "stage4"},
         {"conv_kxk", "rbr_dense"},
         {"conv_1x1", "rbr_1x1"},
         {"identity", "rbr_identity"},
         {"reparam_conv", "rbr_reparam"},
         {"head.fc", "linear"}}};
    table["repvgg-official"] = {
        "repvgg-official",
        "RepVGG of the authors' code (DingXiaoH/RepVGG, repvgg.py): its names are dynattn's own "
        "(stage0..4, rbr_dense.conv/bn, rbr_1x1.conv/bn, rbr_identity, rbr_reparam, linear)",
        {}};
    table["cbam-official"] = {
        "cbam-official",
        "CBAM of the authors' code (Jongchan/attention-module, MODELS/cbam.py): "
        "ChannelGate.mlp.1/3 -> channel.fc1/fc2 (Linear -> 1x1 conv), "
        "SpatialGate.spatial.conv/bn -> spatial.conv/bn",
        {{"ChannelGate.mlp.1", "channel.fc1"},
         {"ChannelGate.mlp.3", "channel.fc2"},
         {"SpatialGate.spatial.conv", "spatial.conv"},
         {"SpatialGate.spatial.bn", "spatial.bn"}}};
  });
  return registry;
}

std::vector<std::string> split_segments(const std::string& key) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    out.push_back(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) return out;
    start = dot + 1;
  }
}

std::string join_segments(const std::vector<std::string>& segments) {
  std::string out;
  for (const auto& s : segments) out += (out.empty() ? "" : ".") + s;
  return out;
}

// Replaces the first run of `from` segments in `segments`, never matching the last segment
// (the tensor's own name: "weight", "running_mean"), so that a rule "p" -> "phi" cannot rename
// a parameter called p.
bool replace_run(std::vector<std::string>& segments, const std::vector<std::string>& from,
                 const std::vector<std::string>& to) {
  if (from.empty() || segments.size() <= from.size()) return false;
  for (size_t i = 0; i + from.size() < segments.size(); ++i) {
    if (std::equal(from.begin(), from.end(), segments.begin() + static_cast<std::ptrdiff_t>(i))) {
      segments.erase(segments.begin() + static_cast<std::ptrdiff_t>(i),
                     segments.begin() + static_cast<std::ptrdiff_t>(i + from.size()));
      segments.insert(segments.begin() + static_cast<std::ptrdiff_t>(i), to.begin(), to.end());
      return true;
    }
  }
  return false;
}

}  // namespace

void register_key_map(KeyMap map) {
  for (const auto& r : map.renames) {
    TORCH_CHECK(!r.from.empty() && !r.to.empty(), "key map ", map.name,
                ": a rename needs both sides, got '", r.from, "' -> '", r.to, "'");
  }
  key_map_registry().add(std::move(map));
}

const KeyMap& get_key_map(const std::string& name) {
  return key_map_registry().get(name, name);
}

std::vector<KeyMap> list_key_maps() {
  return key_map_registry().list();
}

std::string rename_key(const std::string& key, const KeyMap& map) {
  auto segments = split_segments(key);
  for (const auto& r : map.renames)
    replace_run(segments, split_segments(r.from), split_segments(r.to));
  return join_segments(segments);
}

NamedTensors apply_key_map(const NamedTensors& source, const KeyMap& map,
                           const torch::nn::Module& target, const std::string& origin) {
  std::map<std::string, torch::Tensor> wanted;
  for (auto& kv : state_dict(target)) wanted.emplace(kv.first, kv.second);
  NamedTensors out;
  std::set<std::string> used;
  std::string unmatched;
  for (const auto& kv : source) {
    std::string key = rename_key(kv.first, map);
    if (!wanted.count(key) && wanted.count(kv.first)) key = kv.first;
    auto it = wanted.find(key);
    if (it == wanted.end()) {
      unmatched += "\n  " + kv.first + (key != kv.first ? " (renamed " + key + ")" : "");
      continue;
    }
    TORCH_CHECK(used.insert(key).second, origin, ": two tensors map onto '", key,
                "' with key map '", map.name, "'");
    torch::Tensor value = kv.second;
    const auto& shape = it->second.sizes();
    // Linear [O,I] -> 1x1 convolution [O,I,1,...]: the same numbers.
    if (value.dim() == 2 && static_cast<int64_t>(shape.size()) > 2 && shape[0] == value.size(0) &&
        shape[1] == value.size(1) && it->second.numel() == value.numel()) {
      value = value.reshape(shape);
    }
    out.emplace_back(key, value);
  }
  TORCH_CHECK(unmatched.empty(), origin, ": with key map '", map.name,
              "', these tensors match no parameter or buffer of the model:", unmatched);
  return out;
}

}  // namespace dynattn
