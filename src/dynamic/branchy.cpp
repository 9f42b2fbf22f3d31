#include "dynattn/dynamic/branchy.h"

#include <cmath>
#include <optional>

#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"

namespace dynattn {

torch::Tensor softmax_entropy(const torch::Tensor& logits) {
  const auto log_p = torch::log_softmax(logits, -1);
  return -(log_p.exp() * log_p).sum(-1);
}

torch::Tensor branchy_joint_loss(const std::vector<torch::Tensor>& exit_logits,
                                 const torch::Tensor& labels, const std::vector<double>& weights,
                                 double label_smoothing) {
  TORCH_CHECK(!exit_logits.empty() && exit_logits.size() == weights.size(),
              "BranchyNet: ", exit_logits.size(), " exits but ", weights.size(), " exit weights");
  const auto ce = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(label_smoothing);
  torch::Tensor loss;
  for (size_t n = 0; n < exit_logits.size(); ++n) {
    auto term = torch::nn::functional::cross_entropy(exit_logits[n], labels, ce) * weights[n];
    loss = loss.defined() ? loss + term : term;
  }
  return loss;
}

EntropyExitGate::EntropyExitGate(std::string name, double threshold, ExecutionMode mode)
    : Gate(std::move(name), Combine::kReplace, mode), threshold_(threshold) {
  TORCH_CHECK(!std::isnan(threshold) && threshold >= 0, "BranchyNet: exit ", this->name(),
              " threshold (option thresholds) must be >= 0, got ", threshold);
}

GateDecision EntropyExitGate::decide(const torch::Tensor& exit_logits, bool /*training*/) {
  GateDecision d;
  // A row goes on while its exit is not confident enough: entropy >= T.
  d.rows =
      RowSelection::from_mask(softmax_entropy(exit_logits).ge(threshold_), exit_logits.device());
  return d;
}

ExitHeadImpl::ExitHeadImpl(ExitHeadOptions options_) : options(std::move(options_)) {
  reset();
}

void ExitHeadImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.in_channels() > 0 && o.num_classes() > 0 && o.width() > 0,
              "ExitHead: in_channels, num_classes and width (option exit_width) must be positive");
  conv = register_module(
      "conv", torch::nn::Conv2d(
                  torch::nn::Conv2dOptions(o.in_channels(), o.width(), 3).padding(1).bias(false)));
  bn = register_module("bn", torch::nn::BatchNorm2d(o.width()));
  fc = register_module("fc", torch::nn::Linear(o.width(), o.num_classes()));
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
}

torch::Tensor ExitHeadImpl::forward(const torch::Tensor& x) {
  return fc(bn(conv2d_forward(*conv, x)).relu_().mean({2, 3}));
}

void ExitHeadImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::ExitHead(" << options.in_channels() << " -> conv3x3 " << options.width()
         << " -> " << options.num_classes() << ")";
}

int64_t parse_exit_position(const std::string& text, int64_t stages, int64_t blocks_per_stage) {
  const auto dot = text.find('.');
  int64_t stage = 0, block = blocks_per_stage - 1;
  size_t used = 0;
  bool ok = !text.empty();
  try {
    const std::string s = text.substr(0, dot);
    stage = std::stoll(s, &used);
    ok = ok && used == s.size();
    if (ok && dot != std::string::npos) {
      const std::string b = text.substr(dot + 1);
      block = std::stoll(b, &used);
      ok = used == b.size();
    }
  } catch (const std::exception&) {
    ok = false;
  }
  TORCH_CHECK(ok,
              "BranchyNet: option exits: expected 's' (after stage s) or 's.b' (after block b "
              "of stage s), got '",
              text, "'");
  TORCH_CHECK(stage >= 1 && stage <= stages, "BranchyNet: option exits: exit '", text,
              "' after stage ", stage, ", but the network has stages 1..", stages);
  TORCH_CHECK(block >= 0 && block < blocks_per_stage, "BranchyNet: option exits: exit '", text,
              "' after block ", block, " of stage ", stage, ", but stages have blocks 0..",
              blocks_per_stage - 1);
  return (stage - 1) * blocks_per_stage + block + 1;
}

BranchyResNetImpl::BranchyResNetImpl(BranchyOptions options_) : options(std::move(options_)) {
  reset();
}

