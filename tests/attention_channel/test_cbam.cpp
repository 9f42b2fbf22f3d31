#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "channel_test_util.h"
#include "dynattn/attention/cbam.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using dynattn::test_util::randomize;
using ::testing::HasSubstr;

namespace {
torch::Tensor tiny_input() {
  return torch::tensor({1.f, 2.f, 3.f, 4.f, -1.f, 0.f, 1.f, 2.f}).view({1, 2, 2, 2});
}

// C = 2, r = 2 (rd = 1), kernel 3, hand-set weights; BN in eval mode with set statistics.
CBAM tiny_cbam() {
  CBAM cbam(CBAMOptions(2).reduction(2).kernel_size(3));
  torch::NoGradGuard no_grad;
  cbam->channel->fc1->weight.copy_(torch::tensor({1.f, -1.f}).view({1, 2, 1, 1}));
  cbam->channel->fc1->bias.fill_(0.5);
  cbam->channel->fc2->weight.copy_(torch::tensor({1.f, -0.6f}).view({2, 1, 1, 1}));
  cbam->channel->fc2->bias.copy_(torch::tensor({0.f, 0.5f}));
  cbam->spatial->conv->weight.copy_(torch::linspace(-0.4, 0.45, 18).view({1, 2, 3, 3}));
  cbam->spatial->bn->weight.fill_(1.0);
  cbam->spatial->bn->bias.fill_(0.1);
  cbam->spatial->bn->running_mean.fill_(0.2);
  cbam->spatial->bn->running_var.fill_(1.5);
  cbam->eval();
  return cbam;
}

// Copies every parameter and buffer of `from` into `to` (same names and shapes).
void copy_state(torch::nn::Module& to, const torch::nn::Module& from) {
  torch::NoGradGuard no_grad;
  auto src = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(src[p.key()]);
  auto bufs = from.named_buffers();
  for (auto& b : to.named_buffers()) b.value().copy_(bufs[b.key()]);
}
}  // namespace

TEST(CBAM, HandCheckedAgainstTheOfficialCode) {
  // Channel gate: avg (2.5, 0.5) and max (4, 2) both give h = 2.5 and logits (2.5, -1); the
  // shared MLP's outputs add to (5, -2): M_c = sigmoid(5, -2). The spatial values below come
  // from the official code (Linear MLP, max_pool2d, ChannelPool [max; mean], BasicConv) run in
  // Python torch 1.13 with these weights.
  auto cbam = tiny_cbam();
  auto r = cbam->forward_with_maps(tiny_input());
  EXPECT_TRUE(torch::allclose(r.maps.at("channel"),
                              torch::tensor({0.99330717f, 0.11920292f}).view({1, 2, 1, 1}), 1e-6,
                              1e-7));
  EXPECT_TRUE(torch::allclose(
      r.maps.at("spatial"),
      torch::tensor({0.73533493f, 0.60078156f, 0.30628309f, 0.19299081f}).view({1, 1, 2, 2}), 1e-5,
      1e-7));
  auto expected = torch::tensor({0.73041344f, 1.19352126f, 0.91269958f, 0.76679665f, -0.08765407f,
                                 0.f, 0.03650984f, 0.04601014f})
                      .view({1, 2, 2, 2});
  EXPECT_TRUE(torch::allclose(r.output, expected, 1e-5, 1e-6));
  EXPECT_TRUE(torch::equal(cbam->forward(tiny_input()), r.output));
}

TEST(CBAM, OutputIsInputTimesBothMaps) {
  CBAM cbam(CBAMOptions(32).reduction(8));
  randomize(*cbam, 4);
  cbam->eval();
  auto x = torch::randn({2, 32, 6, 5}) + 3.0;
  auto r = cbam->forward_with_maps(x);
  ASSERT_EQ(r.maps.at("channel").sizes(), torch::IntArrayRef({2, 32, 1, 1}));
  ASSERT_EQ(r.maps.at("spatial").sizes(), torch::IntArrayRef({2, 1, 6, 5}));
  EXPECT_TRUE(
      torch::allclose(r.output / x, r.maps.at("channel") * r.maps.at("spatial"), 1e-5, 1e-6));
  EXPECT_GT(r.maps.at("spatial").min().item<float>(), 0.f);
  EXPECT_LT(r.maps.at("spatial").max().item<float>(), 1.f);
}

