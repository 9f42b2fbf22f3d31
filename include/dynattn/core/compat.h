// Version shims: the one place where dynattn adapts to differences between LibTorch 1.13
// (Debian) and LibTorch 2.x (pip, CUDA builds). Everything else uses these names.
#pragma once
#include <torch/torch.h>

#include <string>

namespace dynattn {

// "1.13.1"-style version string of the LibTorch that dynattn was compiled against.
inline std::string torch_version_string() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

// Inference guard: InferenceMode exists since 1.9; fall back to NoGradGuard otherwise.
#if (TORCH_VERSION_MAJOR > 1) || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 9)
using InferenceGuard = c10::InferenceMode;
#else
using InferenceGuard = torch::NoGradGuard;
#endif

// Waits for the kernels queued on a CUDA device (-1: the current one). torch::cuda::synchronize
// exists from LibTorch 1.13 on; CPU-only builds define it too (it then fails if called).
inline void cuda_synchronize(int64_t device_index) {
#if (TORCH_VERSION_MAJOR > 1) || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 13)
  torch::cuda::synchronize(device_index);
#else
  TORCH_CHECK(false, "cuda_synchronize(", device_index, ") needs LibTorch >= 1.13");
#endif
}

// Alternatives of the variants in LibTorch's options (padding, padding_mode): c10::variant up to
// 2.0, std::variant from 2.1 on.
template <class T, class Variant>
auto variant_get_if(const Variant* v) {
#if (TORCH_VERSION_MAJOR > 2) || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  return std::get_if<T>(v);
#else
  return c10::get_if<T>(v);
#endif
}

// The integer type of the running totals that c10::MemoryReportingInfoBase::reportMemoryUsage
// receives (total_allocated, total_reserved): int64_t up to 1.13, size_t from 2.0 on.
#if TORCH_VERSION_MAJOR >= 2
using MemoryReportTotal = size_t;
#else
using MemoryReportTotal = int64_t;
#endif

}  // namespace dynattn