void BranchyResNetImpl::reset() {
  const auto& o = options;
  const auto& b = o.backbone();
  TORCH_CHECK(b.head() == "avg", "BranchyNet: the backbone's head must be 'avg', got '", b.head(),
              "'");
  TORCH_CHECK(b.stochastic_depth().schedule() == "none",
              "BranchyNet: stochastic depth in the backbone is not supported");
  TORCH_CHECK(!b.deployed(), "BranchyNet: a deployed backbone is not supported");
  backbone = register_module("backbone", CifarResNet(b));
  const auto total = static_cast<int64_t>(backbone->blocks().size());
  num_blocks_ = total;
  const int64_t per_stage = total / 3;
  exit_after_.clear();
  exits = register_module("exits", torch::nn::ModuleList());
  for (const auto& text : o.exits()) {
    const int64_t after = parse_exit_position(text, 3, per_stage);
    TORCH_CHECK(after < total, "BranchyNet: option exits: exit '", text,
                "' is after the last block, where the last exit already is");
    TORCH_CHECK(exit_after_.empty() || after > exit_after_.back(),
                "BranchyNet: option exits must list positions in network order without "
                "repeats, got '",
                text, "' after an exit at block ", exit_after_.empty() ? 0 : exit_after_.back());
    exit_after_.push_back(after);
    const int64_t stage = (after - 1) / per_stage;  // 0-based
    exits->push_back(
        ExitHead(ExitHeadOptions(b.base_width() << stage, b.num_classes()).width(o.exit_width())));
  }
  const auto side = static_cast<int64_t>(exit_after_.size());
  weights_ = o.exit_weights();
  if (weights_.empty()) {
    weights_.assign(static_cast<size_t>(side + 1), 0.3);
    weights_[0] = 1.0;
  }
  TORCH_CHECK(static_cast<int64_t>(weights_.size()) == side + 1,
              "BranchyNet: option exit_weights needs one weight per exit including the last (",
              side + 1, "), got ", weights_.size());
  for (double w : weights_)
    TORCH_CHECK(w >= 0 && std::isfinite(w), "BranchyNet: option exit_weights must be >= 0, got ",
                w);
  auto thresholds = o.thresholds();
  if (thresholds.empty()) thresholds.assign(static_cast<size_t>(side), 0.0);
  TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == side,
              "BranchyNet: option thresholds needs one threshold per side exit (", side,
              ", option exits), got ", thresholds.size());
  const auto mode = parse_execution_mode(o.execution(), "BranchyNet option exec");
  gates_.clear();
  for (int64_t i = 0; i < side; ++i)
    gates_.emplace_back("exit" + std::to_string(i), thresholds[static_cast<size_t>(i)], mode);
}

std::vector<double> BranchyResNetImpl::thresholds() const {
  std::vector<double> out;
  for (const auto& g : gates_) out.push_back(g.threshold());
  return out;
}

void BranchyResNetImpl::set_thresholds(const std::vector<double>& thresholds) {
  TORCH_CHECK(thresholds.size() == gates_.size(), "BranchyNet: set_thresholds needs ",
              gates_.size(), " thresholds (one per side exit), got ", thresholds.size());
  std::vector<EntropyExitGate> gates;
  for (size_t i = 0; i < gates_.size(); ++i)
    gates.emplace_back(gates_[i].name(), thresholds[i], gates_[i].mode());
  gates_ = std::move(gates);
  options.thresholds(thresholds);
}

void BranchyResNetImpl::set_execution_mode(ExecutionMode mode) {
  for (auto& g : gates_) g.set_mode(mode);
  options.execution(execution_mode_name(mode));
}

ExecutionMode BranchyResNetImpl::execution_mode() const {
  return parse_execution_mode(options.execution(), "BranchyNet option exec");
}

torch::Tensor BranchyResNetImpl::stem(const torch::Tensor& x) {
  const auto& b = options.backbone();
  TORCH_CHECK(x.dim() == 4 && x.size(1) == b.in_channels(), "BranchyNet: expected input [N,",
              b.in_channels(), ",H,W], got ", x.sizes());
  auto out = conv2d_forward(*backbone->conv1, x);
  if (!backbone->bn1.is_empty()) out = backbone->bn1(out);
  return out.relu_();
}

torch::Tensor BranchyResNetImpl::run_blocks(torch::Tensor h, int64_t from, int64_t to) {
  const int64_t per_stage = num_blocks_ / 3;
  // Looked up in the stages on each call, never cached: clone() replaces the backbone's
  // children in place.
  torch::nn::Sequential stages[] = {backbone->layer1, backbone->layer2, backbone->layer3};
  for (int64_t i = from; i < to; ++i) {
    h = stages[i / per_stage]->ptr<BasicBlockImpl>(static_cast<size_t>(i % per_stage))->forward(h);
    if ((i + 1) % per_stage == 0) {
      auto& slot = backbone->stage_attn[static_cast<size_t>((i + 1) / per_stage - 1)];
      if (!slot.is_empty()) h = slot.forward(h);
    }
  }
  return h;
}

torch::Tensor BranchyResNetImpl::classify(const torch::Tensor& h) {
  return backbone->fc(h.mean({2, 3}));
}

