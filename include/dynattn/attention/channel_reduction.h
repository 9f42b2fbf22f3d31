// Width of the bottleneck in channel-attention MLPs (SE, CBAM, BAM): C/r as the papers define
// it, timm's make_divisible() rounding, or an explicit count. Not a paper concept itself; it
// exists so that the modules agree on one definition and the importers can match timm's widths.
#pragma once
#include <cstdint>
#include <string>

namespace dynattn {

// timm.layers.helpers.make_divisible: the multiple of `divisor` nearest to v (rounding half
// up), at least `min_value` (0 means `divisor`), raised by one `divisor` when rounding down lost
// more than (1 - round_limit) of v. make_divisible(4) = 8, make_divisible(11) = 16,
// make_divisible(11, 8, 0, 0.0) = 8.
int64_t make_divisible(double v, int64_t divisor = 8, int64_t min_value = 0,
                       double round_limit = 0.9);

// Reduced width for `channels` input channels and reduction ratio `r`:
//   "floor"      max(1, floor(C / r)), the papers' C/r (official CBAM/BAM code: C // r);
//   "divisible"  make_divisible(C / r, divisor, 0, round_limit = 0), as timm's SEModule
//                (divisor 8: 8 for C = 64, r = 16) and CbamModule (divisor 1) call it;
//   "explicit"   `explicit_channels`, which must then be positive.
// A positive `explicit_channels` wins over the policy (timm's rd_channels); 0 means "not given".
// `module` names the caller in error messages.
int64_t reduced_channels(int64_t channels, double r, const std::string& policy = "floor",
                         int64_t divisor = 8, int64_t explicit_channels = 0,
                         const char* module = "reduced_channels");

}  // namespace dynattn
