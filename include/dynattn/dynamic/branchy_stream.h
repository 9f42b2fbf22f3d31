// Early-exit inference over a stream of batches, for throughput. BranchyResNet's compact mode
// runs each batch on its own: after an exit, the few samples that go on run the rest of the
// network as a small batch (4 of 64, say), where per-operator costs dominate and the MACs they
// save are not saved in time. BranchyStream instead keeps the samples that go on past side exit
// e in a queue and runs segment e + 1 once at least `min_batch` of them have gathered (and for
// whatever is left on flush()), so every segment runs at about the batch size the stream is fed
// with. Samples finish out of order and later than they would alone: this is for throughput
// (offline scoring, a serving queue), not for the latency of one sample.
// Not in the paper, which times batch 1; outputs and exits equal forward_dynamic()'s per sample.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "dynattn/dynamic/branchy.h"

namespace dynattn {

// Samples that finished, in finishing order.
struct EarlyExitResults {
  torch::Tensor ids;         // [M] int64, CPU: the ids push() gave them
  torch::Tensor logits;      // [M, K] on the model's device
  torch::Tensor exit_index;  // [M] int64, CPU
};

class BranchyStream {
 public:
  // The model must be in eval mode; its thresholds are read on each push.
  BranchyStream(BranchyResNet net, int64_t min_batch);

  // Runs x's rows ([N, C, H, W]) to their exits or into the queues, then every queue that holds
  // min_batch samples or more, in network order. x's rows get the ids next_id() .. + N - 1;
  // returns the first.
  int64_t push(const torch::Tensor& x);
  // Runs every queue to the last exit, whatever its size.
  void flush();
  // The samples finished since the last take().
  EarlyExitResults take();

  int64_t next_id() const { return next_id_; }
  // Samples waiting in the queues.
  int64_t pending() const;
  int64_t min_batch() const { return min_batch_; }

 private:
  struct Queue {
    std::vector<torch::Tensor> features, ids;
    int64_t size = 0;
  };
  // Segment e (the stem first when e == 0) on h, then exit e's decision.
  void run(int64_t e, const torch::Tensor& h, const torch::Tensor& ids);
  void run_queue(int64_t e);

  BranchyResNet net_;
  int64_t min_batch_;
  int64_t next_id_ = 0;
  std::vector<Queue> queues_;  // queues_[e]: the features waiting for segment e (e >= 1)
  std::vector<torch::Tensor> done_ids_, done_logits_, done_exits_;
};

}  // namespace dynattn
