#include "dynattn/profile/mac_counter.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace dynattn {

struct MacCounterAccess {
  static void add(MacCounter& counter, const std::string& op, int64_t macs) {
    counter.add(op, macs);
  }
};

namespace {

// How the MACs of an operator follow from its inputs.
enum class OpKind {
  kConvolution,  // (input, weight, bias, stride, padding, dilation, transposed, ...)
  kMm,           // (a[n,k], b[k,m])
  kAddmm,        // (self, a[n,k], b[k,m], ...)
  kBmm,          // (a[b,n,k], b[b,k,m])
  kBaddbmm,      // (self, a[b,n,k], b[b,k,m], ...): also addbmm, which sums over b
  kMv,           // (a[n,k], x[k])
  kAddmv,        // (self, a[n,k], x[k], ...)
  kDot,          // (x[n], y[n])
  kAttention,    // (q[...,L,E], k[...,S,E], v[...,S,Ev], ...): fused attention kernels
};

const std::unordered_map<std::string_view, OpKind>& counted_ops() {
  // ATen names never contain the overload (".out"), so one entry covers all overloads;
  // in-place variants carry a trailing '_'.
  static const std::unordered_map<std::string_view, OpKind> ops = {
      {"aten::convolution", OpKind::kConvolution},
      {"aten::_convolution", OpKind::kConvolution},
      // Called directly by conv2d_forward() (ops/conv2d.h), outside aten::convolution.
      {"aten::mkldnn_convolution", OpKind::kConvolution},
      {"aten::mm", OpKind::kMm},
      {"aten::addmm", OpKind::kAddmm},
      {"aten::addmm_", OpKind::kAddmm},
      {"aten::_addmm_activation", OpKind::kAddmm},
      {"aten::bmm", OpKind::kBmm},
      {"aten::baddbmm", OpKind::kBaddbmm},
      {"aten::baddbmm_", OpKind::kBaddbmm},
      {"aten::addbmm", OpKind::kBaddbmm},
      {"aten::addbmm_", OpKind::kBaddbmm},
      {"aten::mv", OpKind::kMv},
      {"aten::addmv", OpKind::kAddmv},
      {"aten::addmv_", OpKind::kAddmv},
      {"aten::dot", OpKind::kDot},
      {"aten::vdot", OpKind::kDot},
      // LibTorch 2.x runs scaled_dot_product_attention through fused kernels that do not
      // decompose into bmm; its math fallback does, and is counted through bmm.
      {"aten::_scaled_dot_product_flash_attention", OpKind::kAttention},
      {"aten::_scaled_dot_product_flash_attention_for_cpu", OpKind::kAttention},
      {"aten::_scaled_dot_product_efficient_attention", OpKind::kAttention},
      {"aten::_scaled_dot_product_cudnn_attention", OpKind::kAttention},
  };
  return ops;
}

// Per-thread observer state. Only the thread that owns a counter counts into it, so this
// needs no locking.
struct ThreadState {
  std::vector<MacCounter*> counters;  // live counters, oldest first
  at::CallbackHandle handle = at::INVALID_CALLBACK_HANDLE;
  // Incremented on every (re-)registration so that an end callback of an operator that
  // started under an earlier registration cannot unbalance the depths below.
  uint64_t epoch = 0;
  int counted_depth = 0;   // counted operators in progress: nested ones are not counted again
  int backward_depth = 0;  // autograd backward nodes in progress: nothing inside is counted
};

ThreadState& thread_state() {
  thread_local ThreadState state;
  return state;
}

struct OpContext : at::ObserverContext {
  uint64_t epoch = 0;
  bool backward = false;
  std::string name;
  int64_t macs = 0;
  // Normal convolutions: MACs = output.numel() * per_output, known only at the end.
  int64_t per_output = 0;
};

const at::Tensor* tensor_arg(c10::ArrayRef<const c10::IValue> inputs, size_t i) {
  if (i >= inputs.size() || !inputs[i].isTensor()) return nullptr;
  const at::Tensor& t = inputs[i].toTensor();
  return t.defined() ? &t : nullptr;
}

// n*k*m for a [n,k] x [k,m] product, or batch*n*k*m for [b,n,k] x [b,k,m]; 0 if the
// arguments are not what the schema promises (then there is nothing sensible to count).
int64_t matmul_macs(const at::Tensor* a, const at::Tensor* b, int64_t dims) {
  if (!a || !b || a->dim() != dims || b->dim() != dims) return 0;
  int64_t macs = a->size(dims - 2) * a->size(dims - 1) * b->size(dims - 1);
  if (dims == 3) macs *= a->size(0);
  return macs;
}

bool is_backward_scope(const at::RecordFunction& fn) {
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) return true;
  // The engine also wraps each node in a FUNCTION-scope range with this prefix.
  static constexpr char kEnginePrefix[] = "autograd::engine::evaluate_function";
  return fn.scope() == at::RecordScope::FUNCTION &&
         std::strncmp(fn.name(), kEnginePrefix, sizeof(kEnginePrefix) - 1) == 0;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  ThreadState& state = thread_state();
  // Threads that inherited the callback (at::launch tasks, autograd device threads) have no
  // counters of their own: they must not count.
  if (state.counters.empty()) return nullptr;

  if (is_backward_scope(fn)) {
    ++state.backward_depth;
    auto ctx = std::make_unique<OpContext>();
    ctx->epoch = state.epoch;
    ctx->backward = true;
    return ctx;
  }
  if (fn.scope() != at::RecordScope::FUNCTION) return nullptr;
  if (state.backward_depth > 0 || state.counted_depth > 0) return nullptr;

