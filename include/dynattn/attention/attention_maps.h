// What an attention module can show besides its output: named maps (SE/ECA gates, CBAM M_c and
// M_s, the BAM map, non-local affinities), returned by forward_with_maps() while forward()
// stays a plain Tensor -> Tensor function for composition.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>

namespace dynattn {

using AttentionMaps = std::map<std::string, torch::Tensor>;

struct AttentionOutput {
  torch::Tensor output;
  AttentionMaps maps;
};

// Implemented by every attention module (next to torch::nn::Cloneable<XImpl>), so that a
// backbone holding it in an AnyModule can still ask for its maps:
//   if (auto* m = dynamic_cast<AttentionWithMaps*>(attn.ptr().get())) m->forward_with_maps(x);
class AttentionWithMaps {
 public:
  virtual ~AttentionWithMaps() = default;
  // Same output as forward(x), plus the module's maps under documented names.
  virtual AttentionOutput forward_with_maps(const torch::Tensor& x) = 0;
};

// A channel gate's result: x * gate as output, the gate [N,C,1,1] as the map "gate" (SE, ECA).
AttentionOutput gated_output(const torch::Tensor& x, const torch::Tensor& gate);

// Checks what every attention module expects of its input and fails with an error that names
// the module and the expectation, e.g.
//   "CBAM: expected a 4-D input [N,C,H,W] with C=64, got [8,32,14,14]".
// `dims` is the number of spatial dimensions (1, 2 or 3); `channels` <= 0 accepts any C.
// The dtype must be floating point.
void check_attention_input(const char* module, const torch::Tensor& x, int64_t channels,
                           int64_t spatial_dims = 2);

}  // namespace dynattn
