#include "dynattn/reparam/deep_rebirth.h"

#include <algorithm>

#include "dynattn/io/checkpoint.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn {
namespace {

// Copies `src` into output channels [offset, offset + src.out) of `dst`: conv weight (a smaller
// kernel at the centre of a larger one, the rest zero), bias, and BN affine parameters and
// statistics. Stride and padding are the destination's own.
void copy_conv_bn(const ConvBnImpl& src, ConvBnImpl& dst, int64_t offset,
                  const std::string& where) {
  const auto &so = src.options, &dop = dst.options;
  TORCH_CHECK(so.in_channels() == dop.in_channels() && so.groups() == 1 && dop.groups() == 1,
              "DeepRebirth ", where, ": input channels differ (", so.in_channels(), " vs ",
              dop.in_channels(), ") or the convs are grouped");
  TORCH_CHECK(
      so.kernel_size() <= dop.kernel_size() && (dop.kernel_size() - so.kernel_size()) % 2 == 0,
      "DeepRebirth ", where, ": a ", so.kernel_size(), "x", so.kernel_size(),
      " kernel does not sit at the centre of a ", dop.kernel_size(), "x", dop.kernel_size(),
      " one");
  TORCH_CHECK(offset >= 0 && offset + so.out_channels() <= dop.out_channels(), "DeepRebirth ",
              where, ": output channels [", offset, ", ", offset + so.out_channels(),
              ") do not fit in ", dop.out_channels());
  TORCH_CHECK(so.deployed() == dop.deployed(), "DeepRebirth ", where,
              ": one side is deployed (BN folded) and the other is not");
  torch::NoGradGuard no_grad;
  const int64_t n = so.out_channels();
  auto rows = dst.conv->weight.narrow(0, offset, n);
  if (so.kernel_size() == dop.kernel_size()) {
    rows.copy_(src.conv->weight);
  } else {
    const int64_t pad = (dop.kernel_size() - so.kernel_size()) / 2;
    rows.zero_();
    rows.narrow(2, pad, so.kernel_size()).narrow(3, pad, so.kernel_size()).copy_(src.conv->weight);
  }
  if (dst.conv->bias.defined()) {
    TORCH_CHECK(src.conv->bias.defined(), "DeepRebirth ", where, ": the source conv has no bias");
    dst.conv->bias.narrow(0, offset, n).copy_(src.conv->bias);
  }
  if (!dst.bn.is_empty()) {
    dst.bn->weight.narrow(0, offset, n).copy_(src.bn->weight);
    dst.bn->bias.narrow(0, offset, n).copy_(src.bn->bias);
    dst.bn->running_mean.narrow(0, offset, n).copy_(src.bn->running_mean);
    dst.bn->running_var.narrow(0, offset, n).copy_(src.bn->running_var);
    dst.bn->num_batches_tracked.copy_(src.bn->num_batches_tracked);
  }
}

const ConvBnImpl& unit(const torch::nn::Sequential& seq, size_t index) {
  return *seq->ptr(index)->as<ConvBnImpl>();
}
ConvBnImpl& unit(torch::nn::Sequential& seq, size_t index) {
  return *seq->ptr(index)->as<ConvBnImpl>();
}

// One Inception module, source in the original form; returns the module's merges.
std::vector<MergeStep> transfer_module(const InceptionImpl& s, InceptionImpl& t,
                                       const std::string& name) {
  const auto &so = s.options, &to = t.options;
  TORCH_CHECK(!so.merge_branches() && so.stride() == 1, "DeepRebirth ", name,
              ": the source module must be in the original form (no merge)");
  TORCH_CHECK(so.in_channels() == to.in_channels() && so.ch1x1() == to.ch1x1() &&
                  so.ch3x3red() == to.ch3x3red() && so.ch3x3() == to.ch3x3() &&
                  so.ch5x5red() == to.ch5x5red() && so.ch5x5() == to.ch5x5() &&
                  so.pool_proj() == to.pool_proj(),
              "DeepRebirth ", name, ": the modules have different widths");
  auto where = [&](const std::string& layer) { return name + "." + layer; };
  const auto &b2 = s.branch2_seq, &b3 = s.branch3_seq, &b4 = s.branch4_seq;
  std::vector<MergeStep> steps;
  if (!to.merge_branches()) {
    copy_conv_bn(*s.branch1, *t.branch1, 0, where("branch1"));
    copy_conv_bn(unit(b2, 0), unit(t.branch2_seq, 0), 0, where("branch2.0"));
    copy_conv_bn(unit(b2, 1), unit(t.branch2_seq, 1), 0, where("branch2.1"));
    copy_conv_bn(unit(b3, 0), unit(t.branch3_seq, 0), 0, where("branch3.0"));
    copy_conv_bn(unit(b3, 1), unit(t.branch3_seq, 1), 0, where("branch3.1"));
    copy_conv_bn(unit(b4, 1), unit(t.branch4_seq, 1), 0, where("branch4.1"));
    if (to.stride() == 2) {
      steps.push_back({name,
                       "branch1, branch4.1 (1x1) + maxpool3 -> 3x3 stride 2; branch2.1, branch3.1 "
                       "(3x3) + maxpool3 -> 5x5 stride 2 (original kernels at the centre)",
                       false});
    }
    return steps;
  }
  const int64_t c1 = so.ch1x1(), c2 = so.ch3x3red(), c3 = so.ch5x5red();
  copy_conv_bn(unit(b2, 1), *t.branch2, 0, where("branch2.1 -> branch2"));
  copy_conv_bn(unit(b3, 1), *t.branch3, 0, where("branch3.1 -> branch3"));
  if (to.stride() == 1) {
    copy_conv_bn(*s.branch1, *t.reduce, 0, where("branch1 -> reduce"));
    copy_conv_bn(unit(b2, 0), *t.reduce, c1, where("branch2.0 -> reduce"));
    copy_conv_bn(unit(b3, 0), *t.reduce, c1 + c2, where("branch3.0 -> reduce"));
    copy_conv_bn(unit(b4, 1), *t.reduce, c1 + c2 + c3, where("branch4.1 -> reduce"));
    steps.push_back({name,
                     "branch1 + branch2.0 + branch3.0 -> reduce (one 1x1 conv, weights "
                     "concatenated); branch2.1 -> branch2, branch3.1 -> branch3",
                     true});
    steps.push_back(
        {name, "branch4 (maxpool 3x3/1 -> 1x1) -> the last channels of reduce (pooling dropped)",
         false});
    return steps;
  }
  copy_conv_bn(unit(b2, 0), *t.reduce, 0, where("branch2.0 -> reduce"));
  copy_conv_bn(unit(b3, 0), *t.reduce, c2, where("branch3.0 -> reduce"));
  copy_conv_bn(*s.branch1, *t.downsample, 0, where("branch1 -> downsample"));
  copy_conv_bn(unit(b4, 1), *t.downsample, c1, where("branch4.1 -> downsample"));
  steps.push_back(
      {name, "branch2.0 + branch3.0 -> reduce (one 1x1 conv, weights concatenated)", true});
  steps.push_back({name,
                   "branch1 + maxpool3 and branch4 (maxpool dropped) + maxpool3 -> downsample "
                   "(one 3x3 stride-2 conv, 1x1 kernels at the centre)",
                   false});
  steps.push_back(
      {name, "branch2.1, branch3.1 (3x3) + maxpool3 -> branch2, branch3 (5x5 stride 2)", false});
  return steps;
}

void check_merge_name(const std::string& merge) {
  TORCH_CHECK(merge == "streamline" || merge == "branch" || merge == "all",
              "DeepRebirth: merge must be streamline, branch or all, got '", merge, "'");
}

// Same module type and options as `model`, with the same weights.
Model copy_model(const Model& model) {
  Model copy = create_model(model.spec);
  load_state_dict(*copy.ptr(), state_dict(*model.ptr()), "DeepRebirth copy of " + model.spec);
  return copy;
}

}  // namespace

