// Test helpers over the one kernel policy (ops/dispatch.h): change one of its fields, and restore
// the whole policy at scope exit whatever a test does.
#pragma once
#include "dynattn/ops/dispatch.h"

namespace dynattn::testing {

// Restores the policy in force when it was made.
struct PolicyRestorer {
  KernelPolicy previous = kernel_policy();
  ~PolicyRestorer() { set_kernel_policy(previous); }
};

inline void set_dynattn_kernels(bool enabled) {
  auto p = kernel_policy();
  p.dynattn = enabled;
  set_kernel_policy(p);
}

inline void set_wide_vectors(bool enabled) {
  auto p = kernel_policy();
  p.wide_vectors = enabled;
  set_kernel_policy(p);
}

inline void set_winograd(WinogradPolicy policy) {
  auto p = kernel_policy();
  p.winograd = policy;
  set_kernel_policy(p);
}

}  // namespace dynattn::testing
