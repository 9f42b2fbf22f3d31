#include "dynattn/reparam/deploy.h"

#include <functional>
#include <map>

#include "dynattn/core/compat.h"
#include "dynattn/profile/mac_counter.h"

namespace dynattn {

DeployReport deploy(Model& model, const std::vector<int64_t>& input_shape) {
  auto& root = *model.ptr();
  TORCH_CHECK(!root.is_training(), "deploy ", model.spec,
              ": the model is in training mode; call eval() first (BatchNorm folds only with its "
              "running statistics)");
  DeployReport report;
  const auto params = root.parameters();
  const auto options = params.empty() ? torch::TensorOptions()
                                      : torch::TensorOptions()
                                            .dtype(params.front().scalar_type())
                                            .device(params.front().device());
  const auto x = torch::randn(input_shape, options);
  torch::Tensor before;
  report.parameters_before = count_parameters(root);
  report.macs_before = count_macs([&] { before = model.forward(x); }).macs;

  // Pre-order over the children each module has *after* it simplified itself: a RepVGG block
  // that merged its branches no longer has them, so they are not visited (and reported) again.
  std::map<std::string, std::string> spec_options;
  std::function<void(torch::nn::Module&, const std::string&)> visit = [&](torch::nn::Module& module,
                                                                          const std::string& path) {
    if (auto* r = dynamic_cast<Reparameterizable*>(&module)) {
      const auto merges = r->reparameterize();
      for (const auto& merge : merges)
        report.merged.push_back(path.empty() ? merge : path + ": " + merge);
      if (!merges.empty())
        for (const auto& kv : r->deployed_options()) spec_options[kv.first] = kv.second;
    }
    for (const auto& child : module.named_children())
      visit(*child.value(), path.empty() ? child.key() : path + "." + child.key());
  };
  visit(root, "");
  // The spec must rebuild the deployed structure (and its test-time semantics) from a
  // checkpoint: the options the simplified modules ask for, where the model accepts them.
  if (!spec_options.empty()) {
    NamedOptions spec = parse_named_options(model.spec, "model");
    for (const auto& info : list_models()) {
      if (info.name != spec.name) continue;
      for (const auto& key : info.option_keys) {
        const auto it = spec_options.find(key);
        if (it != spec_options.end()) spec.options.set(key, it->second);
      }
      model.spec = spec.to_string();
    }
  }
  torch::Tensor after;
  report.parameters_after = count_parameters(root);
  report.macs_after = count_macs([&] { after = model.forward(x); }).macs;
  report.max_abs_diff = (after - before).abs().max().item<double>();
  report.output_scale = before.abs().max().item<double>();
  return report;
}

}  // namespace dynattn
