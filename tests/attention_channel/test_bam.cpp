#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "channel_test_util.h"
#include "dynattn/attention/bam.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using dynattn::test_util::randomize;
using ::testing::HasSubstr;

namespace {
void set(torch::nn::Module& m, const std::string& name, const torch::Tensor& value) {
  torch::NoGradGuard no_grad;
  auto params = m.named_parameters();
  auto* p = params.find(name);
  if (p == nullptr) {
    auto buffers = m.named_buffers();
    p = buffers.find(name);
    ASSERT_NE(p, nullptr) << name;
    p->copy_(value.view(p->sizes()));
    return;
  }
  p->copy_(value.view(p->sizes()));
}

// C = 2, rd = 1 on a 1x1 map, eval mode with unit BN statistics (var + eps = 1). Off-centre taps
// of the dilated convs are non-zero but read only zero padding on a 1x1 map.
BAM tiny_bam(bool product) {
  BAM bam(BAMOptions(2).reduction(2).product(product));
  randomize(*bam, 11);
  for (const char* bn :
       {"channel_att.gate_c.gate_c_bn_1", "spatial_att.gate_s.gate_s_bn_reduce0",
        "spatial_att.gate_s.gate_s_bn_di_0", "spatial_att.gate_s.gate_s_bn_di_1"}) {
    const std::string b(bn);
    set(*bam, b + ".weight", torch::ones({1}));
    set(*bam, b + ".bias", torch::zeros({1}));
    set(*bam, b + ".running_mean", torch::zeros({1}));
    set(*bam, b + ".running_var", torch::full({1}, 1.0 - 1e-5));
  }
  // M_c: fc_0 (1, -1) -> 1 - 3 = -2 -> ReLU 0 -> fc_final bias (0.5, -0.5).
  set(*bam, "channel_att.gate_c.gate_c_fc_0.weight", torch::tensor({1.f, -1.f}));
  set(*bam, "channel_att.gate_c.gate_c_fc_0.bias", torch::zeros({1}));
  set(*bam, "channel_att.gate_c.gate_c_fc_final.bias", torch::tensor({0.5f, -0.5f}));
  // M_s: reduce 1 + 3 - 1 = 3 -> x2 (centre tap) = 6 -> x0.5 = 3 -> final 3 - 1 = 2.
  set(*bam, "spatial_att.gate_s.gate_s_conv_reduce0.weight", torch::tensor({1.f, 1.f}));
  set(*bam, "spatial_att.gate_s.gate_s_conv_reduce0.bias", torch::full({1}, -1.0));
  auto di0 = bam->named_parameters()["spatial_att.gate_s.gate_s_conv_di_0.weight"].detach().clone();
  di0[0][0][1][1] = 2.0;
  set(*bam, "spatial_att.gate_s.gate_s_conv_di_0.weight", di0);
  set(*bam, "spatial_att.gate_s.gate_s_conv_di_0.bias", torch::zeros({1}));
  auto di1 = bam->named_parameters()["spatial_att.gate_s.gate_s_conv_di_1.weight"].detach().clone();
  di1[0][0][1][1] = 0.5;
  set(*bam, "spatial_att.gate_s.gate_s_conv_di_1.weight", di1);
  set(*bam, "spatial_att.gate_s.gate_s_conv_di_1.bias", torch::zeros({1}));
  set(*bam, "spatial_att.gate_s.gate_s_conv_final.weight", torch::ones({1}));
  set(*bam, "spatial_att.gate_s.gate_s_conv_final.bias", torch::full({1}, -1.0));
  bam->eval();
  return bam;
}
}  // namespace