torch::Tensor BranchyResNetImpl::exit_logits(int64_t e, const torch::Tensor& h) {
  if (e == side_exits()) return classify(h);
  return exits->ptr<ExitHeadImpl>(static_cast<size_t>(e))->forward(h);
}

std::pair<int64_t, int64_t> BranchyResNetImpl::segment(int64_t e) const {
  const int64_t from = e == 0 ? 0 : exit_after_[static_cast<size_t>(e - 1)];
  const int64_t to = e == side_exits() ? num_blocks_ : exit_after_[static_cast<size_t>(e)];
  return {from, to};
}

namespace {
// fn(), with its MACs added to `macs` when counting.
template <class F>
torch::Tensor counted(bool count, int64_t& macs, F&& fn) {
  if (!count) return fn();
  MacCounter counter;
  auto y = fn();
  macs += counter.macs();
  return y;
}
}  // namespace

std::pair<torch::Tensor, torch::Tensor> BranchyResNetImpl::run_segment(int64_t e,
                                                                       const torch::Tensor& h) {
  TORCH_CHECK(e >= 0 && e <= side_exits(), "BranchyNet: segment ", e, " of 0..", side_exits());
  const auto [from, to] = segment(e);
  auto features = run_blocks(e == 0 ? stem(h) : h, from, to);
  auto logits = exit_logits(e, features);
  return {std::move(features), std::move(logits)};
}

RowSelection BranchyResNetImpl::continuing_rows(int64_t e, const torch::Tensor& logits) {
  TORCH_CHECK(e >= 0 && e < side_exits(), "BranchyNet: side exit ", e, " of 0..", side_exits() - 1);
  return gates_[static_cast<size_t>(e)].decide(logits, is_training()).rows;
}

std::vector<torch::Tensor> BranchyResNetImpl::forward_exits(const torch::Tensor& x) {
  std::vector<torch::Tensor> logits;
  auto h = stem(x);
  for (int64_t e = 0; e <= side_exits(); ++e) {
    const auto [from, to] = segment(e);
    h = run_blocks(h, from, to);
    logits.push_back(exit_logits(e, h));
  }
  return logits;
}

torch::Tensor BranchyResNetImpl::forward(const torch::Tensor& x) {
  if (is_training()) {
    auto h = run_blocks(stem(x), 0, num_blocks_);
    return classify(h);
  }
  return run_dynamic(x, false, /*trace=*/false).output;
}

std::pair<torch::Tensor, torch::Tensor> BranchyResNetImpl::training_loss(
    const torch::Tensor& images, const torch::Tensor& labels, double label_smoothing) {
  auto logits = forward_exits(images);
  auto loss = branchy_joint_loss(logits, labels, weights_, label_smoothing);
  return {loss, logits.back()};
}

DynamicOutput BranchyResNetImpl::forward_dynamic(const torch::Tensor& x, bool count_macs) {
  return run_dynamic(x, count_macs, /*trace=*/true);
}

