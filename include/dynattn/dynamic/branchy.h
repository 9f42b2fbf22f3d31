// BranchyNet (Teerapittayanon, McDanel, Kung, "BranchyNet: Fast Inference via Early Exiting from
// Deep Neural Networks", ICPR 2016): side exits (small conv + FC heads) after early parts of a
// CIFAR ResNet, trained with the joint loss sum_n w_n CE_n over all exits; at inference a sample
// leaves at side exit i when the entropy of its softmax is below T_i, the last exit (the
// backbone's own classifier) takes the rest.
// Exit head (our choice, the paper's "conv + FC" shape): conv3x3 (C -> exit_width, default 32)
// + BN + ReLU, global average pooling, linear classifier; after stage 1 of ResNet-56 on 28x28
// it costs about 3.6% of the full network's MACs.
// Deviations: the exits and their places are options (default: after stages 1 and 2, "1/2");
// default weights follow the paper's example (first exit 1.0, every later exit, the last
// included, 0.3); entropies are in nats; thresholds default to 0 (nobody leaves early) until a
// calibration (dynamic/branchy_calibration.h) writes them into the spec; the paper's timer
// excludes the branch heads, ours does not. Inference follows the shared execution rule
// (dynamic/execution.h): `compact` gathers the rows still active after each exit and runs the
// rest of the network on the smaller batch (one device-to-host copy per side exit, none per
// block), `mask` computes every exit for every row and selects.
#pragma once
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dynattn/dynamic/dynamic_output.h"
#include "dynattn/dynamic/gate.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/train/training_loss.h"

namespace dynattn {

// The model options (spec keys in brackets, see models/registry.cpp).
struct BranchyOptions {
  TORCH_ARG(CifarResNetOptions, backbone) = {};
  // [exits] side exits, in network order: "s" after the last block of stage s, "s.b" after
  // block b (0-based, the block named layer<s>.<b>) of stage s. The last exit is always there.
  TORCH_ARG(std::vector<std::string>, exits) = std::vector<std::string>{"1", "2"};
  // [exit_weights] w_n, one per exit including the last; empty: 1.0 for the first exit, 0.3 for
  // every later one (the paper's example).
  TORCH_ARG(std::vector<double>, exit_weights) = {};
  // [thresholds] T_i in nats, one per side exit; empty: 0 everywhere (nobody leaves early).
  TORCH_ARG(std::vector<double>, thresholds) = {};
  TORCH_ARG(std::string, execution) = "compact";  // [exec] mask | compact
  TORCH_ARG(int64_t, exit_width) = 32;            // [exit_width] channels of a head's conv
};

// Entropy of softmax(logits) along the last dimension, in nats, in one fused pass
// (log_softmax, then -sum p log p): [..., K] -> [...].
torch::Tensor softmax_entropy(const torch::Tensor& logits);

// sum_n weights[n] * CE(logits[n], labels) (label smoothing as the trainer's).
torch::Tensor branchy_joint_loss(const std::vector<torch::Tensor>& exit_logits,
                                 const torch::Tensor& labels, const std::vector<double>& weights,
                                 double label_smoothing = 0.0);

// The decision at one side exit (Combine::kReplace): decide() takes the exit's logits and
// selects the rows that go on (entropy >= threshold); the others leave with these logits.
class EntropyExitGate : public Gate {
 public:
  EntropyExitGate(std::string name, double threshold, ExecutionMode mode);
  GateDecision decide(const torch::Tensor& exit_logits, bool training) override;
  double threshold() const { return threshold_; }

 private:
  double threshold_;
};

struct ExitHeadOptions {
  ExitHeadOptions(int64_t in_channels, int64_t num_classes)
      : in_channels_(in_channels), num_classes_(num_classes) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, num_classes);
  TORCH_ARG(int64_t, width) = 32;
};

