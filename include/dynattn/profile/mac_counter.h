// MAC counting by observation: a MacCounter watches the ATen operators that actually run on
// the current thread (through at::RecordFunction callbacks) and adds up the multiply-
// accumulates of the compute-heavy ones. Counting what executes, rather than having every
// module report its own cost, means skipped work (a gate that turns a block off, an early
// exit) is never counted and new modules need no bookkeeping.
//
// Counted operators and their cost (bias additions and element-wise ops are not MACs):
//   aten::convolution, aten::_convolution   out.numel() * Cin/groups * prod(kernel)
//                                            (transposed: in.numel() * Cout/groups * prod(k))
//   aten::addmm(_), aten::mm, aten::_addmm_activation      n * k * m
//   aten::bmm, aten::baddbmm(_), aten::addbmm(_)          b * n * k * m
//   aten::mv, aten::addmv(_)                              n * k
//   aten::dot, aten::vdot                                 n
//   aten::_scaled_dot_product_*attention* (fused kernels of LibTorch 2.x)
//                                                         B * H * L * S * (E + Ev)
// aten::linear, aten::matmul, aten::einsum, aten::conv2d, ... are not counted themselves:
// ATen decomposes them into the operators above. An operator that runs inside a counted one
// (convolution -> _convolution -> mkldnn_convolution, mv -> addmv_) is never counted again.
//
// Only the forward pass is counted: operators that run inside an autograd backward node
// (scope BACKWARD_FUNCTION, e.g. the mm of MmBackward0, aten::convolution_backward) are
// ignored, so a counter around a whole training step reports the forward MACs.
// RecordFunction must be enabled (a DisableRecordFunctionGuard hides everything).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "dynattn/core/compat.h"

namespace dynattn {

struct MacCount {
  int64_t macs = 0;
  std::map<std::string, int64_t> by_op;  // operator name ("aten::convolution") -> MACs
  std::map<std::string, int64_t> calls;  // operator name -> number of counted calls
};

// RAII: while alive, counts the operators executed on the thread that created it. Counters
// nest: every live counter of the thread sees every operator. Must be destroyed on the thread
// that created it (like any guard); operators on other threads (a DataLoader worker, a
// thread pool) are not counted.
class MacCounter {
 public:
  MacCounter();
  ~MacCounter();
  MacCounter(const MacCounter&) = delete;
  MacCounter& operator=(const MacCounter&) = delete;

  const MacCount& count() const { return count_; }
  int64_t macs() const { return count_.macs; }
  void reset() { count_ = MacCount(); }

 private:
  friend struct MacCounterAccess;  // the RecordFunction observer in mac_counter.cpp
  void add(const std::string& op, int64_t macs);

  MacCount count_;
};

// Adds `macs` under the name `op` to every live counter of this thread, as if an ATen operator
// of that name had run: for kernels that compute outside ATen's operators (ops/fused_gates.h),
// which RecordFunction does not see. Like ATen's, nothing is added inside a counted operator or
// an autograd backward node, nor on threads without a counter.
void record_macs(const char* op, int64_t macs);

// Runs fn() in inference mode under a fresh counter and returns what it counted.
template <class F>
MacCount count_macs(F&& fn) {
  InferenceGuard no_grad;
  MacCounter counter;
  std::forward<F>(fn)();
  return counter.count();
}

// Number of scalars in all parameters of `m` and its submodules, trainable or frozen;
// a parameter shared by two submodules is counted once. Buffers are not parameters.
int64_t count_parameters(const torch::nn::Module& m);

}  // namespace dynattn
