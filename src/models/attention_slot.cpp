#include "dynattn/models/attention_slot.h"

#include <map>
#include <mutex>

namespace dynattn {
namespace {

std::map<std::string, AttentionInfo>& attention_table() {
  static std::map<std::string, AttentionInfo> table;
  return table;
}

// Built-ins are registered explicitly here, not by static initialisers in other translation
// units: a static library drops object files nothing references, and their registration
// with them.
std::map<std::string, AttentionInfo>& registered_attention() {
  static std::once_flag once;
  std::call_once(once, [] {
    attention_table()["none"] = {"none", "no attention (the slot is empty)",
                                 [](int64_t, const OptionMap& o) {
                                   o.check_known({});
                                   return torch::nn::AnyModule();
                                 }};
  });
  return attention_table();
}

}  // namespace

void register_attention(AttentionInfo info) {
  auto& table = registered_attention();
  TORCH_CHECK(!info.name.empty() && info.build, "register_attention: name and builder required");
  table[info.name] = std::move(info);
}

torch::nn::AnyModule create_attention(const std::string& spec, int64_t channels) {
  const NamedOptions parsed = parse_named_options(spec, "attention");
  const auto& table = registered_attention();
  auto it = table.find(parsed.name);
  if (it == table.end()) {
    std::string known;
    for (const auto& kv : table) known += (known.empty() ? "" : ", ") + kv.first;
    TORCH_CHECK(false, "attention: unknown type '", parsed.name, "' in '", spec,
                "' (known: ", known, ")");
  }
  TORCH_CHECK(channels > 0, "attention ", parsed.name, ": channels must be positive, got ",
              channels);
  return it->second.build(channels, parsed.options);
}

std::vector<AttentionInfo> list_attention() {
  std::vector<AttentionInfo> out;
  for (const auto& kv : registered_attention()) out.push_back(kv.second);
  return out;
}

}  // namespace dynattn
