#include "dynattn/models/registry.h"

#include <algorithm>
#include <cctype>

#include "dynattn/core/named_registry.h"
#include "dynattn/core/strings.h"
#include "dynattn/dynamic/branchy.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/models/inception_net.h"
#include "dynattn/models/repvgg.h"

namespace dynattn {
namespace {

// A CIFAR ResNet of one depth; `defaults` gives a variant its attention (`se_resnet20` is
// `resnet20` with attn=se); every default can still be overridden in the spec.
ModelInfo cifar_resnet_info(const std::string& prefix, int64_t depth, const std::string& what,
                            const std::map<std::string, std::string>& defaults) {
  ModelInfo info;
  info.name = prefix + "resnet" + std::to_string(depth);
  info.description = "CIFAR-style ResNet-" + std::to_string(depth) +
                     " (basic blocks, widths 16/32/64) for 28x28 inputs" + what;
  info.option_keys = {"attn",     "stage_attn",     "stage_attn_after", "head",        "width",
                      "shortcut", "zero_init_last", "classes",          "in_channels", "deployed",
                      "sd",       "sd_p",           "sd_mode",          "sd_exec",     "sd_test"};
  info.build = [depth, defaults, name = info.name](const OptionMap& given) {
    OptionMap o = given;
    for (const auto& kv : defaults)
      if (!o.has(kv.first)) o.set(kv.first, kv.second);
    return torch::nn::AnyModule(CifarResNet(
        CifarResNetOptions()
            .depth(depth)
            .attention(o.get_string("attn", "none"))
            .stage_attention(o.get_string("stage_attn", "none"))
            .stage_attention_after(parse_int_list(o.get_string("stage_attn_after", "1/2"),
                                                  "model " + name + " option stage_attn_after"))
            .head(o.get_string("head", "avg"))
            .deployed(o.get_bool("deployed", false))
            .base_width(o.get_int("width", 16))
            .shortcut(o.get_string("shortcut", "conv"))
            .zero_init_last(o.get_bool("zero_init_last", true))
            .num_classes(o.get_int("classes", 10))
            .in_channels(o.get_int("in_channels", 1))
            .stochastic_depth(StochasticDepthOptions()
                                  .schedule(o.get_string("sd", "none"))
                                  .survival(o.get_double("sd_p", 0.5))
                                  .granularity(o.get_string("sd_mode", "batch"))
                                  .execution(o.get_string("sd_exec", "mask"))
                                  .test_time(o.get_string("sd_test", "auto")))));
  };
  return info;
}

// BranchyNet on a CIFAR ResNet of one depth (dynamic/branchy.h): side exits after stages 1
// and 2 by default; `thresholds` (one per side exit, '/'-separated) are what a calibration writes.
ModelInfo branchy_resnet_info(int64_t depth) {
  ModelInfo info;
  info.name = "branchy_resnet" + std::to_string(depth);
  info.description = "BranchyNet ResNet-" + std::to_string(depth) +
                     ": side exits (conv + FC heads, default after stages 1 and 2), entropy "
                     "thresholds, exec=compact|mask";
  info.option_keys = {"exits", "exit_weights", "thresholds",     "exec",    "exit_width", "attn",
                      "width", "shortcut",     "zero_init_last", "classes", "in_channels"};
  info.build = [depth, name = info.name](const OptionMap& o) {
    const std::string context = "model " + name + " option ";
    std::vector<std::string> exits;
    const std::string text = o.get_string("exits", "1/2");
    for (size_t start = 0; start <= text.size();) {
      const size_t end = std::min(text.find_first_of(",/", start), text.size());
      exits.push_back(trim(text.substr(start, end - start)));
      start = end + 1;
    }
    if (text == "none") exits.clear();
    const std::string weights = o.get_string("exit_weights", "");
    const std::string thresholds = o.get_string("thresholds", "");
    return torch::nn::AnyModule(BranchyResNet(
        BranchyOptions()
            .backbone(CifarResNetOptions()
                          .depth(depth)
                          .attention(o.get_string("attn", "none"))
                          .base_width(o.get_int("width", 16))
                          .shortcut(o.get_string("shortcut", "conv"))
                          .zero_init_last(o.get_bool("zero_init_last", true))
                          .num_classes(o.get_int("classes", 10))
                          .in_channels(o.get_int("in_channels", 1)))
            .exits(exits)
            .exit_weights(weights.empty() ? std::vector<double>{}
                                          : parse_double_list(weights, context + "exit_weights"))
            .thresholds(thresholds.empty() ? std::vector<double>{}
                                           : parse_double_list(thresholds, context + "thresholds"))
            .execution(o.get_string("exec", "compact"))
            .exit_width(o.get_int("exit_width", 32))));
  };
  return info;
}

// RepVGG-<family>[g<groups>] (A0, A1, B0; g2/g4 group the official layers 2, 4, 6, ...).
ModelInfo repvgg_info(const std::string& family, int64_t groups) {
  ModelInfo info;
  std::string upper = family;
  for (auto& c : upper) c = static_cast<char>(std::toupper(c));
  const std::string suffix = groups > 1 ? "g" + std::to_string(groups) : "";
  info.name = "repvgg_" + family + suffix;
  info.description = "RepVGG-" + upper + suffix +
                     " (3x3 + 1x1 + identity branches, fused by deploy) for 28x28 inputs";
  info.option_keys = {"groups", "strides", "classes", "in_channels", "deployed"};
  info.build = [family, groups, name = info.name](const OptionMap& o) {
    return torch::nn::AnyModule(
        RepVGG(RepVGGOptions::family(family)
                   .groups(o.get_int("groups", groups))
                   .strides(parse_int_list(o.get_string("strides", "1/2/2/2/2"),
                                           "model " + name + " option strides"))
                   .num_classes(o.get_int("classes", 10))
                   .in_channels(o.get_int("in_channels", 1))
                   .deployed(o.get_bool("deployed", false))));
  };
  return info;
}

// The GoogLeNet-style network of DeepRebirth (models/inception_net.h); `merge` selects a merged
// structure, so that a checkpoint of a merged model rebuilds it.
ModelInfo inception_net_info() {
  ModelInfo info;
  info.name = "inception_net";
  info.description =
      "GoogLeNet-style net (3x3 stem, inception 3a/3b/4a/4b) for 28x28 inputs; "
      "merge=streamline|branch|all gives DeepRebirth's merged forms";
  info.option_keys = {"width", "merge", "classes", "in_channels", "deployed"};
  info.build = [](const OptionMap& o) {
    return torch::nn::AnyModule(InceptionNet(InceptionNetOptions()
                                                 .width(o.get_double("width", 0.5))
                                                 .merge(o.get_string("merge", "none"))
                                                 .num_classes(o.get_int("classes", 10))
                                                 .in_channels(o.get_int("in_channels", 1))
                                                 .deployed(o.get_bool("deployed", false))));
  };
  return info;
}

NamedRegistry<ModelInfo>& model_registry() {
  static NamedRegistry<ModelInfo> registry("model", [](std::map<std::string, ModelInfo>& table) {
    auto add = [&table](ModelInfo info) { table[info.name] = std::move(info); };
    for (int64_t depth : {20, 32, 56, 110}) add(cifar_resnet_info("", depth, "", {}));
    for (int64_t depth : {20, 32, 56}) {
      add(cifar_resnet_info("se_", depth, ", squeeze-and-excitation in every block",
                            {{"attn", "se"}}));
      add(cifar_resnet_info("eca_", depth, ", efficient channel attention in every block",
                            {{"attn", "eca"}}));
      add(cifar_resnet_info("cbam_", depth, ", CBAM in every block", {{"attn", "cbam"}}));
      add(cifar_resnet_info("bam_", depth, ", BAM after stages 1 and 2",
                            {{"stage_attn", "bam"}, {"stage_attn_after", "1/2"}}));
      add(cifar_resnet_info("nl_", depth, ", a non-local block after stage 2 (14x14)",
                            {{"stage_attn", "nl"}, {"stage_attn_after", "2"}}));
      add(cifar_resnet_info("bcnn_", depth, ", full bilinear pooling head (B-CNN)",
                            {{"head", "full"}}));
      add(cifar_resnet_info("cbp_", depth, ", compact bilinear head (Tensor Sketch, d=2048)",
                            {{"head", "tensor_sketch"}}));
    }
    for (int64_t depth : {20, 32, 56, 110}) add(branchy_resnet_info(depth));
    for (const char* family : {"a0", "a1", "b0"})
      for (int64_t groups : {1, 2, 4}) add(repvgg_info(family, groups));
    add(inception_net_info());
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
