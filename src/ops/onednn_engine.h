// The oneDNN engine shared by dynattn's direct libdnnl calls (internal; needs DYNATTN_HAVE_ONEDNN).
#pragma once
#ifdef DYNATTN_HAVE_ONEDNN
#include <dnnl.hpp>

namespace dynattn::detail {

inline dnnl::engine& onednn_cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

}  // namespace dynattn::detail
#endif