InceptionNetImpl& as_inception_net(const Model& model, const std::string& context) {
  auto* net = model.module.is_empty() ? nullptr : model.ptr()->as<InceptionNetImpl>();
  TORCH_CHECK(net != nullptr, context, ": model '", model.spec,
              "' is not an inception_net; DeepRebirth's merges are defined for inception_net");
  return *net;
}

std::vector<MergeStep> transfer_rebirth_weights(const InceptionNetImpl& source,
                                                InceptionNetImpl& target) {
  const auto &so = source.options, &to = target.options;
  TORCH_CHECK(
      !so.streamline() && !so.merge_branches(),
      "DeepRebirth: the source network must be unmerged (merge=none), got merge=", so.merge_name());
  TORCH_CHECK(so.width() == to.width() && so.num_classes() == to.num_classes() &&
                  so.in_channels() == to.in_channels(),
              "DeepRebirth: source and target differ in width, classes or input channels (width ",
              so.width(), " vs ", to.width(), ", classes ", so.num_classes(), " vs ",
              to.num_classes(), ", in_channels ", so.in_channels(), " vs ", to.in_channels(), ")");
  std::vector<MergeStep> steps;
  copy_conv_bn(*source.conv1, *target.conv1, 0, "conv1");
  if (to.streamline())
    steps.push_back({"conv1", "conv1 (3x3) + maxpool1 -> conv1 (5x5 stride 2)", false});
  const auto s = source.modules_in_order();
  auto t = target.modules_in_order();
  for (size_t i = 0; i < s.size(); ++i) {
    for (auto& step : transfer_module(*s[i], *t[i], InceptionNetImpl::stage_names()[i + 1]))
      steps.push_back(std::move(step));
  }
  torch::NoGradGuard no_grad;
  target.fc->weight.copy_(source.fc->weight);
  target.fc->bias.copy_(source.fc->bias);
  return steps;
}

