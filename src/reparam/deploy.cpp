#include "dynattn/reparam/deploy.h"

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

  for (const auto& item : root.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    if (auto* r = dynamic_cast<Reparameterizable*>(item.value().get())) {
      for (const auto& merge : r->reparameterize())
        report.merged.push_back(item.key().empty() ? merge : item.key() + ": " + merge);
    }
  }
  // The spec must rebuild the deployed structure from a checkpoint.
  if (!report.merged.empty()) {
    NamedOptions spec = parse_named_options(model.spec, "model");
    for (const auto& info : list_models()) {
      if (info.name != spec.name) continue;
      for (const auto& key : info.option_keys) {
        if (key == "deployed") {
          spec.options.set("deployed", "true");
          model.spec = spec.to_string();
        }
      }
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
