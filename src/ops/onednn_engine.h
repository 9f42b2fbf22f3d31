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

}  // namespace dynattn::detail
#endif