TEST(CBAM, PooledMapOrderOnlyPermutesTheConvInputChannels) {
  CBAM official(CBAMOptions(16).reduction(4));
  randomize(*official, 5);
  CBAM mean_first(CBAMOptions(16).reduction(4).max_first(false));
  copy_state(*mean_first, *official);
  official->eval();
  mean_first->eval();
  auto x = torch::randn({2, 16, 5, 5});
  // Same weights, other order: a different function.
  EXPECT_GT(dynattn::test_util::max_abs_diff(mean_first->forward(x), official->forward(x)), 1e-3);
  {
    torch::NoGradGuard no_grad;
    mean_first->spatial->conv->weight.copy_(official->spatial->conv->weight.flip({1}));
  }
  // Swapping the conv's two input channels undoes the order switch exactly.
  EXPECT_TRUE(torch::allclose(mean_first->forward(x), official->forward(x), 1e-6, 1e-7));
}

TEST(CBAM, MlpBiasSwitchRegistersNoBias) {
  CBAM with(16);
  EXPECT_TRUE(with->channel->fc1->bias.defined());
  EXPECT_TRUE(with->channel->fc2->bias.defined());
  EXPECT_EQ(with->named_parameters().size(), 7u);  // fc1 w b, fc2 w b, conv w, bn w b
  CBAM without(CBAMOptions(16).mlp_bias(false));
  EXPECT_FALSE(without->channel->fc1->bias.defined());
  EXPECT_FALSE(without->channel->fc2->bias.defined());
  auto names = without->named_parameters().keys();
  EXPECT_EQ(names, (std::vector<std::string>{"channel.fc1.weight", "channel.fc2.weight",
                                             "spatial.conv.weight", "spatial.bn.weight",
                                             "spatial.bn.bias"}));
  // The official init zeroes the MLP biases, so both start as the same function.
  {
    torch::NoGradGuard no_grad;
    without->channel->fc1->weight.copy_(with->channel->fc1->weight);
    without->channel->fc2->weight.copy_(with->channel->fc2->weight);
    without->spatial->conv->weight.copy_(with->spatial->conv->weight);
  }
  auto x = torch::randn({2, 16, 4, 4});
  EXPECT_TRUE(torch::allclose(with->forward(x), without->forward(x), 1e-6, 1e-7));
}

TEST(CBAM, SpatialBnSwitchIsThePaperForm) {
  CBAM paper(CBAMOptions(8).reduction(2).spatial_bn(false).kernel_size(3));
  EXPECT_TRUE(paper->spatial->bn.is_empty());
  ASSERT_TRUE(paper->spatial->conv->bias.defined());
  EXPECT_TRUE(paper->named_buffers().is_empty());
  randomize(*paper, 6);
  // M_s = sigmoid(conv([max; mean]) + b), nothing else.
  auto x = torch::randn({2, 8, 4, 4});
  auto r = paper->forward_with_maps(x);
  auto refined = x * r.maps.at("channel");
  auto pooled = torch::cat({refined.amax(1, true), refined.mean(1, true)}, 1);
  auto expected = torch::sigmoid(
      torch::conv2d(pooled, paper->spatial->conv->weight, paper->spatial->conv->bias, 1, 1));
  EXPECT_TRUE(torch::allclose(r.maps.at("spatial"), expected, 1e-6, 1e-7));
}

TEST(CBAM, OfficialInitStartsTheSpatialGateAtOneHalf) {
  CBAM cbam(16);
  EXPECT_TRUE(torch::equal(cbam->spatial->bn->weight, torch::zeros({1})));
  for (bool training : {true, false}) {
    cbam->train(training);
    auto ms = cbam->forward_with_maps(torch::randn({2, 16, 5, 5})).maps.at("spatial");
    EXPECT_TRUE(torch::allclose(ms, torch::full_like(ms, 0.5)));
  }
  EXPECT_TRUE(torch::equal(CBAM(CBAMOptions::timm(16))->spatial->bn->weight, torch::ones({1})));
}