TEST(BAM, HandCheckedSumAndProduct) {
  auto x = torch::tensor({1.f, 3.f}).view({1, 2, 1, 1});
  auto sum = tiny_bam(false)->forward_with_maps(x);
  EXPECT_TRUE(torch::allclose(sum.maps.at("channel"),
                              torch::tensor({0.5f, -0.5f}).view({1, 2, 1, 1}), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(sum.maps.at("spatial"), torch::full({1, 1, 1, 1}, 2.f), 1e-5, 1e-6));
  // Paper: 1 + sigmoid(M_c + M_s) = 1 + sigmoid(2.5, 1.5).
  EXPECT_TRUE(torch::allclose(sum.maps.at("attention"),
                              torch::tensor({1.92414188f, 1.81757450f}).view({1, 2, 1, 1}), 1e-5,
                              1e-6));
  EXPECT_TRUE(torch::allclose(
      sum.output, torch::tensor({1.92414188f, 5.45272350f}).view({1, 2, 1, 1}), 1e-5, 1e-6));
  // Official code: 1 + sigmoid(M_c * M_s) = 1 + sigmoid(1, -1).
  auto product = tiny_bam(true)->forward_with_maps(x);
  EXPECT_TRUE(torch::allclose(product.maps.at("attention"),
                              torch::tensor({1.73105860f, 1.26894140f}).view({1, 2, 1, 1}), 1e-5,
                              1e-6));
  EXPECT_TRUE(torch::allclose(
      product.output, torch::tensor({1.73105860f, 3.80682421f}).view({1, 2, 1, 1}), 1e-5, 1e-6));
}

TEST(BAM, ProductSwitchChangesOnlyHowTheMapsCombine) {
  BAM sum(BAMOptions(16).reduction(4));
  randomize(*sum, 12);
  BAM product(BAMOptions(16).reduction(4).product(true));
  {
    torch::NoGradGuard no_grad;
    auto src = sum->named_parameters();
    for (auto& p : product->named_parameters()) p.value().copy_(src[p.key()]);
    auto bufs = sum->named_buffers();
    for (auto& b : product->named_buffers()) b.value().copy_(bufs[b.key()]);
  }
  sum->eval();
  product->eval();
  auto x = torch::randn({2, 16, 6, 6});
  auto a = sum->forward_with_maps(x), b = product->forward_with_maps(x);
  EXPECT_TRUE(torch::equal(a.maps.at("channel"), b.maps.at("channel")));
  EXPECT_TRUE(torch::equal(a.maps.at("spatial"), b.maps.at("spatial")));
  const auto& mc = a.maps.at("channel");
  const auto& ms = a.maps.at("spatial");
  ASSERT_EQ(mc.sizes(), torch::IntArrayRef({2, 16, 1, 1}));
  ASSERT_EQ(ms.sizes(), torch::IntArrayRef({2, 1, 6, 6}));
  EXPECT_TRUE(torch::allclose(a.maps.at("attention"), 1 + torch::sigmoid(mc + ms), 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(b.maps.at("attention"), 1 + torch::sigmoid(mc * ms), 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(a.output, a.maps.at("attention") * x, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(b.output, b.maps.at("attention") * x, 1e-6, 1e-6));
  EXPECT_GT(dynattn::test_util::max_abs_diff(a.output, b.output), 1e-3);
  // forward() computes the combine in one fused node (autograd is on here): same maths, its own
  // rounding.
  EXPECT_TRUE(torch::allclose(sum->forward(x), a.output, 1e-6, 1e-6));
}

TEST(BAM, GatesMatchAFunctionalRederivation) {
  BAM bam(BAMOptions(16).reduction(4).dilation(2));
  randomize(*bam, 13);
  bam->eval();
  auto x = torch::randn({2, 16, 7, 5});
  auto r = bam->forward_with_maps(x);
  auto p = bam->named_parameters();
  auto b = bam->named_buffers();
  auto bn = [&](const torch::Tensor& v, const std::string& name) {
    return torch::batch_norm(v, p[name + ".weight"], p[name + ".bias"], b[name + ".running_mean"],
                             b[name + ".running_var"], false, 0.1, 1e-5, false);
  };
  const std::string c = "channel_att.gate_c.", s = "spatial_att.gate_s.";
  auto h = torch::linear(x.mean({2, 3}), p[c + "gate_c_fc_0.weight"], p[c + "gate_c_fc_0.bias"]);
  auto mc = torch::linear(bn(h, c + "gate_c_bn_1").relu(), p[c + "gate_c_fc_final.weight"],
                          p[c + "gate_c_fc_final.bias"]);
  EXPECT_TRUE(torch::allclose(r.maps.at("channel"), mc.view({2, 16, 1, 1}), 1e-5, 1e-6));
  auto conv = [&](const torch::Tensor& v, const std::string& name, int64_t pad, int64_t dil) {
    return torch::conv2d(v, p[s + name + ".weight"], p[s + name + ".bias"], 1, pad, dil);
  };
  auto y = bn(conv(x, "gate_s_conv_reduce0", 0, 1), s + "gate_s_bn_reduce0").relu();
  y = bn(conv(y, "gate_s_conv_di_0", 2, 2), s + "gate_s_bn_di_0").relu();
  y = bn(conv(y, "gate_s_conv_di_1", 2, 2), s + "gate_s_bn_di_1").relu();
  EXPECT_TRUE(
      torch::allclose(r.maps.at("spatial"), conv(y, "gate_s_conv_final", 0, 1), 1e-5, 1e-6));
}

TEST(BAM, ParameterNamesAreTheOfficialOnes) {
  BAM bam(64);  // rd = 4
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"channel_att.gate_c.gate_c_fc_0.weight", {4, 64}},
      {"channel_att.gate_c.gate_c_fc_0.bias", {4}},
      {"channel_att.gate_c.gate_c_bn_1.weight", {4}},
      {"channel_att.gate_c.gate_c_bn_1.bias", {4}},
      {"channel_att.gate_c.gate_c_fc_final.weight", {64, 4}},
      {"channel_att.gate_c.gate_c_fc_final.bias", {64}},
      {"spatial_att.gate_s.gate_s_conv_reduce0.weight", {4, 64, 1, 1}},
      {"spatial_att.gate_s.gate_s_conv_reduce0.bias", {4}},
      {"spatial_att.gate_s.gate_s_bn_reduce0.weight", {4}},
      {"spatial_att.gate_s.gate_s_bn_reduce0.bias", {4}},
      {"spatial_att.gate_s.gate_s_conv_di_0.weight", {4, 4, 3, 3}},
      {"spatial_att.gate_s.gate_s_conv_di_0.bias", {4}},
      {"spatial_att.gate_s.gate_s_bn_di_0.weight", {4}},
      {"spatial_att.gate_s.gate_s_bn_di_0.bias", {4}},
      {"spatial_att.gate_s.gate_s_conv_di_1.weight", {4, 4, 3, 3}},
      {"spatial_att.gate_s.gate_s_conv_di_1.bias", {4}},
      {"spatial_att.gate_s.gate_s_bn_di_1.weight", {4}},
      {"spatial_att.gate_s.gate_s_bn_di_1.bias", {4}},
      {"spatial_att.gate_s.gate_s_conv_final.weight", {1, 4, 1, 1}},
      {"spatial_att.gate_s.gate_s_conv_final.bias", {1}},
  };
  auto params = bam->named_parameters();
  ASSERT_EQ(params.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(params[i].key(), expected[i].first);
    EXPECT_EQ(params[i].value().sizes(), torch::IntArrayRef(expected[i].second))
        << expected[i].first;
  }
  EXPECT_EQ(bam->named_buffers().size(), 4u * 3);  // 4 BNs: mean, var, num_batches_tracked
  auto di = bam->spatial_att->gate_s->ptr(3)->as<torch::nn::Conv2d>();
  ASSERT_NE(di, nullptr);
  EXPECT_EQ(di->options.dilation()->at(0), 4);
}

TEST(BAM, OfficialInit) {
  BAM bam(32);
  for (auto& p : bam->named_parameters()) {
    const auto& name = p.key();
    if (name.find(".bias") != std::string::npos) {
      EXPECT_TRUE(torch::equal(p.value(), torch::zeros_like(p.value()))) << name;
    } else if (name.find("_bn_") != std::string::npos) {
      EXPECT_TRUE(torch::equal(p.value(), torch::ones_like(p.value()))) << name;
    }
  }
  // Kaiming normal, fan_out: std sqrt(2 / (out * k * k)) for the dilated convs (rd = 2).
  auto w = bam->named_parameters()["spatial_att.gate_s.gate_s_conv_di_0.weight"];
  EXPECT_GT(w.abs().max().item<float>(), 0.f);
}

TEST(BAM, BatchNormTrainAndEvalModes) {
  BAM bam(BAMOptions(8).reduction(2));
  randomize(*bam, 14);
  auto x = torch::randn({4, 8, 5, 5});
  auto bn = bam->channel_att->gate_c->ptr(1)->as<torch::nn::BatchNorm1d>();
  ASSERT_NE(bn, nullptr);
  const auto mean0 = bn->running_mean.clone();
  bam->eval();
  auto eval_out = bam->forward(x);
  EXPECT_TRUE(torch::equal(bn->running_mean, mean0));
  bam->train();
  auto train_out = bam->forward(x);
  // Default PyTorch momentum 0.1 (the official BAM does not change it).
  auto h =
      bam->channel_att->gate_c->ptr(0)->as<torch::nn::Linear>()->forward(x.mean({2, 3})).detach();
  EXPECT_TRUE(torch::allclose(bn->running_mean, 0.9 * mean0 + 0.1 * h.mean(0), 1e-5, 1e-6));
  EXPECT_GT(dynattn::test_util::max_abs_diff(train_out, eval_out), 1e-3);
  // Batch 1 is fine in eval mode, and refused with a clear message in train mode.
  bam->eval();
  EXPECT_EQ(bam->forward(x.narrow(0, 0, 1)).sizes(), torch::IntArrayRef({1, 8, 5, 5}));
  bam->train();
  EXPECT_THAT(error_of([&] { bam->forward(x.narrow(0, 0, 1)); }),
              HasSubstr("BAM: the channel gate's BatchNorm1d needs a batch of at least 2 in "
                        "training mode"));
}

TEST(BAM, GradcheckDouble) {
  for (bool product : {false, true}) {
    for (bool training : {true, false}) {
      BAM bam(BAMOptions(8).reduction(2).dilation(2).product(product));
      bam->to(torch::kDouble);
      randomize(*bam, 15);
      bam->train(training);
      auto x = torch::randn({3, 8, 5, 4}, torch::kDouble).requires_grad_();
      EXPECT_GRADCHECK([&] { return bam->forward(x); },
                       dynattn::test_util::with_parameters({x}, *bam));
    }
  }
}

TEST(BAM, ChannelsLastGivesTheSameOutput) {
  BAM bam(32);
  randomize(*bam, 16);
  bam->eval();
  auto x = torch::randn({2, 32, 14, 14});
  EXPECT_TRUE(torch::allclose(bam->forward(x.contiguous(torch::MemoryFormat::ChannelsLast)),
                              bam->forward(x), 1e-5, 1e-5));
}

TEST(BAM, Macs) {
  BAM bam(64);  // rd = 4
  bam->eval();
  auto x = torch::randn({1, 64, 7, 7});
  const int64_t hw = 49, c = 64, rd = 4;
  const int64_t channel = c * rd + rd * c;
  const int64_t spatial = hw * c * rd + 2 * hw * rd * rd * 9 + hw * rd;
  EXPECT_EQ(count_macs([&] { bam->forward(x); }).macs, channel + spatial);
}

TEST(BAM, RejectsBadInputAndOptions) {
  BAM bam(16);
  EXPECT_THAT(error_of([&] {
                bam->forward(torch::zeros({2, 32, 4, 4}));
              }),
              HasSubstr("BAM: expected a 4-D input [N,C,H,W] with C=16, got [2, 32, 4, 4]"));
  EXPECT_THAT(error_of([&] {
                bam->forward(torch::zeros({2, 16, 4, 4}, torch::kInt));
              }),
              HasSubstr("BAM: expected a floating-point input"));
  EXPECT_THAT(error_of([] { create_attention("bam:dilation=0", 64); }),
              HasSubstr("BAM: dilation must be positive, got 0"));
  EXPECT_THAT(error_of([] { create_attention("bam:r=0", 64); }),
              HasSubstr("BAM: reduction ratio r must be positive"));
  EXPECT_THAT(error_of([] { create_attention("bam:kernel=3", 64); }),
              HasSubstr("unknown option 'kernel' (known: r, rd, policy, divisor, dilation, "
                        "product)"));
}

TEST(BAM, AttentionSlot) {
  auto bam = create_attention("bam", 64).get<BAM>();
  EXPECT_EQ(bam->channel_att->rd_channels, 4);
  EXPECT_EQ(bam->spatial_att->rd_channels, 4);
  EXPECT_FALSE(bam->options.product());
  EXPECT_EQ(bam->options.dilation(), 4);
  auto official = create_attention("bam:product=true,r=8,dilation=2", 64).get<BAM>();
  EXPECT_TRUE(official->options.product());
  EXPECT_EQ(official->channel_att->rd_channels, 8);
  EXPECT_EQ(official->options.dilation(), 2);
  EXPECT_EQ(create_attention("bam:rd=5", 64).get<BAM>()->spatial_att->rd_channels, 5);
}

TEST(BAM, CloneCopiesTheSequentials) {
  BAM bam(16);
  randomize(*bam, 17);
  bam->eval();
  auto copy = std::dynamic_pointer_cast<BAMImpl>(bam->clone());
  ASSERT_TRUE(copy);
  auto x = torch::randn({2, 16, 6, 6});
  EXPECT_TRUE(torch::equal(copy->forward(x), bam->forward(x)));
  EXPECT_NE(copy->named_parameters()[0].value().data_ptr(),
            bam->named_parameters()[0].value().data_ptr());
  // The official names survive (torch::nn::Sequential's own clone numbers the layers).
  EXPECT_EQ(copy->named_parameters().keys(), bam->named_parameters().keys());
  EXPECT_EQ(copy->named_buffers().keys(), bam->named_buffers().keys());
  auto gate = std::dynamic_pointer_cast<BAMSpatialGateImpl>(bam->spatial_att->clone());
  ASSERT_TRUE(gate);
  EXPECT_EQ(gate->named_parameters().keys(), bam->spatial_att->named_parameters().keys());
  EXPECT_FALSE(gate->is_training());
}

namespace {
// The spatial branch on the lane kernels (float) against the ATen form in double, from the same
// parameters and statistics: M_s, the gradients of x and of every parameter, and the running
// statistics BN leaves behind.
void expect_spatial_branch_matches_aten(BAMOptions options, int64_t n, int64_t h, int64_t w,
                                        bool training, bool channels_last, uint64_t seed) {
  BAMSpatialGate gate(options);
  randomize(*gate, seed);
  auto ref = std::dynamic_pointer_cast<BAMSpatialGateImpl>(gate->clone());
  ref->to(torch::kDouble);
  gate->train(training);
  ref->train(training);
  auto x = torch::randn({n, options.channels(), h, w}) * 2.0;
  if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  x.requires_grad_();
  auto xd = x.detach().to(torch::kDouble).requires_grad_();
  ASSERT_TRUE(bam_spatial_branch_applicable(x, gate->layers()));
  ASSERT_FALSE(bam_spatial_branch_applicable(xd, ref->layers()));  // double: the ATen form

  auto ms = gate->forward(x);
  auto ms_ref = ref->forward(xd);
  ASSERT_EQ(ms.sizes(), ms_ref.sizes());
  EXPECT_LT(dynattn::test_util::max_rel(ms, ms_ref), 2e-5);
  const auto dy = torch::randn_like(ms_ref);
  ms.backward(dy.to(torch::kFloat));
  ms_ref.backward(dy);
  EXPECT_LT(dynattn::test_util::max_rel(x.grad(), xd.grad()), 5e-5);
  auto params = gate->named_parameters();
  for (const auto& p : ref->named_parameters()) {
    ASSERT_TRUE(params[p.key()].grad().defined()) << p.key();
    EXPECT_LT(dynattn::test_util::max_rel(params[p.key()].grad(), p.value().grad()), 5e-5)
        << p.key();
  }
  auto buffers = gate->named_buffers();
  for (const auto& b : ref->named_buffers()) {
    if (b.value().scalar_type() == torch::kLong) {
      EXPECT_TRUE(torch::equal(buffers[b.key()], b.value())) << b.key();
    } else {
      EXPECT_LT(dynattn::test_util::max_rel(buffers[b.key()], b.value()), 2e-5) << b.key();
    }
  }
}
}  // namespace

TEST(BAMSpatialBranch, TrainingEqualsTheDoubleAtenForm) {
  // Batches that are and are not a multiple of the kernels' 16 lanes, widths that are and are not
  // a multiple of their 4-channel blocks, dilations that skip taps and ones beyond the map.
  expect_spatial_branch_matches_aten(
      BAMOptions(32).rd_channels(3).reduction_policy("explicit").dilation(2), 3, 5, 7, true, false,
      21);
  expect_spatial_branch_matches_aten(BAMOptions(16), 17, 7, 7, true, true, 22);  // rd 1
  expect_spatial_branch_matches_aten(
      BAMOptions(64).rd_channels(5).reduction_policy("explicit").dilation(1), 5, 6, 4, true, false,
      23);
  expect_spatial_branch_matches_aten(BAMOptions(64), 20, 7, 7, true, true, 24);  // rd 4, d 4
  expect_spatial_branch_matches_aten(
      BAMOptions(8).rd_channels(2).reduction_policy("explicit").dilation(9), 2, 4, 3, true, false,
      25);
}

TEST(BAMSpatialBranch, EvalEqualsTheDoubleAtenForm) {
  // Eval mode under autograd (a frozen-statistics fine-tune) and without it.
  expect_spatial_branch_matches_aten(BAMOptions(32), 4, 9, 9, false, false, 26);
  expect_spatial_branch_matches_aten(BAMOptions(64).rd_channels(6).reduction_policy("explicit"), 18,
                                     7, 5, false, true, 27);
  BAMSpatialGate gate(BAMOptions(32).dilation(2));
  randomize(*gate, 28);
  gate->eval();
  auto ref = std::dynamic_pointer_cast<BAMSpatialGateImpl>(gate->clone());
  ref->to(torch::kDouble);
  const auto x = torch::randn({3, 32, 6, 6});
  torch::NoGradGuard no_grad;
  EXPECT_LT(dynattn::test_util::max_rel(gate->forward(x), ref->forward(x.to(torch::kDouble))),
            2e-5);
}

TEST(BAMSpatialBranch, LayersWithoutBiasOrAffineBatchNorm) {
  const int64_t c = 12, rd = 3, d = 2;
  auto conv = [](int64_t in, int64_t out, int64_t k, int64_t dil) {
    return torch::nn::Conv2d(
        torch::nn::Conv2dOptions(in, out, k).padding(dil * (k / 2)).dilation(dil).bias(false));
  };
  auto bn = [] { return torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(rd).affine(false)); };
  torch::nn::Sequential seq(conv(c, rd, 1, 1), bn(), torch::nn::ReLU(), conv(rd, rd, 3, d), bn(),
                            torch::nn::ReLU(), conv(rd, rd, 3, d), bn(), torch::nn::ReLU(),
                            conv(rd, 1, 1, 1));
  randomize(*seq, 29);
  auto ref = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(seq->clone());
  ref->to(torch::kDouble);
  BamSpatialLayers layers;
  layers.reduce = seq->ptr(0)->as<torch::nn::Conv2d>();
  layers.reduce_bn = seq->ptr(1)->as<torch::nn::BatchNorm2d>();
  layers.dilated[0] = seq->ptr(3)->as<torch::nn::Conv2d>();
  layers.dilated_bn[0] = seq->ptr(4)->as<torch::nn::BatchNorm2d>();
  layers.dilated[1] = seq->ptr(6)->as<torch::nn::Conv2d>();
  layers.dilated_bn[1] = seq->ptr(7)->as<torch::nn::BatchNorm2d>();
  layers.final_conv = seq->ptr(9)->as<torch::nn::Conv2d>();
  auto x = torch::randn({4, c, 5, 5}).requires_grad_();
  auto xd = x.detach().to(torch::kDouble).requires_grad_();
  auto ms = bam_spatial_branch(x, layers);
  auto ms_ref = ref->forward(xd);
  EXPECT_LT(dynattn::test_util::max_rel(ms, ms_ref), 2e-5);
  ms.sum().backward();
  ms_ref.sum().backward();
  EXPECT_LT(dynattn::test_util::max_rel(x.grad(), xd.grad()), 5e-5);
  auto params = seq->named_parameters();
  for (const auto& p : ref->named_parameters())
    EXPECT_LT(dynattn::test_util::max_rel(params[p.key()].grad(), p.value().grad()), 5e-5)
        << p.key();
}

TEST(BAMSpatialBranch, OtherLayerShapesKeepTheAtenForm) {
  BAMSpatialGate gate(BAMOptions(16).dilation(2));
  const auto x = torch::randn({2, 16, 6, 6});
  EXPECT_TRUE(bam_spatial_branch_applicable(x, gate->layers()));
  EXPECT_FALSE(bam_spatial_branch_applicable(x.to(torch::kDouble), gate->layers()));
  EXPECT_FALSE(bam_spatial_branch_applicable(torch::randn({2, 8, 6, 6}), gate->layers()));
  EXPECT_FALSE(bam_spatial_branch_applicable(x.transpose(2, 3), gate->layers()));
  // A padding that is not the dilation (no longer a "same" convolution): the ATen form runs.
  auto* di = gate->layers().dilated[1];
  di->options.padding(1);
  EXPECT_FALSE(bam_spatial_branch_applicable(x, gate->layers()));
  EXPECT_EQ(gate->forward(x).sizes(), torch::IntArrayRef({2, 1, 4, 4}));
  EXPECT_THAT(error_of([&] { bam_spatial_branch(x, gate->layers()); }),
              HasSubstr("bam_spatial_branch: expected a CPU float32 [N,C,H,W] input"));
  // Training BN with one value per channel is refused, as ATen's BatchNorm does.
  BAMSpatialGate one(BAMOptions(16));
  EXPECT_THAT(error_of([&] {
                one->forward(torch::randn({1, 16, 1, 1}));
              }),
              HasSubstr("more than one value per channel"));
}

TEST(BAMSpatialBranch, WholeModuleTrainingEqualsTheDoubleAtenForm) {
  // BAM::forward in training: the channel gate's modules, then the spatial branch and the
  // combine as one node (bam_spatial_branch_combine); against the same module in double (ATen).
  struct Case {
    BAMOptions options;
    int64_t n, h, w;
    bool channels_last, product, training;
  };
  const Case cases[] = {
      {BAMOptions(32).dilation(2), 3, 6, 5, false, false, true},
      {BAMOptions(64), 18, 7, 7, true, false, true},
      {BAMOptions(16).product(true), 5, 4, 9, false, true, true},
      {BAMOptions(32).rd_channels(3).reduction_policy("explicit"), 4, 5, 5, true, true, false}};
  uint64_t seed = 40;
  for (const auto& t : cases) {
    BAM bam(t.options);
    randomize(*bam, ++seed);
    auto ref = std::dynamic_pointer_cast<BAMImpl>(bam->clone());
    ref->to(torch::kDouble);
    bam->train(t.training);
    ref->train(t.training);
    auto x = torch::randn({t.n, t.options.channels(), t.h, t.w});
    if (t.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    x.requires_grad_();
    auto xd = x.detach().to(torch::kDouble).requires_grad_();
    auto y = bam->forward(x);
    auto y_ref = ref->forward(xd);
    EXPECT_LT(dynattn::test_util::max_rel(y, y_ref), 2e-5) << seed;
    EXPECT_EQ(y.is_contiguous(), x.is_contiguous()) << seed;
    const auto dy = torch::randn_like(y_ref);
    y.backward(dy.to(torch::kFloat));
    y_ref.backward(dy);
    EXPECT_LT(dynattn::test_util::max_rel(x.grad(), xd.grad()), 5e-5) << seed;
    auto params = bam->named_parameters();
    for (const auto& p : ref->named_parameters())
      EXPECT_LT(dynattn::test_util::max_rel(params[p.key()].grad(), p.value().grad()), 5e-5)
          << p.key() << " " << seed;
    auto buffers = bam->named_buffers();
    for (const auto& b : ref->named_buffers())
      EXPECT_LT(dynattn::test_util::max_rel(buffers[b.key()], b.value()), 2e-5)
          << b.key() << " " << seed;
  }
}
