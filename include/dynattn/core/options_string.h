// Option strings: "name:key=value,key=value", the one textual form used to configure models
// (`resnet20:attn=se,width=16`), attention modules (`se:r=8`) and CLI flags.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dynattn {

// A parsed option string. Getters convert values and fail with an error that names the
// context (e.g. "model resnet20"), the key and what was expected.
class OptionMap {
 public:
  OptionMap() = default;
  // Parses "key=value,key=value" (no name). `context` is used in error messages.
  static OptionMap parse(const std::string& text, const std::string& context);

  bool has(const std::string& key) const;
  void set(const std::string& key, const std::string& value);
  std::string get_string(const std::string& key, const std::string& fallback) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  // Fails naming every key not in `known`: a typo must not be silently ignored.
  void check_known(const std::vector<std::string>& known) const;

  const std::map<std::string, std::string>& values() const { return values_; }
  const std::string& context() const { return context_; }
  bool empty() const { return values_.empty(); }
  // Canonical "k=v,k=v" (keys sorted), so equal options print equally.
  std::string to_string() const;

 private:
  std::string context_;
  std::map<std::string, std::string> values_;
};

// "name:k=v,..." split into the name and its options.
struct NamedOptions {
  std::string name;
  OptionMap options;
  std::string to_string() const;
};
NamedOptions parse_named_options(const std::string& spec, const std::string& what);

}  // namespace dynattn
