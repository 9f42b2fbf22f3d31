#include "dynattn/core/options_string.h"

#include "dynattn/core/strings.h"

#include <torch/torch.h>

#include <cerrno>
#include <cstdlib>

namespace dynattn {
namespace {
// Position of the next ',' outside square brackets, or text.size().
size_t find_top_level_comma(const std::string& text, size_t pos, const std::string& context) {
  int depth = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    if (text[i] == '[') ++depth;
    if (text[i] == ']') --depth;
    TORCH_CHECK(depth >= 0, context, ": unbalanced ']' in '", text, "'");
    if (text[i] == ',' && depth == 0) return i;
  }
  TORCH_CHECK(depth == 0, context, ": unbalanced '[' in '", text, "'");
  return text.size();
}
}  // namespace

OptionMap OptionMap::parse(const std::string& text, const std::string& context) {
  OptionMap m;
  m.context_ = context;
  size_t pos = 0;
  while (pos <= text.size()) {
    const auto comma = find_top_level_comma(text, pos, context);
    const std::string item = trim(text.substr(pos, comma - pos));
    pos = comma + 1;
    if (item.empty()) {
      if (comma == text.size()) break;
      continue;
    }
    const auto eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos && eq > 0, context, ": option '", item,
                "' is not of the form key=value (in '", text, "')");
    const std::string key = trim(item.substr(0, eq));
    TORCH_CHECK(!m.values_.count(key), context, ": option '", key, "' given twice in '", text, "'");
    std::string value = trim(item.substr(eq + 1));
    // "[...]" groups a nested option string: attn=[cbam:r=8,kernel=7].
    if (value.size() >= 2 && value.front() == '[' && value.back() == ']') {
      value = value.substr(1, value.size() - 2);
    }
    m.values_[key] = value;
  }
  return m;
}

bool OptionMap::has(const std::string& key) const {
  return values_.count(key) > 0;
}

void OptionMap::set(const std::string& key, const std::string& value) {
  values_[key] = value;
}

std::string OptionMap::get_string(const std::string& key, const std::string& fallback) const {
  auto it = values_.find(key);
  return it == values_.end() ? fallback : it->second;
}

int64_t OptionMap::get_int(const std::string& key, int64_t fallback) const {
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  TORCH_CHECK(errno == 0 && end != it->second.c_str() && *end == '\0', context_, ": option '", key,
              "' expects an integer, got '", it->second, "'");
  return v;
}

double OptionMap::get_double(const std::string& key, double fallback) const {
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(it->second.c_str(), &end);
  TORCH_CHECK(errno == 0 && end != it->second.c_str() && *end == '\0', context_, ": option '", key,
              "' expects a number, got '", it->second, "'");
  return v;
}

bool OptionMap::get_bool(const std::string& key, bool fallback) const {
  auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  const std::string& v = it->second;
  if (v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  TORCH_CHECK(false, context_, ": option '", key, "' expects true/false, got '", v, "'");
}

void OptionMap::check_known(const std::vector<std::string>& known) const {
  for (const auto& kv : values_) {
    if (std::find(known.begin(), known.end(), kv.first) != known.end()) continue;
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    TORCH_CHECK(false, context_, ": unknown option '", kv.first,
                "' (known: ", list.empty() ? std::string("none") : list, ")");
  }
}

std::string OptionMap::to_string() const {
  std::string out;
  for (const auto& kv : values_) {
    const bool nested = kv.second.find_first_of(",=") != std::string::npos;
    out += (out.empty() ? "" : ",") + kv.first + "=" + (nested ? "[" + kv.second + "]" : kv.second);
  }
  return out;
}

std::string NamedOptions::to_string() const {
  const std::string opts = options.to_string();
  return opts.empty() ? name : name + ":" + opts;
}

NamedOptions parse_named_options(const std::string& spec, const std::string& what) {
  const auto colon = spec.find(':');
  NamedOptions out;
  out.name = trim(spec.substr(0, colon));
  TORCH_CHECK(!out.name.empty(), what, ": empty name in '", spec, "'");
  const std::string rest = colon == std::string::npos ? "" : spec.substr(colon + 1);
  out.options = OptionMap::parse(rest, what + " " + out.name);
  return out;
}

}  // namespace dynattn
