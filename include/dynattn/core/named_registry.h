// A name -> entry table with built-ins registered on first use, shared by the model zoo and
// the attention slot. Built-ins are added by an explicit function, not by static initialisers
// in other translation units: a static library drops object files nothing references, and
// their registrations with them.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace dynattn {

// `Info` has a `std::string name` member.
template <class Info>
class NamedRegistry {
 public:
  NamedRegistry(std::string what, std::function<void(std::map<std::string, Info>&)> builtins)
      : what_(std::move(what)), builtins_(std::move(builtins)) {}

  void add(Info info) {
    TORCH_CHECK(!info.name.empty(), what_, ": cannot register an entry without a name");
    table()[info.name] = std::move(info);
  }

  // Fails with an error that names the unknown entry, `spec` and every known name.
  const Info& get(const std::string& name, const std::string& spec,
                  const std::string& hint = "") const {
    const auto& t = table();
    auto it = t.find(name);
    if (it == t.end()) {
      std::string known;
      for (const auto& kv : t) known += (known.empty() ? "" : ", ") + kv.first;
      TORCH_CHECK(false, what_, ": unknown ", what_, " '", name, "' in '", spec,
                  "' (known: ", known, hint, ")");
    }
    return it->second;
  }

  std::vector<Info> list() const {
    std::vector<Info> out;
    for (const auto& kv : table()) out.push_back(kv.second);
    return out;
  }

 private:
  std::map<std::string, Info>& table() const {
    std::call_once(once_, [this] { builtins_(table_); });
    return table_;
  }
  std::string what_;
  std::function<void(std::map<std::string, Info>&)> builtins_;
  mutable std::once_flag once_;
  mutable std::map<std::string, Info> table_;
};

}  // namespace dynattn
