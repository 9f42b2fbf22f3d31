// Helpers shared by the test executables (tests/common is on every test's include path).
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>

namespace dynattn::test_util {

// The message of the c10::Error that fn throws, without backtrace; records a test failure and
// returns "" when fn does not throw one.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  ADD_FAILURE() << "expected a c10::Error";
  return "";
}

}  // namespace dynattn::test_util
