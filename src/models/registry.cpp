#include "dynattn/models/registry.h"

#include "dynattn/core/named_registry.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/cifar_resnet.h"

namespace dynattn {
namespace {

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

NamedRegistry<ModelInfo>& model_registry() {
  static NamedRegistry<ModelInfo> registry("model", [](std::map<std::string, ModelInfo>& table) {
    for (int64_t depth : {20, 32, 56, 110}) {
      auto info = cifar_resnet_info(depth);
      table[info.name] = info;
    }
  });
  return registry;
}

}  // namespace

void register_model(ModelInfo info) {
  TORCH_CHECK(info.build, "register_model: '", info.name, "' has no builder");
  model_registry().add(std::move(info));
}

Model create_model(const std::string& spec) {
  const NamedOptions parsed = parse_named_options(spec, "model");
  const auto& info = model_registry().get(parsed.name, spec, "; `dynattn zoo` lists them");
  parsed.options.check_known(info.option_keys);
  Model model;
  model.spec = parsed.to_string();
  model.module = info.build(parsed.options);
  return model;
}

std::vector<ModelInfo> list_models() {
  return model_registry().list();
}

Model create_model_or_attention(const std::string& spec) {
  const NamedOptions parsed = parse_named_options(spec, "model");
  for (const auto& info : list_models())
    if (info.name == parsed.name) return create_model(spec);
  bool is_attention = false;
  for (const auto& info : list_attention()) is_attention |= info.name == parsed.name;
  if (!is_attention) {
    std::string known;
    for (const auto& info : list_models()) known += (known.empty() ? "" : ", ") + info.name;
    for (const auto& info : list_attention()) known += ", " + info.name;
    TORCH_CHECK(false, "model: unknown model or attention module '", parsed.name, "' in '", spec,
                "' (known: ", known, ")");
  }
  TORCH_CHECK(parsed.options.has("channels"), "attention ", parsed.name,
              ": give the channel count as an option, e.g. '", parsed.name, ":channels=64'");
  const int64_t channels = parsed.options.get_int("channels", 0);
  OptionMap rest;
  for (const auto& kv : parsed.options.values())
    if (kv.first != "channels") rest.set(kv.first, kv.second);
  const std::string attention_spec = parsed.name + (rest.empty() ? "" : ":" + rest.to_string());
  Model model;
  model.spec = parsed.to_string();
  model.module = create_attention(attention_spec, channels);
  TORCH_CHECK(!model.module.is_empty(), "attention ", parsed.name,
              " is empty: there is nothing to run");
  return model;
}

}  // namespace dynattn
