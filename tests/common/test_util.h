// Helpers shared by the test executables (tests/common is on every test's include path).
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
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

// max |got - want| over max(1, max |want|), in double: the error of a float result against a
// reference, relative to the reference's scale (absolute below 1).
inline double max_rel(const torch::Tensor& got, const torch::Tensor& want) {
  return (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>() /
         std::max(1.0, want.abs().max().item<double>());
}

}  // namespace dynattn::test_util
