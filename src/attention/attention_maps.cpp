#include "dynattn/attention/attention_maps.h"

#include <sstream>

namespace dynattn {

AttentionOutput gated_output(const torch::Tensor& x, const torch::Tensor& gate) {
  AttentionOutput out;
  out.output = x * gate;
  out.maps["gate"] = gate;
  return out;
}

void check_attention_input(const char* module, const torch::Tensor& x, int64_t channels,
                           int64_t spatial_dims) {
  static const char* const kLayouts[] = {"[N,C,L]", "[N,C,H,W]", "[N,C,T,H,W]"};
  TORCH_CHECK(spatial_dims >= 1 && spatial_dims <= 3, module,
              ": spatial_dims must be 1, 2 or 3, got ", spatial_dims);
  TORCH_CHECK(x.defined(), module, ": expected a ", spatial_dims + 2, "-D input ",
              kLayouts[spatial_dims - 1], ", got an undefined tensor");
  const bool rank_ok = x.dim() == spatial_dims + 2;
  const bool channels_ok = channels <= 0 || (rank_ok && x.size(1) == channels);
  if (!rank_ok || !channels_ok) {
    std::ostringstream expected;
    expected << spatial_dims + 2 << "-D input " << kLayouts[spatial_dims - 1];
    if (channels > 0) expected << " with C=" << channels;
    TORCH_CHECK(false, module, ": expected a ", expected.str(), ", got ", x.sizes());
  }
  TORCH_CHECK(x.is_floating_point(), module, ": expected a floating-point input, got ",
              x.scalar_type());
}

}  // namespace dynattn
