// The oneDNN engine and streams shared by dynattn's direct libdnnl calls (internal; needs
// DYNATTN_HAVE_ONEDNN).
#pragma once
#ifdef DYNATTN_HAVE_ONEDNN
#include <dnnl.hpp>

namespace dynattn::detail {

inline dnnl::engine& onednn_cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream per thread: creating one per call costs microseconds, as much as a small product.
inline dnnl::stream& onednn_cpu_stream() {
  thread_local dnnl::stream stream(onednn_cpu_engine());
  return stream;
}

// Whether a primitive's implementation (primitive_desc::impl_info_str()) is one of oneDNN's
// reference kernels ("ref:any", ...), which run 100-1000x slower than its JIT ones: dynattn
// never takes one (ops/dispatch.h); the caller takes its next candidate.
inline bool is_reference_implementation(const char* impl_info) {
  return impl_info != nullptr && impl_info[0] == 'r' && impl_info[1] == 'e' && impl_info[2] == 'f';
}

}  // namespace dynattn::detail
#endif