TEST(CBAM, BatchNormTrainAndEvalModes) {
  CBAM cbam(CBAMOptions(8).reduction(2).kernel_size(3));
  randomize(*cbam, 7);
  auto x = torch::randn({4, 8, 5, 5});
  auto bn = cbam->spatial->bn;
  const auto mean0 = bn->running_mean.clone(), var0 = bn->running_var.clone();
  cbam->eval();
  auto eval_out = cbam->forward(x);
  EXPECT_TRUE(torch::equal(bn->running_mean, mean0));  // eval leaves the statistics alone
  EXPECT_TRUE(torch::equal(cbam->forward(x), eval_out));
  // Train mode: batch statistics, and running statistics move by the official momentum 0.01.
  cbam->train();
  auto refined = x * cbam->channel->forward(x);
  auto pooled = torch::cat({refined.amax(1, true), refined.mean(1, true)}, 1);
  auto logits = torch::conv2d(pooled, cbam->spatial->conv->weight, {}, 1, 1).detach();
  auto train_out = cbam->forward(x);
  const double n = static_cast<double>(logits.numel());
  auto batch_mean = logits.mean(), batch_var = logits.var(/*unbiased=*/false);
  EXPECT_TRUE(torch::allclose(bn->running_mean, 0.99 * mean0 + 0.01 * batch_mean, 1e-5, 1e-6));
  EXPECT_TRUE(
      torch::allclose(bn->running_var, 0.99 * var0 + 0.01 * batch_var * n / (n - 1), 1e-5, 1e-6));
  auto normalised = (logits - batch_mean) / torch::sqrt(batch_var + 1e-5);
  auto ms = torch::sigmoid(normalised * bn->weight + bn->bias);
  EXPECT_TRUE(torch::allclose(train_out, refined * ms, 1e-5, 1e-5));
  EXPECT_GT(dynattn::test_util::max_abs_diff(train_out, eval_out), 1e-3);
  EXPECT_DOUBLE_EQ(CBAM(CBAMOptions::timm(8))->spatial->bn->options.momentum().value(), 0.1);
}

TEST(CBAM, GradcheckDouble) {
  for (bool training : {true, false}) {
    for (bool spatial_bn : {true, false}) {
      CBAM cbam(CBAMOptions(8).reduction(2).kernel_size(3).spatial_bn(spatial_bn));
      cbam->to(torch::kDouble);
      randomize(*cbam, 8);
      cbam->train(training);
      auto x = torch::randn({2, 8, 4, 3}, torch::kDouble).requires_grad_();
      // Train-mode BN updates its statistics on every call; they do not enter the output.
      EXPECT_GRADCHECK([&] { return cbam->forward(x); },
                       dynattn::test_util::with_parameters({x}, *cbam));
    }
  }
}

TEST(CBAM, ChannelsLastGivesTheSameOutput) {
  CBAM cbam(32);
  randomize(*cbam, 9);
  cbam->eval();
  auto x = torch::randn({2, 32, 7, 7});
  EXPECT_TRUE(torch::allclose(cbam->forward(x.contiguous(torch::MemoryFormat::ChannelsLast)),
                              cbam->forward(x), 1e-5, 1e-6));
}

TEST(CBAM, Macs) {
  CBAM cbam(64);  // rd = 4, kernel 7
  cbam->eval();
  auto x = torch::randn({1, 64, 7, 7});
  // Shared MLP on two descriptors: 2 * (64*4 + 4*64); spatial conv: 7*7 outputs * 2*7*7.
  EXPECT_EQ(count_macs([&] { cbam->forward(x); }).macs, 2 * 2 * 64 * 4 + 49 * 2 * 49);
}

TEST(CBAM, TimmPreset) {
  auto o = CBAMOptions::timm(40);
  EXPECT_FALSE(o.max_first());
  EXPECT_FALSE(o.mlp_bias());
  CBAM timm(o);
  EXPECT_EQ(timm->channel->rd_channels, 3);      // make_divisible(2.5, 1, round_limit 0)
  EXPECT_EQ(CBAM(40)->channel->rd_channels, 2);  // official: 40 // 16
}

