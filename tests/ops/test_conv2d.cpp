#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"
#include "kernel_policy.h"

using dynattn::conv2d_forward;
using dynattn::ConvKernel;
using dynattn::select_conv2d_kernel;

namespace {

torch::nn::Conv2d make_conv(int64_t in, int64_t out, int64_t stride = 1, bool bias = false,
                            int64_t dilation = 1) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3)
                               .stride(stride)
                               .padding(dilation)
                               .dilation(dilation)
                               .bias(bias));
}

// Restores the process-wide switch whatever a test does.
using SelectionGuard = dynattn::testing::PolicyRestorer;

}  // namespace

TEST(Conv2dKernel, LargeSingleImagesGoToOneDnnOnlyWithoutAutograd) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch built without oneDNN";
  auto conv = make_conv(16, 16);
  auto x = torch::randn({1, 16, 28, 28});
  EXPECT_EQ(select_conv2d_kernel(x, *conv), ConvKernel::Aten) << "weights require grad";
  {
    torch::NoGradGuard no_grad;
    EXPECT_EQ(select_conv2d_kernel(x, *conv), ConvKernel::OneDnn);
    // Small maps and small convolutions stay with ATen, as do batches (ATen uses oneDNN).
    EXPECT_EQ(select_conv2d_kernel(torch::randn({1, 32, 14, 14}), *make_conv(32, 32)),
              ConvKernel::Aten);
    EXPECT_EQ(select_conv2d_kernel(torch::randn({1, 4, 28, 28}), *make_conv(4, 4)),
              ConvKernel::Aten);
    EXPECT_EQ(select_conv2d_kernel(torch::randn({2, 16, 28, 28}), *conv), ConvKernel::Aten);
    EXPECT_EQ(select_conv2d_kernel(x.to(torch::kDouble), *conv), ConvKernel::Aten);
    EXPECT_EQ(select_conv2d_kernel(torch::randn({1, 128, 7, 7}), *make_conv(128, 128)),
              ConvKernel::OneDnn);
    auto grouped = torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 16, 3).padding(1).groups(2));
    EXPECT_EQ(select_conv2d_kernel(x, *grouped), ConvKernel::Aten);
    auto reflect = torch::nn::Conv2d(
        torch::nn::Conv2dOptions(16, 16, 3).padding(1).padding_mode(torch::kReflect));
    EXPECT_EQ(select_conv2d_kernel(x, *reflect), ConvKernel::Aten);
    SelectionGuard guard;
    dynattn::testing::set_dynattn_kernels(false);
    EXPECT_EQ(select_conv2d_kernel(x, *conv), ConvKernel::Aten);
  }
}

// Whatever the kernel, the result is the module's own forward, in both layouts, with strides,
// dilation and bias.
TEST(Conv2dKernel, SameResultAsModuleForward) {
  struct Case {
    int64_t in, out, size, stride, dilation;
    bool bias;
  };
  for (const auto& c :
       {Case{16, 16, 28, 1, 1, false}, Case{16, 32, 28, 2, 1, true}, Case{24, 24, 28, 1, 2, true},
        Case{128, 64, 7, 1, 1, false}, Case{32, 32, 14, 1, 1, false}}) {
    auto conv = make_conv(c.in, c.out, c.stride, c.bias, c.dilation);
    auto x = torch::randn({1, c.in, c.size, c.size});
    for (bool channels_last : {false, true}) {
      auto input = channels_last ? x.contiguous(torch::MemoryFormat::ChannelsLast) : x;
      if (channels_last)
        conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));
      dynattn::InferenceGuard guard;
      const auto expected = conv->forward(input);
      const auto actual = conv2d_forward(*conv, input);
      ASSERT_EQ(actual.sizes(), expected.sizes());
      EXPECT_LE((actual - expected).abs().max().item<float>(),
                1e-5f * (1.0f + expected.abs().max().item<float>()))
          << c.in << "->" << c.out << " at " << c.size << ", channels_last " << channels_last;
    }
  }
}

TEST(Conv2dKernel, MacCounterCountsTheOneDnnPathOnce) {
  auto conv = make_conv(16, 16);
  auto x = torch::randn({1, 16, 28, 28});
  const int64_t macs = dynattn::count_macs([&] { conv2d_forward(*conv, x); }).macs;
  EXPECT_EQ(macs, 16 * 16 * 9 * 28 * 28);
  SelectionGuard guard;
  dynattn::testing::set_dynattn_kernels(false);
  EXPECT_EQ(dynattn::count_macs([&] { conv2d_forward(*conv, x); }).macs, macs);
}