RebirthModels rebirth_merge(const Model& original, const std::string& merge) {
  check_merge_name(merge);
  const auto& source = as_inception_net(original, "DeepRebirth");
  TORCH_CHECK(!source.is_training(), "DeepRebirth ", original.spec,
              ": the model is in training mode; call eval() first (BatchNorm folds only with its "
              "running statistics)");
  TORCH_CHECK(source.options.merge_name() == "none", "DeepRebirth ", original.spec,
              ": the model is already merged (merge=", source.options.merge_name(),
              "); start from the unmerged network");
  RebirthModels r;
  r.folded = copy_model(original);
  r.folded.ptr()->eval();
  if (!source.options.deployed()) {
    const auto report = deploy(r.folded, {2, source.options.in_channels(), 28, 28});
    r.fold_max_abs_diff = report.max_abs_diff;
  }
  NamedOptions spec = parse_named_options(r.folded.spec, "model");
  spec.options.set("merge", merge);
  spec.options.set("deployed", "true");
  r.merged = create_model(spec.to_string());
  r.merged.ptr()->eval();
  r.steps = transfer_rebirth_weights(as_inception_net(r.folded, "DeepRebirth"),
                                     as_inception_net(r.merged, "DeepRebirth"));
  const auto& names = InceptionNetImpl::stage_names();
  for (const auto& step : r.steps) {
    if (step.exact) continue;
    const int64_t k = std::find(names.begin(), names.end(), step.stage) - names.begin();
    if (std::find(r.relearn_stages.begin(), r.relearn_stages.end(), k) == r.relearn_stages.end())
      r.relearn_stages.push_back(k);
  }
  std::sort(r.relearn_stages.begin(), r.relearn_stages.end());
  return r;
}

std::vector<StageRelearnReport> relearn_merged_stages(const Model& teacher, Model& merged,
                                                      const std::vector<int64_t>& stages,
                                                      const InMemoryDataset& data,
                                                      const RelearnOptions& o) {
  auto& t = as_inception_net(teacher, "DeepRebirth relearn (teacher)");
  auto& s = as_inception_net(merged, "DeepRebirth relearn (merged)");
  TORCH_CHECK(o.steps() >= 0, "DeepRebirth relearn: steps must be >= 0, got ", o.steps());
  TORCH_CHECK(o.batch_size() > 0, "DeepRebirth relearn: batch size must be positive, got ",
              o.batch_size());
  TORCH_CHECK(o.lr() > 0, "DeepRebirth relearn: lr must be positive, got ", o.lr());
  TORCH_CHECK(data.size() > 0, "DeepRebirth relearn: no images to re-learn from");
  for (auto k : stages)
    TORCH_CHECK(k >= 0 && k < InceptionNetImpl::kNumStages,
                "DeepRebirth relearn: stage index must be in [0, ", InceptionNetImpl::kNumStages,
                "), got ", k);
  const bool teacher_training = t.is_training(), merged_training = s.is_training();
  t.eval();
  s.eval();
  DataLoader loader(data, DataLoaderOptions()
                              .batch_size(std::min(o.batch_size(), data.size()))
                              .shuffle(true)
                              .drop_last(true)
                              .seed(o.seed())
                              .mean(o.mean())
                              .stddev(o.stddev()));
  // Teacher inputs and targets of every stage for one batch.
  auto teach = [&](const torch::Tensor& images) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> io = {images};
    for (auto& y : t.stage_outputs(images)) io.push_back(y);
    return io;
  };
  const auto probe = teach(loader.batch(0).images);
  auto probe_mse = [&](int64_t k) {
    torch::NoGradGuard no_grad;
    return torch::mse_loss(s.stage(k, probe[k]), probe[k + 1]).item<double>();
  };
  std::vector<StageRelearnReport> report;
  for (auto k : stages) {
    report.push_back({InceptionNetImpl::stage_names()[k], probe_mse(k), 0.0,
                      probe[k + 1].square().mean().item<double>()});
  }
  std::vector<torch::Tensor> params;
  for (auto k : stages)
    for (const auto& m : s.stage_modules(k))
      for (const auto& p : m->parameters()) params.push_back(p);
  if (!params.empty() && o.steps() > 0) {
    torch::optim::Adam adam(params, torch::optim::AdamOptions(o.lr()));
    const int64_t batches = loader.num_batches();
    for (int64_t step = 0; step < o.steps(); ++step) {
      if (step % batches == 0) loader.start_epoch(1 + step / batches);
      const auto io = teach(loader.batch(step % batches).images);
      torch::Tensor loss = torch::zeros({}, io[0].options());
      for (auto k : stages) loss = loss + torch::mse_loss(s.stage(k, io[k]), io[k + 1]);
      adam.zero_grad();
      loss.backward();
      adam.step();
    }
  }
  for (size_t i = 0; i < stages.size(); ++i) report[i].mse_after = probe_mse(stages[i]);
  t.train(teacher_training);
  s.train(merged_training);
  return report;
}

}  // namespace dynattn
