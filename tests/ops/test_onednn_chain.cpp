#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/core/compat.h"
#include "dynattn/ops/onednn_chain.h"
#include "dynattn/profile/mac_counter.h"
#include "kernel_policy.h"
#include "test_util.h"

using dynattn::OnednnConvStack;
using dynattn::WinogradPolicy;
using dynattn::test_util::error_of;
using testing::HasSubstr;

namespace {

// Restores the process-wide policy whatever a test does.
using PolicyGuard = dynattn::testing::PolicyRestorer;

using Convs = std::vector<torch::nn::Conv2d>;

std::vector<const torch::nn::Conv2dImpl*> raw(const Convs& convs) {
  std::vector<const torch::nn::Conv2dImpl*> out;
  for (const auto& c : convs) out.push_back(c.get());
  return out;
}

// The stack's maths with ATen's operators, in double.
torch::Tensor reference(const Convs& convs, const torch::Tensor& x) {
  auto y = x.to(torch::kDouble);
  for (const auto& c : convs) {
    const auto& o = c->options;
    const auto& padding = **dynattn::variant_get_if<torch::ExpandingArray<2>>(&o.padding());
    y = torch::conv2d(y, c->weight.to(torch::kDouble),
                      c->bias.defined() ? c->bias.to(torch::kDouble) : torch::Tensor(), *o.stride(),
                      padding, *o.dilation(), o.groups())
            .relu();
  }
  return y;
}

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1, int64_t groups = 1,
                       int64_t dilation = 1, bool bias = true) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k)
                               .stride(stride)
                               .padding(dilation * (k / 2))
                               .dilation(dilation)
                               .groups(groups)
                               .bias(bias));
}

