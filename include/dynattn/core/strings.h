// Small string helpers shared by the option parser, the runtime probes and the registries.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dynattn {

// `s` without leading and trailing spaces, tabs, carriage returns and newlines.
std::string trim(const std::string& s);

// "1,2, 3" or "1/2/3" -> {1, 2, 3} ('/' inside model specs, where ',' separates options).
// Fails naming `what` unless every item is an integer.
std::vector<int64_t> parse_int_list(const std::string& text, const std::string& what);
// The same for numbers ("0.05/0.2", "inf" allowed).
std::vector<double> parse_double_list(const std::string& text, const std::string& what);

}  // namespace dynattn
