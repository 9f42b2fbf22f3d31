#include "dynattn/core/version.h"

// Set by CMake on the library target from project(VERSION ...).
#ifndef DYNATTN_VERSION
#error "DYNATTN_VERSION must be defined by the build (see CMakeLists.txt)"
#endif

namespace dynattn {

std::string version() {
  return DYNATTN_VERSION;
}

}  // namespace dynattn