double relative_error(const torch::Tensor& got, const torch::Tensor& want) {
  return (got.to(torch::kDouble) - want).abs().max().item<double>() /
         std::max(1.0, want.abs().max().item<double>());
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

TEST(OnednnConvStack, MatchesAtenConvReluChainsUnderEveryPolicy) {
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  PolicyGuard guard;
  torch::manual_seed(3);
  // Strides, groups, dilation, 1x1 and 3x3, no bias, channel counts off the 16-block, and
  // Winograd-eligible layers (3x3, stride 1, multiples of 16).
  Convs convs = {conv(3, 32, 3),
                 conv(32, 32, 3),
                 conv(32, 48, 3, 2),
                 conv(48, 48, 3, 1, 2),
                 conv(48, 24, 1),
                 conv(24, 24, 3, 1, 1, 2),
                 conv(24, 64, 3, 2, 1, 1, false),
                 conv(64, 64, 3)};
  torch::NoGradGuard no_grad;
  for (auto policy :
       {WinogradPolicy::kNever, WinogradPolicy::kWhenSupported, WinogradPolicy::kMeasured}) {
    dynattn::testing::set_winograd(policy);
    OnednnConvStack stack;
    for (int64_t batch : {1, 5}) {
      for (bool channels_last : {false, true}) {
        auto x = torch::randn({batch, 3, 17, 15});
        if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        const auto y = stack.forward(raw(convs), x);
        const auto want = reference(convs, x);
        ASSERT_EQ(y.sizes(), want.sizes());
        EXPECT_TRUE(y.is_contiguous());
        EXPECT_LE(relative_error(y, want), 1e-5)
            << "policy " << static_cast<int>(policy) << " batch " << batch
            << (channels_last ? " channels-last" : "");
      }
    }
  }
}

TEST(OnednnConvStack, PolicyDecidesWinograd) {
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  PolicyGuard guard;
  Convs convs = {conv(32, 32, 3), conv(32, 32, 3, 2)};
  const auto x = torch::randn({2, 32, 8, 8});
  torch::NoGradGuard no_grad;
  auto kernels_under = [&](WinogradPolicy policy) {
    dynattn::testing::set_winograd(policy);
    OnednnConvStack stack;
    stack.forward(raw(convs), x);
    return stack.implementations();
  };
  const auto never = kernels_under(WinogradPolicy::kNever);
  ASSERT_EQ(never.size(), 2u);
  for (const auto& k : never) EXPECT_THAT(k, testing::Not(HasSubstr("wino")));
  const auto always = kernels_under(WinogradPolicy::kWhenSupported);
  ASSERT_EQ(always.size(), 2u);
  // oneDNN 2.x has float Winograd kernels for AVX-512 only; a strided conv never qualifies.
  if (cpu_has_avx512()) EXPECT_THAT(always[0], HasSubstr("wino"));
  EXPECT_THAT(always[1], testing::Not(HasSubstr("wino")));
}

TEST(OnednnConvStack, MeasuredChoicesAreKeptForTheProcess) {
  // Under kMeasured each layer configuration is timed once per process: stacks built later with
  // the same layers (other modules, equal weights) run the same algorithms, so their outputs are
  // bitwise equal. Timed per stack, near-tied layers picked differently from stack to stack.
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  PolicyGuard guard;
  dynattn::testing::set_winograd(WinogradPolicy::kMeasured);
  torch::manual_seed(11);
  const Convs first = {conv(32, 32, 3), conv(32, 48, 3), conv(48, 48, 3), conv(48, 32, 3)};
  const auto x = torch::randn({3, 32, 10, 10});
  torch::NoGradGuard no_grad;
  OnednnConvStack reference;
  const auto expected = reference.forward(raw(first), x);
  const auto kernels = reference.implementations();
  for (int copy = 0; copy < 6; ++copy) {
    Convs convs;
    for (const auto& c : first)
      convs.emplace_back(std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(c->clone()));
    OnednnConvStack stack;
    const auto out = stack.forward(raw(convs), x);
    EXPECT_EQ(stack.implementations(), kernels) << "copy " << copy;
    EXPECT_TRUE(torch::equal(out, expected)) << "copy " << copy;
  }
}

TEST(OnednnConvStack, CachedWeightsFollowChangesAndShapes) {
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  torch::manual_seed(5);
  Convs convs = {conv(16, 16, 3), conv(16, 16, 1)};
  OnednnConvStack stack;
  torch::NoGradGuard no_grad;
  const auto small = torch::randn({1, 16, 6, 6}), large = torch::randn({3, 16, 9, 9});
  const auto first = stack.forward(raw(convs), small);
  EXPECT_LE(relative_error(stack.forward(raw(convs), large), reference(convs, large)), 1e-5);
  EXPECT_TRUE(stack.forward(raw(convs), small).equal(first)) << "the first shape's plan is kept";
  convs[0]->weight.mul_(-0.5);  // in place: same tensor, new version
  const auto changed = stack.forward(raw(convs), small);
  EXPECT_GT((changed - first).abs().max().item<double>(), 1e-3) << "stale cached weights";
  EXPECT_LE(relative_error(changed, reference(convs, small)), 1e-5);
  // A copy starts with an empty cache and gives the same result.
  OnednnConvStack copy = stack;
  EXPECT_TRUE(copy.implementations().empty());
  EXPECT_LE((copy.forward(raw(convs), small) - changed).abs().max().item<double>(), 1e-5);
}

TEST(OnednnConvStack, CountsTheDirectConvolutionMacs) {
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  Convs convs = {conv(16, 32, 3, 2), conv(32, 32, 3)};
  OnednnConvStack stack;
  const auto x = torch::randn({2, 16, 8, 8});
  const auto count = dynattn::count_macs([&] { stack.forward(raw(convs), x); });
  // Output 4x4: 2 images x 16 pixels x (32x16x9 + 32x32x9), whatever the algorithm.
  EXPECT_EQ(count.macs, 2 * 16 * (32 * 16 * 9 + 32 * 32 * 9));
}

TEST(OnednnConvStack, BadInputsAreNamed) {
  if (!OnednnConvStack::available()) GTEST_SKIP() << "built without the oneDNN library";
  OnednnConvStack stack;
  torch::NoGradGuard no_grad;
  Convs convs = {conv(8, 16, 3), conv(8, 8, 3)};
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(convs), torch::randn({1, 8, 5, 5}));
              }),
              HasSubstr("layer 1 expects 8 input channels, the layer before gives 16"));
  Convs ok = {conv(8, 8, 3)};
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(ok), torch::randn({1, 4, 5, 5}));
              }),
              HasSubstr("layer 0 expects 8 input channels"));
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(ok), torch::randn({8, 5, 5}));
              }),
              HasSubstr("expected a dense float CPU tensor [N, C, H, W]"));
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(ok), torch::randn({1, 8, 5, 5}, torch::kDouble));
              }),
              HasSubstr("expected a dense float CPU tensor"));
  Convs big = {torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 8, 5))};
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(big), torch::randn({1, 8, 3, 3}));
              }),
              HasSubstr("layer 0: input [1, 8, 3, 3] is too small"));
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(ok), torch::randn({0, 8, 5, 5}));
              }),
              HasSubstr("empty input"));
  EXPECT_THAT(error_of([&] {
                stack.forward({}, torch::randn({1, 8, 3, 3}));
              }),
              HasSubstr("no layers"));
  Convs reflect = {torch::nn::Conv2d(
      torch::nn::Conv2dOptions(8, 8, 3).padding(1).padding_mode(torch::kReflect))};
  EXPECT_FALSE(OnednnConvStack::supports(raw(reflect)));
  EXPECT_THAT(error_of([&] {
                stack.forward(raw(reflect), torch::randn({1, 8, 5, 5}));
              }),
              HasSubstr("zero padding"));
}