DynamicOutput BranchyResNetImpl::run_dynamic(const torch::Tensor& x, bool count_macs,
                                             bool want_trace) {
  const int64_t n = x.size(0);
  const int64_t side = side_exits();
  const auto mode = execution_mode();
  // Per unit (segment0, exit0, segment1, ..., segment<side>): MACs over the rows it ran on.
  std::vector<int64_t> unit_macs(static_cast<size_t>(2 * side + 1), 0);
  std::optional<MacCounter> total;
  if (count_macs) total.emplace();
  torch::Tensor output, exit_index;  // exit_index: [N] int64 on the CPU

  if (mode == ExecutionMode::kMask) {
    // Every exit for every row, then select by the first confident exit.
    std::vector<torch::Tensor> logits;
    auto h = counted(count_macs, unit_macs[0], [&] { return stem(x); });
    for (int64_t e = 0; e <= side; ++e) {
      const auto seg = segment(e);
      h = counted(count_macs, unit_macs[static_cast<size_t>(2 * e)],
                  [&] { return run_blocks(h, seg.first, seg.second); });
      const auto unit = static_cast<size_t>(e == side ? 2 * e : 2 * e + 1);
      logits.push_back(counted(count_macs, unit_macs[unit], [&] { return exit_logits(e, h); }));
    }
    const auto all = torch::stack(logits);  // [E+1, N, K]
    auto first =
        torch::full({n}, side, torch::TensorOptions().dtype(torch::kLong).device(x.device()));
    if (side > 0) {
      // One fused pass over every side exit's rows: entropies [E, N] against T [E, 1].
      const auto entropy = softmax_entropy(all.slice(0, 0, side));
      const auto t = torch::tensor(thresholds(), entropy.options()).view({side, 1});
      const auto rank =
          torch::arange(side, torch::TensorOptions().dtype(torch::kLong).device(x.device()))
              .view({side, 1})
              .expand({side, n});
      first = torch::where(entropy.lt(t), rank, torch::full_like(rank, side)).amin(0);
    }
    output = all.gather(0, first.view({1, n, 1}).expand({1, n, all.size(2)})).squeeze(0);
    exit_index = first.to(torch::kCPU);
  } else {
    // Compact: after each side exit, the rows that go on are gathered and run on alone.
    exit_index = torch::full({n}, side, torch::kLong);
    auto active_host = torch::ones({n}, torch::kBool);  // rows of the full batch still running
    RowSelection active = RowSelection::all(n, x.device());
    auto h = counted(count_macs, unit_macs[0], [&] { return stem(x); });
    for (int64_t e = 0; e <= side; ++e) {
      const auto seg = segment(e);
      h = counted(count_macs, unit_macs[static_cast<size_t>(2 * e)],
                  [&] { return run_blocks(h, seg.first, seg.second); });
      const auto unit = static_cast<size_t>(e == side ? 2 * e : 2 * e + 1);
      const auto logits = counted(count_macs, unit_macs[unit], [&] { return exit_logits(e, h); });
      output = e == 0 ? logits : scatter_rows(output, logits, active);
      if (e == side) break;
      const auto go_on = gates_[static_cast<size_t>(e)].decide(logits, is_training()).rows;
      // The rows of the full batch that were running and stop here leave at exit e.
      auto* running = active_host.data_ptr<bool>();
      const auto* goes_on = go_on.host_mask().data_ptr<bool>();
      auto* exit_of = exit_index.data_ptr<int64_t>();
      for (int64_t i = 0, row = 0; i < n; ++i) {
        if (!running[i]) continue;
        if (!goes_on[row++]) {
          running[i] = false;
          exit_of[i] = e;
        }
      }
      if (go_on.none_active()) break;
      h = gather_rows(h, go_on);
      active = RowSelection::from_mask(active_host.clone(), x.device());
    }
  }

  if (!want_trace) {
    // forward(): the logits alone, without the per-unit bookkeeping on the host.
    DynamicOutput out;
    out.output = std::move(output);
    out.mode = mode;
    return out;
  }
  ExecutionTrace trace(n, count_macs);
  const auto all_rows = torch::ones({n}, torch::kBool);
  for (int64_t u = 0; u < 2 * side + 1; ++u) {
    const int64_t e = u / 2;  // segment e (u even) or side exit e's head (u odd)
    GateResult r;
    r.used = exit_index.ge(e);
    r.ran = mode == ExecutionMode::kMask ? all_rows : r.used;
    r.macs = unit_macs[static_cast<size_t>(u)];
    trace.add((u % 2 == 0 ? "segment" : "exit") + std::to_string(e), r);
  }
  auto out = trace.finish(std::move(output), mode, count_macs ? total->macs() : 0);
  out.exit_index = exit_index;
  out.exits = side + 1;
  return out;
}

std::vector<int64_t> BranchyResNetImpl::exit_macs(const std::vector<int64_t>& input) {
  TORCH_CHECK(input.size() == 3, "BranchyNet: exit_macs needs an input shape [C,H,W]");
  const bool was_training = is_training();
  const auto mode = execution_mode();
  eval();
  set_execution_mode(ExecutionMode::kMask);
  DynamicOutput out;
  {
    torch::NoGradGuard no_grad;
    const auto device = backbone->conv1->weight.device();
    out = forward_dynamic(
        torch::zeros({1, input[0], input[1], input[2]}, torch::TensorOptions().device(device)),
        true);
  }
  set_execution_mode(mode);
  train(was_training);
  // Leaving at exit e: segments 0..e and the heads of side exits 0..e.
  std::vector<int64_t> cost;
  int64_t sum = 0;
  for (int64_t e = 0; e <= side_exits(); ++e) {
    sum += out.gate_macs[static_cast<size_t>(2 * e)];
    cost.push_back(sum + (e < side_exits() ? out.gate_macs[static_cast<size_t>(2 * e + 1)] : 0));
    if (e < side_exits()) sum += out.gate_macs[static_cast<size_t>(2 * e + 1)];
  }
  return cost;
}

void BranchyResNetImpl::pretty_print(std::ostream& stream) const {
  stream << "dynattn::BranchyResNet(depth=" << options.backbone().depth() << ", exits after blocks";
  for (auto b : exit_after_) stream << " " << b;
  stream << ", thresholds";
  for (const auto& g : gates_) stream << " " << g.threshold();
  stream << ", " << options.execution() << ")";
}

}  // namespace dynattn
