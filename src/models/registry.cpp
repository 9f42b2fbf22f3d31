#include "dynattn/models/registry.h"

#include <map>
#include <mutex>

#include "dynattn/models/cifar_resnet.h"

namespace dynattn {
namespace {

std::map<std::string, ModelInfo>& model_table() {
  static std::map<std::string, ModelInfo> table;
  return table;
}

ModelInfo cifar_resnet_info(int64_t depth) {
  ModelInfo info;
  info.name = "resnet" + std::to_string(depth);
  info.description = "CIFAR-style ResNet-" + std::to_string(depth) +
                     " (basic blocks, widths 16/32/64) for 28x28 inputs";
  info.option_keys = {"attn", "width", "shortcut", "zero_init_last", "classes", "in_channels"};
  info.build = [depth](const OptionMap& o) {
    return torch::nn::AnyModule(CifarResNet(CifarResNetOptions()
                                                .depth(depth)
                                                .attention(o.get_string("attn", "none"))
                                                .base_width(o.get_int("width", 16))
                                                .shortcut(o.get_string("shortcut", "conv"))
                                                .zero_init_last(o.get_bool("zero_init_last", true))
                                                .num_classes(o.get_int("classes", 10))
                                                .in_channels(o.get_int("in_channels", 1))));
  };
  return info;
}

// Built-ins are registered here explicitly (see attention_slot.cpp for why).
std::map<std::string, ModelInfo>& registered_models() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (int64_t depth : {20, 32, 56, 110}) {
      auto info = cifar_resnet_info(depth);
      model_table()[info.name] = info;
    }
  });
  return model_table();
}

}  // namespace

void register_model(ModelInfo info) {
  auto& table = registered_models();
  TORCH_CHECK(!info.name.empty() && info.build, "register_model: name and builder required");
  table[info.name] = std::move(info);
}

Model create_model(const std::string& spec) {
  const NamedOptions parsed = parse_named_options(spec, "model");
  const auto& table = registered_models();
  auto it = table.find(parsed.name);
  if (it == table.end()) {
    std::string known;
    for (const auto& kv : table) known += (known.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK(false, "model: unknown model '", parsed.name, "' (known: ", known,
                "; `dynattn zoo` lists them)");
  }
  parsed.options.check_known(it->second.option_keys);
  Model model;
  model.spec = parsed.to_string();
  model.module = it->second.build(parsed.options);
  return model;
}

std::vector<ModelInfo> list_models() {
  std::vector<ModelInfo> out;
  for (const auto& kv : registered_models()) out.push_back(kv.second);
  return out;
}

}  // namespace dynattn
