#include "dynattn/attention/channel_reduction.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace dynattn {

int64_t make_divisible(double v, int64_t divisor, int64_t min_value, double round_limit) {
  TORCH_CHECK(divisor > 0, "make_divisible: divisor must be positive, got ", divisor);
  TORCH_CHECK(std::isfinite(v) && v >= 0, "make_divisible: value must be finite and >= 0, got ", v);
  const int64_t floor_min = min_value > 0 ? min_value : divisor;
  // Python's int() truncates; v + divisor / 2 is non-negative here, so truncation is floor.
  const auto rounded = static_cast<int64_t>(v + static_cast<double>(divisor) / 2.0);
  int64_t out = std::max(floor_min, rounded / divisor * divisor);
  if (static_cast<double>(out) < round_limit * v) out += divisor;
  return out;
}

int64_t reduced_channels(int64_t channels, double r, const std::string& policy, int64_t divisor,
                         int64_t explicit_channels, const char* module) {
  TORCH_CHECK(channels > 0, module, ": channels must be positive, got ", channels);
  TORCH_CHECK(explicit_channels >= 0, module,
              ": explicit reduced width rd must be positive (0: derive it from r), got ",
              explicit_channels);
  TORCH_CHECK(policy == "floor" || policy == "divisible" || policy == "explicit", module,
              ": reduction policy must be one of floor, divisible, explicit; got '", policy, "'");
  if (explicit_channels > 0) return explicit_channels;
  TORCH_CHECK(policy != "explicit", module,
              ": reduction policy 'explicit' needs an explicit reduced width rd > 0");
  TORCH_CHECK(std::isfinite(r) && r > 0, module, ": reduction ratio r must be positive, got ", r);
  const double v = static_cast<double>(channels) / r;
  if (policy == "floor") return std::max<int64_t>(1, static_cast<int64_t>(std::floor(v)));
  TORCH_CHECK(divisor > 0, module, ": divisor must be positive, got ", divisor);
  return make_divisible(v, divisor, 0, 0.0);
}

}  // namespace dynattn
