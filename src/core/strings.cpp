#include "dynattn/core/strings.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace dynattn {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

namespace {
// Items of `text` separated by ',' or '/', each read whole by parse(item, &used).
template <class T, class Parse>
std::vector<T> parse_list(const std::string& text, const std::string& what, const char* kind,
                          Parse parse) {
  std::vector<T> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find_first_of(",/", start), text.size());
    const std::string item = trim(text.substr(start, end - start));
    size_t used = 0;
    bool ok = !item.empty();
    try {
      if (ok) out.push_back(parse(item, &used));
    } catch (const std::exception&) {
      ok = false;
    }
    TORCH_CHECK(ok && used == item.size(), what, ": expected a list of ", kind,
                " separated by ',' or '/', got '", text, "'");
    start = end + 1;
  }
  return out;
}
}  // namespace

std::vector<int64_t> parse_int_list(const std::string& text, const std::string& what) {
  return parse_list<int64_t>(text, what, "integers", [](const std::string& s, size_t* used) {
    return std::stoll(s, used);
  });
}

std::vector<double> parse_double_list(const std::string& text, const std::string& what) {
  return parse_list<double>(text, what, "numbers",
                            [](const std::string& s, size_t* used) { return std::stod(s, used); });
}

}  // namespace dynattn
