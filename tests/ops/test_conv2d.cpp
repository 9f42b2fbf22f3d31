#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dynattn/core/compat.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/profile/mac_counter.h"

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
struct SelectionGuard {
  bool previous = dynattn::conv2d_kernel_selection_enabled();
  ~SelectionGuard() { dynattn::set_conv2d_kernel_selection(previous); }
};

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
    dynattn::set_conv2d_kernel_selection(false);
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
  dynattn::set_conv2d_kernel_selection(false);
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
