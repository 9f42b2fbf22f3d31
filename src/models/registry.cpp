#include "dynattn/models/registry.h"

#include "dynattn/core/named_registry.h"
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

}  // namespace dynattn