TEST(CBAM, RejectsBadInputAndOptions) {
  CBAM cbam(16);
  EXPECT_THAT(error_of([&] {
                cbam->forward(torch::zeros({1, 8, 4, 4}));
              }),
              HasSubstr("CBAM: expected a 4-D input [N,C,H,W] with C=16, got [1, 8, 4, 4]"));
  EXPECT_THAT(error_of([&] {
                cbam->forward(torch::zeros({16, 4, 4}));
              }),
              HasSubstr("CBAM: expected a 4-D input"));
  EXPECT_THAT(error_of([&] {
                cbam->forward(torch::zeros({1, 16, 4, 4}, torch::kLong));
              }),
              HasSubstr("CBAM: expected a floating-point input"));
  EXPECT_THAT(error_of([] { create_attention("cbam:kernel=4", 64); }),
              HasSubstr("CBAM: spatial kernel size must be odd and positive, got 4"));
  EXPECT_THAT(error_of([] { create_attention("cbam:r=-1", 64); }),
              HasSubstr("CBAM: reduction ratio r must be positive"));
  EXPECT_THAT(error_of([] { create_attention("cbam:max_first=maybe", 64); }),
              HasSubstr("expects true/false"));
  EXPECT_THAT(error_of([] { create_attention("cbam:gate=sigmoid", 64); }),
              HasSubstr("unknown option 'gate' (known: r, rd, policy, divisor, max_first, "
                        "mlp_bias, spatial_bn, kernel)"));
}

TEST(CBAM, AttentionSlot) {
  auto m = create_attention("cbam:r=8,kernel=3,max_first=false,mlp_bias=false", 64);
  auto cbam = m.get<CBAM>();
  EXPECT_EQ(cbam->channel->rd_channels, 8);
  EXPECT_EQ(cbam->spatial->conv->weight.sizes(), torch::IntArrayRef({1, 2, 3, 3}));
  EXPECT_FALSE(cbam->options.max_first());
  EXPECT_FALSE(cbam->channel->fc1->bias.defined());
  EXPECT_TRUE(cbam->options.spatial_bn());
  auto def = create_attention("cbam", 64).get<CBAM>();
  EXPECT_EQ(def->channel->rd_channels, 4);
  EXPECT_TRUE(def->options.max_first());
  EXPECT_TRUE(def->options.mlp_bias());
  EXPECT_EQ(def->options.kernel_size(), 7);
  EXPECT_TRUE(create_attention("cbam:spatial_bn=false", 64).get<CBAM>()->spatial->bn.is_empty());
  EXPECT_EQ(create_attention("cbam:rd=6", 64).get<CBAM>()->channel->rd_channels, 6);
  EXPECT_EQ(
      create_attention("cbam:policy=divisible,divisor=8", 64).get<CBAM>()->channel->rd_channels, 8);
}

TEST(CBAM, CloneCopiesNestedGates) {
  CBAM cbam(16);
  randomize(*cbam, 10);
  cbam->eval();
  auto copy = std::dynamic_pointer_cast<CBAMImpl>(cbam->clone());
  ASSERT_TRUE(copy);
  auto x = torch::randn({2, 16, 4, 4});
  EXPECT_TRUE(torch::equal(copy->forward(x), cbam->forward(x)));
  EXPECT_NE(copy->spatial->conv->weight.data_ptr(), cbam->spatial->conv->weight.data_ptr());
}