TEST(Conv2dKernel, GradientsFlowThroughTheAtenPath) {
  auto conv = make_conv(16, 16);
  auto x = torch::randn({1, 16, 28, 28}, torch::requires_grad());
  conv2d_forward(*conv, x).sum().backward();
  ASSERT_TRUE(x.grad().defined());
  ASSERT_TRUE(conv->weight.grad().defined());
  EXPECT_GT(conv->weight.grad().abs().sum().item<float>(), 0.0f);
}

TEST(Conv1x1OnPooled, EqualsTheConvolutionWithAndWithoutBias) {
  for (bool bias : {true, false}) {
    torch::nn::Conv2d conv(torch::nn::Conv2dOptions(12, 5, 1).bias(bias));
    auto z = torch::randn({3, 12, 1, 1}, torch::requires_grad());
    const auto y = dynattn::conv1x1_on_pooled(*conv, z);
    EXPECT_TRUE(torch::allclose(y, conv->forward(z), 1e-6, 1e-6));
    EXPECT_EQ(dynattn::count_macs([&] { dynattn::conv1x1_on_pooled(*conv, z); }).macs, 3 * 12 * 5);
    y.sum().backward();
    EXPECT_TRUE(conv->weight.grad().defined());
  }
  torch::nn::Conv2d conv3(torch::nn::Conv2dOptions(4, 4, 3));
  torch::nn::Conv2d conv1(torch::nn::Conv2dOptions(4, 4, 1));
  EXPECT_THROW(dynattn::conv1x1_on_pooled(*conv3, torch::zeros({1, 4, 1, 1})), c10::Error);
  EXPECT_THROW(dynattn::conv1x1_on_pooled(*conv1, torch::zeros({1, 4, 2, 2})), c10::Error);
}

// same_conv2d's forward-operator backward against ATen's convolution backward, in double so that
// only a wrong formula can differ: every kernel path (1x1 with one or several outputs, 3x3 with
// dilation 1, 2 and 4, 7x7), both layouts, with and without bias, odd maps.
TEST(SameConv2d, GradientsEqualAtenConvolutionBackward) {
  torch::manual_seed(3);
  struct Case {
    int64_t in, out, k, dilation;
  };
  const std::vector<Case> cases{{16, 1, 1, 1}, {16, 4, 1, 1}, {1, 1, 1, 1}, {1, 1, 3, 4},
                                {2, 2, 3, 2},  {3, 5, 3, 1},  {2, 1, 7, 1}, {4, 1, 1, 1}};
  for (const auto& c : cases) {
    for (bool channels_last : {false, true}) {
      for (bool bias : {false, true}) {
        auto x0 = torch::randn({3, c.in, 9, 11}, torch::kDouble);
        if (channels_last) x0 = x0.contiguous(torch::MemoryFormat::ChannelsLast);
        const auto w0 = torch::randn({c.out, c.in, c.k, c.k}, torch::kDouble);
        const auto b0 = torch::randn({c.out}, torch::kDouble);
        const auto dy = torch::randn({3, c.out, 9, 11}, torch::kDouble);
        auto run = [&](bool ours) {
          auto x = x0.clone().requires_grad_();
          auto w = w0.clone().requires_grad_();
          auto b = b0.clone().requires_grad_();
          const auto y = ours ? dynattn::same_conv2d(x, w, bias ? b : torch::Tensor(), c.dilation)
                              : torch::conv2d(x, w, bias ? b : torch::Tensor(), 1,
                                              c.dilation * (c.k / 2), c.dilation);
          (y * dy).sum().backward();
          return std::vector<torch::Tensor>{y.detach(), x.grad(), w.grad(),
                                            bias ? b.grad() : torch::zeros({1})};
        };
        const auto ours = run(true), aten = run(false);
        for (size_t i = 0; i < ours.size(); ++i) {
          EXPECT_TRUE(torch::allclose(ours[i], aten[i], 1e-10, 1e-10))
              << "in " << c.in << " out " << c.out << " k " << c.k << " dilation " << c.dilation
              << " cl " << channels_last << " bias " << bias << " tensor " << i;
        }
        EXPECT_EQ(
            ours[1].is_contiguous(torch::MemoryFormat::ChannelsLast) && !ours[1].is_contiguous(),
            channels_last && c.in > 1)
            << "the input gradient keeps the input's layout";
      }
    }
  }
}