  const auto& ops = counted_ops();
  const auto it = ops.find(std::string_view(fn.name()));
  if (it == ops.end()) return nullptr;

  const auto inputs = fn.inputs();
  auto ctx = std::make_unique<OpContext>();
  ctx->epoch = state.epoch;
  ctx->name = fn.name();
  switch (it->second) {
    case OpKind::kConvolution: {
      const at::Tensor* input = tensor_arg(inputs, 0);
      const at::Tensor* weight = tensor_arg(inputs, 1);
      if (!input || !weight || weight->dim() < 1 || weight->size(0) == 0) break;
      // weight: [Cout, Cin/groups, k...] normally, [Cin, Cout/groups, k...] transposed, so
      // numel/size(0) is the work per output element, or per input element when transposed
      // (each input element is scattered onto Cout/groups * prod(k) outputs).
      const int64_t per_element = weight->numel() / weight->size(0);
      const bool transposed = inputs.size() > 6 && inputs[6].isBool() && inputs[6].toBool();
      if (transposed) {
        ctx->macs = input->numel() * per_element;
      } else {
        ctx->per_output = per_element;
      }
      break;
    }
    case OpKind::kMm:
      ctx->macs = matmul_macs(tensor_arg(inputs, 0), tensor_arg(inputs, 1), 2);
      break;
    case OpKind::kAddmm:
      ctx->macs = matmul_macs(tensor_arg(inputs, 1), tensor_arg(inputs, 2), 2);
      break;
    case OpKind::kBmm:
      ctx->macs = matmul_macs(tensor_arg(inputs, 0), tensor_arg(inputs, 1), 3);
      break;
    case OpKind::kBaddbmm:
      ctx->macs = matmul_macs(tensor_arg(inputs, 1), tensor_arg(inputs, 2), 3);
      break;
    case OpKind::kMv:
    case OpKind::kAddmv: {
      const at::Tensor* mat = tensor_arg(inputs, it->second == OpKind::kMv ? 0 : 1);
      if (mat && mat->dim() == 2) ctx->macs = mat->numel();
      break;
    }
    case OpKind::kDot: {
      const at::Tensor* x = tensor_arg(inputs, 0);
      if (x) ctx->macs = x->numel();
      break;
    }
    case OpKind::kAttention: {
      const at::Tensor* q = tensor_arg(inputs, 0);
      const at::Tensor* k = tensor_arg(inputs, 1);
      const at::Tensor* v = tensor_arg(inputs, 2);
      if (!q || !k || !v || q->dim() < 2 || k->dim() < 2 || v->dim() < 2) break;
      const int64_t l = q->size(-2), e = q->size(-1), s = k->size(-2), ev = v->size(-1);
      if (l * e == 0) break;
      // q k^T: L*S*E, then softmax(.) v: L*S*Ev, per batch and head.
      ctx->macs = (q->numel() / (l * e)) * l * s * (e + ev);
      break;
    }
  }
  ++state.counted_depth;
  return ctx;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* raw) {
  if (!raw) return;
  auto* ctx = static_cast<OpContext*>(raw);
  ThreadState& state = thread_state();
  if (ctx->epoch != state.epoch) return;
  if (ctx->backward) {
    --state.backward_depth;
    return;
  }
  --state.counted_depth;
  int64_t macs = ctx->macs;
  if (ctx->per_output > 0) {
    const auto& outputs = fn.outputs();
    if (!outputs.empty() && outputs[0].isTensor()) {
      macs = outputs[0].toTensor().numel() * ctx->per_output;
    } else {
      TORCH_WARN_ONCE("MacCounter: ", ctx->name, " reported no output; its MACs are not counted");
    }
  }
  for (MacCounter* counter : state.counters) MacCounterAccess::add(*counter, ctx->name, macs);
}

}  // namespace

MacCounter::MacCounter() {
  ThreadState& state = thread_state();
  if (state.counters.empty()) {
    ++state.epoch;
    state.counted_depth = 0;
    state.backward_depth = 0;
    state.handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback(on_start, on_end)
            .needsInputs(true)
            .needsOutputs(true)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
  state.counters.push_back(this);
}

MacCounter::~MacCounter() {
  ThreadState& state = thread_state();
  auto it = std::find(state.counters.begin(), state.counters.end(), this);
  if (it == state.counters.end()) return;  // destroyed on another thread: see the header
  state.counters.erase(it);
  if (state.counters.empty() && state.handle != at::INVALID_CALLBACK_HANDLE) {
    at::removeCallback(state.handle);
    state.handle = at::INVALID_CALLBACK_HANDLE;
  }
}

void record_macs(const char* op, int64_t macs) {
  ThreadState& state = thread_state();
  if (state.counters.empty() || state.backward_depth > 0 || state.counted_depth > 0) return;
  const std::string name(op);
  for (MacCounter* counter : state.counters) MacCounterAccess::add(*counter, name, macs);
}

void MacCounter::add(const std::string& op, int64_t macs) {
  count_.macs += macs;
  count_.by_op[op] += macs;
  count_.calls[op] += 1;
}

int64_t count_parameters(const torch::nn::Module& m) {
  std::unordered_set<const c10::TensorImpl*> seen;
  int64_t total = 0;
  for (const auto& p : m.parameters(/*recurse=*/true)) {
    if (!p.defined() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
    total += p.numel();
  }
  return total;
}

}  // namespace dynattn
