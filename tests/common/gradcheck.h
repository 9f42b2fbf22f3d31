// Finite-difference gradient check: the one helper every module test uses (the role of
// torch.autograd.gradcheck and dlib's test_layer). Central differences in double precision on
// a random projection of the output, compared element by element with autograd's gradient.
//
//   auto x = torch::randn({2, 8, 5, 5}, torch::kDouble).requires_grad_();
//   module->to(torch::kDouble);
//   auto wrt = dynattn::test_util::with_parameters({x}, *module);
//   EXPECT_GRADCHECK([&] { return module->forward(x); }, wrt);
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace dynattn::test_util {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-4;
  // Elements checked per tensor, spread over the tensor; all of them when it is smaller.
  int64_t max_checks_per_tensor = 48;
  uint64_t seed = 1234;
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0;
  int64_t checked = 0;
  std::string message;  // the first mismatches, or why the check could not run
};

// `fn` recomputes the output from the current values of the tensors in `wrt`; each of those
// must be a contiguous double leaf that requires grad. `fn` must be deterministic.
inline GradcheckResult gradcheck(const std::function<torch::Tensor()>& fn,
                                 const std::vector<torch::Tensor>& wrt,
                                 const GradcheckOptions& o = GradcheckOptions()) {
  GradcheckResult r;
  for (size_t i = 0; i < wrt.size(); ++i) {
    const auto& t = wrt[i];
    if (!t.defined() || t.scalar_type() != torch::kDouble || !t.requires_grad() || !t.is_leaf() ||
        !t.is_contiguous()) {
      r.ok = false;
      r.message = "gradcheck: tensor " + std::to_string(i) +
                  " must be a defined, contiguous double leaf that requires grad";
      return r;
    }
  }
  torch::Tensor out = fn();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const torch::Tensor projection =
      torch::randn(out.sizes(), gen, torch::TensorOptions().dtype(torch::kDouble)).to(out.device());
  auto loss = [&](const torch::Tensor& y) { return (y.to(torch::kDouble) * projection).sum(); };
  const auto analytic =
      torch::autograd::grad({loss(out)}, wrt, /*grad_outputs=*/{}, /*retain_graph=*/false,
                            /*create_graph=*/false, /*allow_unused=*/true);

  std::ostringstream mismatches;
  int reported = 0;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < wrt.size(); ++i) {
    auto flat = wrt[i].detach().view(-1);
    const auto grad = analytic[i].defined() ? analytic[i].reshape(-1).cpu()
                                            : torch::zeros({flat.numel()}, torch::kDouble);
    const int64_t n = flat.numel();
    const int64_t checks = std::min(n, o.max_checks_per_tensor);
    for (int64_t c = 0; c < checks; ++c) {
      const int64_t k = (c * n) / checks;  // spread over the tensor
      const double saved = flat[k].item<double>();
      flat[k].fill_(saved + o.eps);
      const double plus = loss(fn()).item<double>();
      flat[k].fill_(saved - o.eps);
      const double minus = loss(fn()).item<double>();
      flat[k].fill_(saved);
      const double numeric = (plus - minus) / (2 * o.eps);
      const double exact = grad[k].item<double>();
      const double err = std::abs(numeric - exact);
      r.max_abs_error = std::max(r.max_abs_error, err);
      ++r.checked;
      if (!(err <= o.atol + o.rtol * std::abs(numeric))) {
        r.ok = false;
        if (reported++ < 5)
          mismatches << "tensor " << i << " element " << k << ": autograd " << exact
                     << ", finite difference " << numeric << "\n";
      }
    }
  }
  r.message = mismatches.str();
  return r;
}

// `inputs` followed by every parameter of `module` that requires grad.
inline std::vector<torch::Tensor> with_parameters(std::vector<torch::Tensor> inputs,
                                                  const torch::nn::Module& module) {
  for (const auto& p : module.parameters())
    if (p.requires_grad()) inputs.push_back(p);
  return inputs;
}

}  // namespace dynattn::test_util

#define EXPECT_GRADCHECK(fn, ...)                                                               \
  do {                                                                                          \
    const auto gradcheck_result_ = ::dynattn::test_util::gradcheck(fn, __VA_ARGS__);            \
    EXPECT_TRUE(gradcheck_result_.ok) << "max abs error " << gradcheck_result_.max_abs_error    \
                                      << " over " << gradcheck_result_.checked << " elements\n" \
                                      << gradcheck_result_.message;                             \
  } while (0)
