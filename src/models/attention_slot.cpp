#include "dynattn/models/attention_slot.h"

#include "dynattn/attention/bam.h"
#include "dynattn/attention/cbam.h"
#include "dynattn/attention/efficient_channel_attention.h"
#include "dynattn/attention/non_local.h"
#include "dynattn/attention/squeeze_excitation.h"
#include "dynattn/core/named_registry.h"

namespace dynattn {
namespace {

NamedRegistry<AttentionInfo>& attention_registry() {
  static NamedRegistry<AttentionInfo> registry(
      "attention", [](std::map<std::string, AttentionInfo>& table) {
        table["none"] = {"none", "no attention (the slot is empty)",
                         [](int64_t, const OptionMap& o) {
                           o.check_known({});
                           return torch::nn::AnyModule();
                         }};
        table["se"] = squeeze_excitation_attention_info();
        table["eca"] = efficient_channel_attention_info();
        table["cbam"] = cbam_attention_info();
        table["bam"] = bam_attention_info();
        table["nl"] = non_local_attention_info();
      });
  return registry;
}

}  // namespace

void register_attention(AttentionInfo info) {
  TORCH_CHECK(info.build, "register_attention: '", info.name, "' has no builder");
  attention_registry().add(std::move(info));
}

torch::nn::AnyModule create_attention(const std::string& spec, int64_t channels) {
  const NamedOptions parsed = parse_named_options(spec, "attention");
  const auto& info = attention_registry().get(parsed.name, spec);
  TORCH_CHECK(channels > 0, "attention ", parsed.name, ": channels must be positive, got ",
              channels);
  return info.build(channels, parsed.options);
}

std::vector<AttentionInfo> list_attention() {
  return attention_registry().list();
}

}  // namespace dynattn
