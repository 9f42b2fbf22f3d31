// The finite-difference helper itself (tests/common/gradcheck.h): it must pass correct
// gradients and catch wrong ones, or every gradient test built on it proves nothing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "gradcheck.h"

using dynattn::test_util::gradcheck;
using dynattn::test_util::with_parameters;

namespace {
// y = x^3 whose backward claims 2x^2 instead of 3x^2.
struct WrongCube : torch::autograd::Function<WrongCube> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
    return x.pow(3);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad) {
    auto x = ctx->get_saved_variables()[0];
    return {grad[0] * 2 * x * x};
  }
};
}  // namespace

TEST(Gradcheck, PassesCorrectGradientsOfInputsAndParameters) {
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3).padding(1));
  conv->to(torch::kDouble);
  auto x = torch::randn({2, 3, 5, 5}, torch::kDouble).requires_grad_();
  const auto r =
      gradcheck([&] { return torch::tanh(conv->forward(x)); }, with_parameters({x}, *conv));
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.checked, 48 + 48 + 4);  // x and weight sampled, bias complete
}

TEST(Gradcheck, CatchesAWrongBackward) {
  auto x = torch::rand({6}, torch::kDouble).add_(0.5).requires_grad_();
  const auto r = gradcheck([&] { return WrongCube::apply(x); }, {x});
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("tensor 0"), std::string::npos) << r.message;
}

TEST(Gradcheck, RejectsFloatOrNonLeafTensors) {
  auto f = torch::randn({3}, torch::requires_grad());
  EXPECT_FALSE(gradcheck([&] { return f * 2; }, {f}).ok);
  auto d = torch::randn({3}, torch::kDouble).requires_grad_();
  auto non_leaf = d * 2;
  EXPECT_FALSE(gradcheck([&] { return non_leaf; }, {non_leaf}).ok);
}