// conv3x3 (in -> width) + BN + ReLU, global average pooling, linear (width -> classes).
class ExitHeadImpl : public torch::nn::Cloneable<ExitHeadImpl> {
 public:
  explicit ExitHeadImpl(ExitHeadOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  ExitHeadOptions options;
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ExitHead);

// A CIFAR ResNet (registered as "backbone", its parameter names unchanged below it) with side
// exits ("exits.0", "exits.1", ...). Exit e (0..side_exits()) is side exit e, or the backbone's
// classifier for e == side_exits().
class BranchyResNetImpl : public torch::nn::Cloneable<BranchyResNetImpl>,
                          public ProvidesTrainingLoss {
 public:
  explicit BranchyResNetImpl(BranchyOptions options = {});
  void reset() override;

  // Training mode: the last exit's logits (the plain network). Eval mode: the early-exit
  // inference, forward_dynamic(x, false).output.
  torch::Tensor forward(const torch::Tensor& x);
  // Every exit's logits for every row, first exit to last: what the joint loss needs.
  std::vector<torch::Tensor> forward_exits(const torch::Tensor& x);
  // Early-exit inference in the options' execution mode: logits, exit_index [N] (exits =
  // side_exits() + 1), the units (gates "segment0", "exit0", "segment1", ..., "segment<E>")
  // each sample executed and, with count_macs, the MACs each sample ran.
  DynamicOutput forward_dynamic(const torch::Tensor& x, bool count_macs = true);
  // The joint loss over forward_exits(images), and the last exit's logits.
  std::pair<torch::Tensor, torch::Tensor> training_loss(const torch::Tensor& images,
                                                        const torch::Tensor& labels,
                                                        double label_smoothing) override;
  // Segment e of the early-exit inference on its own (the stem first when e == 0): the features
  // after it and exit e's logits. What compact mode and BranchyStream are made of.
  std::pair<torch::Tensor, torch::Tensor> run_segment(int64_t e, const torch::Tensor& h);
  // The rows of side exit e's logits that go on (entropy >= T_e).
  RowSelection continuing_rows(int64_t e, const torch::Tensor& logits);
  // MACs per image of a sample leaving at each exit (stem, blocks and heads up to it), counted
  // on one image of shape `input` ([C,H,W]).
  std::vector<int64_t> exit_macs(const std::vector<int64_t>& input = {1, 28, 28});

  int64_t side_exits() const { return static_cast<int64_t>(exit_after_.size()); }
  // Backbone blocks (counted from the first) before side exit i.
  const std::vector<int64_t>& exit_after_blocks() const { return exit_after_; }
  const std::vector<double>& exit_weights() const { return weights_; }
  std::vector<double> thresholds() const;
  // One per side exit; also stored in options (clone() and the spec keep them).
  void set_thresholds(const std::vector<double>& thresholds);
  void set_execution_mode(ExecutionMode mode);
  ExecutionMode execution_mode() const;
  void pretty_print(std::ostream& stream) const override;

  BranchyOptions options;
  CifarResNet backbone{nullptr};
  torch::nn::ModuleList exits{nullptr};  // ExitHead per side exit

 private:
  // forward_dynamic(), with the per-unit trace (executed, macs) only when `want_trace`.
  DynamicOutput run_dynamic(const torch::Tensor& x, bool count_macs, bool want_trace);
  torch::Tensor stem(const torch::Tensor& x);
  // Blocks [from, to) with the stage modules at stage ends; the last segment also pools and
  // classifies when `classify`.
  torch::Tensor run_blocks(torch::Tensor h, int64_t from, int64_t to);
  torch::Tensor classify(const torch::Tensor& h);
  torch::Tensor exit_logits(int64_t e, const torch::Tensor& h);
  // Where segment e starts and ends (blocks).
  std::pair<int64_t, int64_t> segment(int64_t e) const;

  int64_t num_blocks_ = 0;
  std::vector<int64_t> exit_after_;
  std::vector<double> weights_;
  std::vector<EntropyExitGate> gates_;
};
TORCH_MODULE(BranchyResNet);

// "1" / "2.4" -> blocks before the exit, for `blocks_per_stage` blocks in each of `stages`.
// Fails naming the option exits for a stage or block that does not exist.
int64_t parse_exit_position(const std::string& text, int64_t stages, int64_t blocks_per_stage);

}  // namespace dynattn