// The max poolings and the spatial conv take different ATen routes with and without autograd
// and per layout (max with indices, a hand-written conv backward); all must give the same values
// and, away from ties, the same gradients as the plain formula under plain autograd.
TEST(CBAM, EveryRouteAgreesWithThePlainFormula) {
  for (bool spatial_bn : {true, false}) {
    CBAM cbam(CBAMOptions(16).reduction(4).spatial_bn(spatial_bn));
    randomize(*cbam, 18);
    cbam->eval();
    auto& ch = *cbam->channel;
    auto& sp = *cbam->spatial;
    auto plain = [&](const torch::Tensor& x) {  // amax, module convs, ATen's conv backward
      auto mlp = [&](const torch::Tensor& v) { return ch.fc2(ch.fc1(v).relu()); };
      auto refined = x * torch::sigmoid(mlp(x.mean({2, 3}, true)) + mlp(x.amax({2, 3}, true)));
      auto pooled = torch::cat({refined.amax(1, true), refined.mean(1, true)}, 1);
      auto logits = sp.conv->forward(pooled);
      return refined * torch::sigmoid(spatial_bn ? sp.bn(logits) : logits);
    };
    auto x0 = torch::randn({2, 16, 6, 5});
    std::vector<torch::Tensor> params = {sp.conv->weight, ch.fc1->weight, ch.fc2->bias};
    if (!spatial_bn) params.push_back(sp.conv->bias);
    auto x_ref = x0.clone().requires_grad_();
    auto y_ref = plain(x_ref);
    auto g = torch::randn_like(y_ref);
    auto wrt = params;
    wrt.insert(wrt.begin(), x_ref);
    auto grads_ref = torch::autograd::grad({y_ref}, wrt, {g});
    for (auto format : {torch::MemoryFormat::Contiguous, torch::MemoryFormat::ChannelsLast}) {
      auto x = x0.contiguous(format).detach().requires_grad_();
      auto y = cbam->forward(x);
      EXPECT_TRUE(torch::allclose(y, y_ref, 1e-5, 1e-6));
      auto w = params;
      w.insert(w.begin(), x);
      auto grads = torch::autograd::grad({y}, w, {g});
      for (size_t i = 0; i < grads.size(); ++i) {
        EXPECT_TRUE(torch::allclose(grads[i], grads_ref[i], 1e-4, 1e-6))
            << "gradient " << i << " spatial_bn=" << spatial_bn << " max diff "
            << dynattn::test_util::max_abs_diff(grads[i], grads_ref[i]);
      }
      torch::NoGradGuard no_grad;
      EXPECT_TRUE(torch::allclose(cbam->forward(x0.contiguous(format)), y_ref, 1e-5, 1e-6));
    }
  }
}

TEST(CBAM, TiedMaximaRouteTheGradientToTheFirst) {
  // Small integers: many tied maxima in each channel's spatial max. The training form routes the
  // max-pool gradient to the first (max_pool2d's choice, as the official code), in both layouts.
  CBAM cbam(CBAMOptions(16).reduction(4));
  randomize(*cbam, 19);
  cbam->train();
  auto& ch = *cbam->channel;
  auto& sp = *cbam->spatial;
  auto reference = [&](const torch::Tensor& x) {
    auto mlp = [&](const torch::Tensor& v) { return ch.fc2(ch.fc1(v).relu()); };
    const auto top = torch::max_pool2d(x, {x.size(2), x.size(3)});
    auto refined = x * torch::sigmoid(mlp(x.mean({2, 3}, true)) + mlp(top));
    auto pooled = torch::cat({std::get<0>(refined.max(1, true)), refined.mean(1, true)}, 1);
    return refined * torch::sigmoid(sp.bn(sp.conv->forward(pooled)));
  };
  const auto x0 = torch::randint(0, 3, {4, 16, 6, 5}).to(torch::kFloat);
  auto x_ref = x0.clone().requires_grad_();
  const auto y_ref = reference(x_ref);
  const auto g = torch::randn_like(y_ref);
  const auto dx_ref = torch::autograd::grad({y_ref}, {x_ref}, {g})[0];
  for (auto format : {torch::MemoryFormat::Contiguous, torch::MemoryFormat::ChannelsLast}) {
    auto x = x0.contiguous(format).requires_grad_();
    const auto dx = torch::autograd::grad({cbam->forward(x)}, {x}, {g})[0];
    EXPECT_LT(dynattn::test_util::max_abs_diff(dx, dx_ref), 1e-4);
  }
}

TEST(CBAM, PrettyPrintNamesTheSwitches) {
  std::ostringstream s;
  s << *CBAM(CBAMOptions::timm(64));
  EXPECT_THAT(s.str(), HasSubstr("dynattn::CBAM(channels=64, rd_channels=4, kernel=7, "
                                 "max_first=false, mlp_bias=false, spatial_bn=true)"));
}
