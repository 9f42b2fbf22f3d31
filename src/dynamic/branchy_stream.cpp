#include "dynattn/dynamic/branchy_stream.h"

namespace dynattn {

BranchyStream::BranchyStream(BranchyResNet net, int64_t min_batch)
    : net_(std::move(net)), min_batch_(min_batch) {
  TORCH_CHECK(!net_.is_empty(), "BranchyStream: no model");
  TORCH_CHECK(min_batch >= 1, "BranchyStream: min_batch must be >= 1, got ", min_batch);
  queues_.resize(static_cast<size_t>(net_->side_exits() + 1));
}

int64_t BranchyStream::pending() const {
  int64_t n = 0;
  for (const auto& q : queues_) n += q.size;
  return n;
}

void BranchyStream::run(int64_t e, const torch::Tensor& h, const torch::Tensor& ids) {
  auto [features, logits] = net_->run_segment(e, h);
  const auto device = logits.device();
  if (e == net_->side_exits()) {
    done_ids_.push_back(ids);
    done_logits_.push_back(logits);
    done_exits_.push_back(torch::full({ids.size(0)}, e, torch::kLong));
    return;
  }
  const auto go_on = net_->continuing_rows(e, logits);
  const auto& host = go_on.host_mask();
  if (!go_on.all_active()) {
    const auto stop = host.logical_not();
    const auto stopped = RowSelection::from_mask(stop, device);
    done_ids_.push_back(ids.index({stop}));
    done_logits_.push_back(gather_rows(logits, stopped));
    done_exits_.push_back(torch::full({stopped.active()}, e, torch::kLong));
  }
  if (go_on.none_active()) return;
  auto& q = queues_[static_cast<size_t>(e + 1)];
  q.features.push_back(gather_rows(features, go_on));
  q.ids.push_back(go_on.all_active() ? ids : ids.index({host}));
  q.size += go_on.active();
}

void BranchyStream::run_queue(int64_t e) {
  auto& q = queues_[static_cast<size_t>(e)];
  if (q.size == 0) return;
  // torch::cat keeps the pieces' memory format when they share one (channels-last included).
  auto h = q.features.size() == 1 ? q.features[0] : torch::cat(q.features);
  auto ids = q.ids.size() == 1 ? q.ids[0] : torch::cat(q.ids);
  q = Queue{};
  run(e, h, ids);
}

int64_t BranchyStream::push(const torch::Tensor& x) {
  TORCH_CHECK(!net_->is_training(), "BranchyStream: the model must be in eval mode");
  TORCH_CHECK(x.dim() == 4 && x.size(0) > 0,
              "BranchyStream: expected input [N,C,H,W] with N >= 1, got ", x.sizes());
  torch::NoGradGuard no_grad;
  const int64_t first = next_id_;
  const auto ids = torch::arange(first, first + x.size(0), torch::kLong);
  run(0, x, ids);
  next_id_ += x.size(0);
  for (int64_t e = 1; e < static_cast<int64_t>(queues_.size()); ++e)
    if (queues_[static_cast<size_t>(e)].size >= min_batch_) run_queue(e);
  return first;
}

void BranchyStream::flush() {
  torch::NoGradGuard no_grad;
  for (int64_t e = 1; e < static_cast<int64_t>(queues_.size()); ++e) run_queue(e);
}

EarlyExitResults BranchyStream::take() {
  EarlyExitResults r;
  if (done_ids_.empty()) {
    r.ids = torch::empty({0}, torch::kLong);
    r.exit_index = torch::empty({0}, torch::kLong);
    return r;
  }
  r.ids = torch::cat(done_ids_);
  r.logits = torch::cat(done_logits_);
  r.exit_index = torch::cat(done_exits_);
  done_ids_.clear();
  done_logits_.clear();
  done_exits_.clear();
  return r;
}

}  // namespace dynattn