TEST(SameConv2d, RefusesEvenKernelsAndChannelMismatches) {
  const auto x = torch::randn({1, 2, 5, 5});
  try {
    dynattn::same_conv2d(x, torch::randn({1, 2, 2, 2}), {});
    FAIL() << "an even kernel must be refused";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("same_conv2d: expected"), std::string::npos) << e.what();
  }
  EXPECT_THROW(dynattn::same_conv2d(x, torch::randn({1, 3, 3, 3}), {}), c10::Error);
  EXPECT_THROW(dynattn::same_conv2d(x, torch::randn({1, 2, 3, 3}), {}, 0), c10::Error);
}

// The direct loops (CPU float NCHW, small kernels) against ATen in double:
// outputs and gradients within 1e-5 of each tensor's scale, for the shapes BAM and CBAM use and
// odd ones (rows wider than the dilation reach, maps smaller than it), across thread splits.
TEST(SameConv2d, DirectLoopsMatchAtenInFloat) {
  torch::manual_seed(4);
  struct Case {
    int64_t n, in, out, k, dilation, h, w;
  };
  const std::vector<Case> cases{{5, 16, 1, 1, 1, 28, 28},
                                {4, 1, 1, 3, 4, 28, 28},
                                {3, 2, 2, 3, 4, 14, 14},
                                {2, 8, 2, 1, 1, 14, 14},
                                {2, 3, 3, 3, 4, 7, 7},
                                {2, 2, 1, 7, 1, 9, 11},
                                {3, 1, 1, 3, 4, 3, 5},
                                {1, 3, 4, 3, 2, 6, 1},
                                // From 8 images on k > 1 runs on the lane layout
                                // (ops/lane_conv.h); 17: a partial vector of images.
                                {9, 2, 1, 7, 1, 7, 7},
                                {17, 2, 1, 7, 1, 6, 9},
                                {16, 1, 1, 3, 4, 5, 5},
                                {12, 3, 4, 3, 2, 8, 6},
                                {8, 2, 2, 5, 1, 4, 10}};
  for (const auto& c : cases) {
    const auto x0 = torch::randn({c.n, c.in, c.h, c.w});
    const auto w0 = torch::randn({c.out, c.in, c.k, c.k});
    const auto b0 = torch::randn({c.out});
    const auto dy = torch::randn({c.n, c.out, c.h, c.w});
    ASSERT_TRUE(dynattn::same_conv2d_direct(x0, w0));
    auto run = [&](bool ours, torch::Dtype dtype) {
      auto x = x0.to(dtype).clone().requires_grad_();
      auto w = w0.to(dtype).clone().requires_grad_();
      auto b = b0.to(dtype).clone().requires_grad_();
      const auto y = ours ? dynattn::same_conv2d(x, w, b, c.dilation)
                          : torch::conv2d(x, w, b, 1, c.dilation * (c.k / 2), c.dilation);
      (y * dy.to(dtype)).sum().backward();
      return std::vector<torch::Tensor>{y.detach(), x.grad(), w.grad(), b.grad()};
    };
    const auto exact = run(false, torch::kDouble);
    for (int threads : {1, 2}) {
      torch::set_num_threads(threads);
      const auto ours = run(true, torch::kFloat);
      for (size_t i = 0; i < ours.size(); ++i) {
        const double scale = exact[i].abs().max().item<double>() + 1e-6;
        EXPECT_LE((ours[i].to(torch::kDouble) - exact[i]).abs().max().item<double>(), 1e-5 * scale)
            << "in " << c.in << " out " << c.out << " k " << c.k << " dilation " << c.dilation
            << " map " << c.h << "x" << c.w << " threads " << threads << " tensor " << i;
      }
    }
    torch::set_num_threads(1);
  }
  // Channels-last input and wide convolutions keep ATen's kernels.
  EXPECT_FALSE(dynattn::same_conv2d_direct(
      torch::randn({2, 16, 5, 5}).contiguous(torch::MemoryFormat::ChannelsLast),
      torch::randn({1, 16, 1, 1})));
  EXPECT_FALSE(dynattn::same_conv2d_direct(torch::randn({2, 4, 5, 5}), torch::randn({4, 4, 3, 3})));
  EXPECT_FALSE(
      dynattn::same_conv2d_direct(torch::randn({2, 64, 5, 5}), torch::randn({4, 64, 1, 1})));
}
