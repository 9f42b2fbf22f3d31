// A small GoogLeNet-style network (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015)
// for 28x28 inputs, and the merged forms DeepRebirth (Li et al., AAAI 2018) turns it into.
// Inception module: four parallel branches on the same input, concatenated on channels,
//   branch1: 1x1 | branch2: 1x1 reduce -> 3x3 | branch3: 1x1 reduce -> 3x3 |
//   branch4: 3x3 max-pool (stride 1) -> 1x1 projection,
// each conv a ConvBn unit with ReLU (torchvision's BasicConv2d). Names and the (ch1x1, ch3x3red,
// ch3x3, ch5x5red, ch5x5, pool_proj) arguments follow torchvision's GoogLeNet, whose "5x5" branch
// uses a 3x3 kernel too.
// Network: conv1 (3x3) -> maxpool1 (28 -> 14) -> inception3a -> inception3b -> maxpool3
// (14 -> 7) -> inception4a -> inception4b -> global average pool -> fc.
// Deviations from GoogLeNet: one 3x3 stem conv instead of conv1 (7x7/2) + conv2 + conv3; four
// modules (3a, 3b, 4a, 4b: torchvision's widths times `width`, 0.5 by default) instead of nine;
// max-pools 3x3/2 with padding 1 (torchvision: no padding, ceil_mode) so that a pool's windows
// line up with those of a 3x3/2 conv; no LRN, no dropout, no auxiliary classifiers; convs start
// Kaiming-normal (fan_out) instead of truncated normal.
//
// Merged forms (see reparam/deep_rebirth.h for how weights get there):
//  - `streamline`: conv1 + maxpool1 become conv1 (5x5, stride 2); inception3b + maxpool3 become
//    a stride-2 module (stride = 2 below). No max-pool is left between the stages. A merged
//    conv's kernel covers the receptive field of the conv and the 3x3/2 pool (k + 2).
//  - `merge_branches`: in every module, the convs that read the module input are one wide conv
//    whose output is sliced (`reduce`: 1x1 for [branch1 | branch2.0 | branch3.0 | branch4.1]
//    with the pooling of branch4 dropped), followed by the two 3x3 convs `branch2`, `branch3`.
//  - both: the stride-2 module keeps the reductions in `reduce` (1x1, [branch2.0 | branch3.0])
//    and puts branch1 and branch4 into one 3x3 stride-2 conv `downsample` ([branch1 | branch4]);
//    `branch2`, `branch3` are 5x5 stride 2.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "dynattn/models/conv_bn.h"
#include "dynattn/reparam/deploy.h"

namespace dynattn {

struct InceptionOptions {
  InceptionOptions(int64_t in_channels, int64_t ch1x1, int64_t ch3x3red, int64_t ch3x3,
                   int64_t ch5x5red, int64_t ch5x5, int64_t pool_proj)
      : in_channels_(in_channels),
        ch1x1_(ch1x1),
        ch3x3red_(ch3x3red),
        ch3x3_(ch3x3),
        ch5x5red_(ch5x5red),
        ch5x5_(ch5x5),
        pool_proj_(pool_proj) {}
  int64_t out_channels() const { return ch1x1_ + ch3x3_ + ch5x5_ + pool_proj_; }

  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, ch1x1);     // branch1
  TORCH_ARG(int64_t, ch3x3red);  // branch2: 1x1 reduction ...
  TORCH_ARG(int64_t, ch3x3);     // ... then 3x3
  TORCH_ARG(int64_t, ch5x5red);  // branch3 (3x3 as in torchvision)
  TORCH_ARG(int64_t, ch5x5);
  TORCH_ARG(int64_t, pool_proj);  // branch4: 1x1 after the 3x3 max-pool
  // 2: the 3x3/2 max-pool that followed the module is merged into it (each branch's last conv
  // gets stride 2 and a kernel 2 larger: 1x1 -> 3x3, 3x3 -> 5x5); output [N, C, ceil(H/2),
  // ceil(W/2)].
  TORCH_ARG(int64_t, stride) = 1;
  TORCH_ARG(bool, merge_branches) = false;  // the wide-conv form (see the header comment)
  TORCH_ARG(bool, deployed) = false;        // convs with bias, no BN
};

class InceptionImpl : public torch::nn::Cloneable<InceptionImpl>, public Reparameterizable {
 public:
  explicit InceptionImpl(InceptionOptions options);
  void reset() override;
  // [N, in_channels, H, W] -> [N, out_channels, H', W'], channels ordered branch1..branch4.
  torch::Tensor forward(const torch::Tensor& x);
  // Marks the options deployed (deploy() folds the ConvBn units on its own).
  std::vector<std::string> reparameterize() override;
  void pretty_print(std::ostream& stream) const override;

  InceptionOptions options;
  // Original form (merge_branches false).
  ConvBn branch1{nullptr};
  torch::nn::Sequential branch2_seq{nullptr}, branch3_seq{nullptr}, branch4_seq{nullptr};
  // Merged form: the wide convs and the two 3x3 convs on their slices.
  ConvBn reduce{nullptr}, downsample{nullptr}, branch2{nullptr}, branch3{nullptr};
};
TORCH_MODULE(Inception);

struct InceptionNetOptions {
  // "none", "streamline", "branch" or "all" (both): the spec option `merge`.
  std::string merge_name() const;
  InceptionNetOptions& merge(const std::string& name);

  TORCH_ARG(int64_t, in_channels) = 1;
  TORCH_ARG(int64_t, num_classes) = 10;
  // Multiplies every torchvision width (stem 192, inception3a 64/96/128/16/32/32, ...).
  TORCH_ARG(double, width) = 0.5;
  TORCH_ARG(bool, streamline) = false;      // DeepRebirth streamline merging (pools into convs)
  TORCH_ARG(bool, merge_branches) = false;  // DeepRebirth branch merging (wide convs)
  TORCH_ARG(bool, deployed) = false;        // every conv + BN folded
};

class InceptionNetImpl : public torch::nn::Cloneable<InceptionNetImpl>, public Reparameterizable {
 public:
  // The trunk as stages whose boundaries exist in every merge state (a merge never crosses
  // one): conv1 (stem, 28 -> 14), inception3a, inception3b (14 -> 7), inception4a, inception4b.
  static constexpr int64_t kNumStages = 5;
  static const std::vector<std::string>& stage_names();

  explicit InceptionNetImpl(InceptionNetOptions options = {});
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  // Stage `index` alone (the stem includes maxpool1, inception3b includes maxpool3 when they
  // are separate layers).
  torch::Tensor stage(int64_t index, const torch::Tensor& x);
  // The output of every stage for input x (kNumStages tensors).
  std::vector<torch::Tensor> stage_outputs(const torch::Tensor& x);
  // Global average pooling and fc.
  torch::Tensor head(const torch::Tensor& features);
  // The modules a stage is made of (to train or freeze it).
  std::vector<std::shared_ptr<torch::nn::Module>> stage_modules(int64_t index) const;
  // Marks the options deployed (deploy() folds the ConvBn units on its own).
  std::vector<std::string> reparameterize() override;
  std::vector<Inception> modules_in_order() const;  // inception3a, 3b, 4a, 4b

  InceptionNetOptions options;
  ConvBn conv1{nullptr};
  torch::nn::MaxPool2d maxpool1{nullptr}, maxpool3{nullptr};  // empty when streamlined
  Inception inception3a{nullptr}, inception3b{nullptr}, inception4a{nullptr}, inception4b{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(InceptionNet);

}  // namespace dynattn
