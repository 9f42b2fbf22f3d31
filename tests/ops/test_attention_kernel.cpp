// The private kernel behind ops/softmax_attention.h, through the options only the non-local
// block's fused paths use: theta's bias in the load, phi and g as row ranges of one [N, 2D, K]
// buffer (image strides), the row of ones under y, and gradients written into such a buffer.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "../../src/ops/attention_kernel.h"
#include "test_util.h"

using dynattn::test_util::max_rel;

TEST(AttentionKernel, BiasStridesAndOnesRowAgainstAtenInDouble) {
  if (!dynattn::detail::attention_kernel_available()) GTEST_SKIP() << "no vector extensions";
  torch::manual_seed(31);
  const int64_t n = 3, d = 5, q = 21, k = 11;  // tails: 16 + 5 queries, 8 + 3 keys
  const float scale = 0.7f;
  const auto theta = torch::randn({n, d, q}), bias = torch::randn({d});
  const auto keys = torch::randn({n, 2 * d, k});  // phi rows, then g rows
  auto y = torch::full({n, d + 1, q}, -5.0f);
  auto probs = torch::empty({n, dynattn::detail::attention_kernel_probs_size(q, k)});

  dynattn::detail::AttentionKernelArgs a;
  a.theta = theta.data_ptr<float>();
  a.theta_stride = d * q;
  a.theta_bias = bias.data_ptr<float>();
  a.phi = keys.data_ptr<float>();
  a.phi_stride = 2 * d * k;
  a.g = a.phi + d * k;
  a.g_stride = 2 * d * k;
  a.y = y.data_ptr<float>();
  a.y_stride = (d + 1) * q;
  a.y_ones_row = true;
  a.probs = probs.data_ptr<float>();
  a.count = n;
  a.d = d;
  a.dv = d;
  a.q = q;
  a.k = k;
  a.scale = scale;
  dynattn::detail::attention_kernel_forward(a);

  auto theta64 = theta.to(torch::kDouble).requires_grad_();
  auto bias64 = bias.to(torch::kDouble);
  auto keys64 = keys.to(torch::kDouble).requires_grad_();
  const auto phi64 = keys64.narrow(1, 0, d), g64 = keys64.narrow(1, d, d);
  const auto logits = torch::bmm((theta64 + bias64.view({1, d, 1})).transpose(1, 2), phi64) * scale;
  const auto want = torch::bmm(g64, torch::softmax(logits, 2).transpose(1, 2));
  EXPECT_LE(max_rel(y.narrow(1, 0, d), want), 1e-5);
  EXPECT_TRUE(torch::equal(y.select(1, d), torch::ones({n, q})));

  // Backward into a [N, 2D, K] gradient buffer, from the probabilities the forward saved.
  const auto dy = torch::randn({n, d, q});
  (want * dy.to(torch::kDouble)).sum().backward();
  auto d_theta = torch::empty({n, d, q});
  auto d_keys = torch::full({n, 2 * d, k}, -7.0f);
  dynattn::detail::AttentionKernelGrads grads;
  grads.dy = dy.data_ptr<float>();
  grads.dy_stride = d * q;
  grads.d_theta = d_theta.data_ptr<float>();
  grads.d_theta_stride = d * q;
  grads.d_phi = d_keys.data_ptr<float>();
  grads.d_phi_stride = 2 * d * k;
  grads.d_g = grads.d_phi + d * k;
  grads.d_g_stride = 2 * d * k;
  dynattn::detail::attention_kernel_backward(a, grads);
  EXPECT_LE(max_rel(d_theta, theta64.grad()), 1e-5);
  EXPECT_LE(max_rel(d_keys, keys64.grad()), 1e-5);

  // Images [1, 3) alone give the same rows (to rounding: without probs to save, the forward
  // normalises the outputs instead of the weights).
  auto y_part = torch::zeros_like(y);
  auto part = dynattn::detail::attention_kernel_images(a, 1, 3);
  part.y = y_part.data_ptr<float>() + 1 * a.y_stride;
  part.probs = nullptr;
  dynattn::detail::attention_kernel_forward(part);
  EXPECT_LE(max_rel(y_part.narrow(0, 1, 2), y.narrow(0, 1, 2)), 1e-6);
  EXPECT_TRUE(torch::equal(y_part[0], torch::zeros({d + 1, q})));  // image 0 untouched
}
