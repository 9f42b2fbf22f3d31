// The deploy pass: modules that train in one shape and run in a simpler one (conv + BN pairs,
// later RepVGG branches) implement Reparameterizable; deploy() walks the model, lets each of
// them simplify itself, and reports what changed and how far the output moved.
#pragma once
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dynattn/models/registry.h"

namespace dynattn {

class Reparameterizable {
 public:
  virtual ~Reparameterizable() = default;
  // Simplifies the module in place (eval mode required) and names each merge, relative to the
  // module ("conv1+bn1"). A second call finds nothing left and returns nothing.
  virtual std::vector<std::string> reparameterize() = 0;
  // Model options that a spec must carry once reparameterize() merged something, so that a
  // checkpoint rebuilds the simplified structure; deploy() sets those the model accepts.
  virtual std::vector<std::pair<std::string, std::string>> deployed_options() const {
    return {{"deployed", "true"}};
  }
};

struct DeployReport {
  std::vector<std::string> merged;  // "layer1.0: conv1+bn1", ...
  int64_t parameters_before = 0, parameters_after = 0;
  int64_t macs_before = 0, macs_after = 0;  // per input of `input_shape`
  double max_abs_diff = 0;                  // eval-mode output before vs after, random inputs
  double output_scale = 0;                  // max |output| before, to read the difference against
};

// Deploys `model` in place. `input_shape` is one input [N,C,H,W] (random normal values are
// used). Refuses a model in training mode.
DeployReport deploy(Model& model, const std::vector<int64_t>& input_shape);

}  // namespace dynattn
