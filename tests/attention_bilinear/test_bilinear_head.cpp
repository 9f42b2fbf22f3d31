#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/attention/bilinear_head.h"
#include "gradcheck.h"
#include "test_util.h"

using dynattn::BilinearHead;
using dynattn::BilinearHeadOptions;
using dynattn::create_bilinear_head;
using dynattn::parse_bilinear_head;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

namespace {
std::vector<std::string> keys(const torch::OrderedDict<std::string, torch::Tensor>& d) {
  std::vector<std::string> out;
  for (const auto& kv : d) out.push_back(kv.key());
  return out;
}
}  // namespace

TEST(BilinearHead, SpecsParseIntoOptions) {
  const auto full = parse_bilinear_head("full", 64, 10);
  EXPECT_EQ(full.kind(), "full");
  EXPECT_EQ(full.matrix_sqrt(), 0);
  EXPECT_TRUE(full.average());
  EXPECT_TRUE(full.normalization().signed_sqrt());
  EXPECT_TRUE(full.normalization().l2());
  EXPECT_EQ(full.normalization().sqrt_eps(), 1e-5);
  EXPECT_EQ(parse_bilinear_head("full:matrix_sqrt=5", 64, 10).matrix_sqrt(), 5);
  const auto ts = parse_bilinear_head("tensor_sketch:d=4096,seed=1", 64, 10);
  EXPECT_EQ(ts.kind(), "tensor_sketch");
  EXPECT_EQ(ts.dim(), 4096);
  EXPECT_EQ(ts.seed(), 1);
  EXPECT_EQ(ts.sketch_algorithm(), "auto");
  EXPECT_EQ(parse_bilinear_head("tensor_sketch:algorithm=fft", 64, 10).sketch_algorithm(), "fft");
  const auto rm = parse_bilinear_head(
      "random_maclaurin:d=2048,signed_sqrt=false,l2=0,average=false,sqrt_eps=1e-3,"
      "sqrt_form=reference,dropout=0.25",
      64, 10);
  EXPECT_EQ(rm.kind(), "random_maclaurin");
  EXPECT_EQ(rm.dim(), 2048);
  EXPECT_FALSE(rm.normalization().signed_sqrt());
  EXPECT_FALSE(rm.normalization().l2());
  EXPECT_FALSE(rm.average());
  EXPECT_EQ(rm.normalization().sqrt_eps(), 1e-3);
  EXPECT_EQ(rm.normalization().sqrt_form(), "reference");
  EXPECT_EQ(rm.dropout(), 0.25);
  EXPECT_EQ(
      parse_bilinear_head("full:matrix_sqrt=3,matrix_sqrt_norm=trace", 8, 2).matrix_sqrt_norm(),
      "trace");
}

TEST(BilinearHead, NamesShapesAndFeatureDimensions) {
  const auto x = torch::randn({3, 8, 4, 4});
  auto full = create_bilinear_head("full", 8, 5);
  EXPECT_EQ(full->feature_dim(), 64);
  EXPECT_EQ(full(x).sizes(), torch::IntArrayRef({3, 5}));
  EXPECT_THAT(keys(full->named_parameters()), UnorderedElementsAre("fc.weight", "fc.bias"));
  EXPECT_EQ(full->fc->weight.sizes(), torch::IntArrayRef({5, 64}));
  EXPECT_TRUE(full->named_buffers().is_empty());

  auto ts = create_bilinear_head("tensor_sketch:d=32,seed=2", 8, 5);
  EXPECT_EQ(ts->feature_dim(), 32);
  EXPECT_EQ(ts(x).sizes(), torch::IntArrayRef({3, 5}));
  EXPECT_THAT(keys(ts->named_buffers()),
              UnorderedElementsAre("pool.h1", "pool.s1", "pool.h2", "pool.s2"));
  EXPECT_EQ(ts->tensor_sketch->options.seed(), 2);

  auto rm = create_bilinear_head("random_maclaurin:d=16", 8, 5);
  EXPECT_EQ(rm(x).sizes(), torch::IntArrayRef({3, 5}));
  EXPECT_THAT(keys(rm->named_buffers()), UnorderedElementsAre("pool.w1", "pool.w2"));
  EXPECT_EQ(rm->fc->weight.sizes(), torch::IntArrayRef({5, 16}));
}

TEST(BilinearHead, LogitsAreTheClassifierOfTheFeatures) {
  torch::manual_seed(1);
  const auto x = torch::randn({2, 4, 3, 3});
  for (const char* spec : {"full:matrix_sqrt=5", "tensor_sketch:d=64",
                           "tensor_sketch:d=64,algorithm=fft", "random_maclaurin:d=64"}) {
    auto head = create_bilinear_head(spec, 4, 3);
    const auto f = head->features(x);
    const auto logits = head(x);
    EXPECT_TRUE(
        torch::allclose(logits, torch::addmm(head->fc->bias, f, head->fc->weight.t()), 1e-6, 1e-6))
        << spec;
    EXPECT_TRUE(torch::allclose(f.norm(2, {1}), torch::ones({2}), 1e-6, 1e-6)) << spec;
    const auto result = head->forward_with_maps(x);
    EXPECT_TRUE(torch::equal(result.output, logits)) << spec;
    EXPECT_TRUE(torch::equal(result.maps.at("features"), f)) << spec;
  }
  auto full = create_bilinear_head("full:matrix_sqrt=5", 4, 3);
  const auto maps = full->forward_with_maps(x).maps;
  EXPECT_EQ(maps.at("pool.bilinear").sizes(), torch::IntArrayRef({2, 4, 4}));
  EXPECT_EQ(maps.count("pool.matrix_sqrt"), 1u);
  auto ts = create_bilinear_head("tensor_sketch:d=64", 4, 3);
  EXPECT_EQ(ts->forward_with_maps(x).maps.at("pool.sketch").sizes(), torch::IntArrayRef({2, 64}));
}

TEST(BilinearHead, FullHeadMatchesPoolingPlusLinear) {
  torch::manual_seed(2);
  const auto x = torch::randn({2, 3, 2, 2});
  auto head = create_bilinear_head("full:average=false,l2=false", 3, 4);
  dynattn::BilinearPooling pool(dynattn::BilinearPoolingOptions(3).average(false).normalization(
      dynattn::BilinearNormalization().l2(false)));
  EXPECT_TRUE(torch::allclose(head(x), head->fc(pool(x)), 1e-6, 1e-6));
}

TEST(BilinearHead, DropoutOnlyInTraining) {
  torch::manual_seed(3);
  const auto x = torch::randn({4, 4, 3, 3});
  auto head = create_bilinear_head("full:dropout=0.5", 4, 3);
  EXPECT_FALSE(head->dropout.is_empty());
  head->eval();
  const auto eval_out = head(x);
  EXPECT_TRUE(torch::allclose(eval_out, head->fc(head->features(x))));
  head->train();
  EXPECT_FALSE(torch::allclose(head(x), eval_out));
  EXPECT_TRUE(create_bilinear_head("full", 4, 3)->dropout.is_empty());
}

TEST(BilinearHead, CloneKeepsSketchesAndWeights) {
  auto head = create_bilinear_head("tensor_sketch:d=32,seed=5", 4, 3);
  auto copy = std::dynamic_pointer_cast<dynattn::BilinearHeadImpl>(head->clone());
  const auto x = torch::randn({2, 4, 3, 3});
  EXPECT_TRUE(torch::equal(copy->forward(x), head(x)));
}

TEST(BilinearHead, Gradcheck) {
  torch::manual_seed(4);
  const auto x = torch::randn({2, 3, 2, 2}, torch::kDouble).requires_grad_();
  for (const char* spec :
       {"full", "full:matrix_sqrt=3", "tensor_sketch:d=12", "random_maclaurin:d=12"}) {
    auto head = create_bilinear_head(spec, 3, 2);
    head->to(torch::kDouble);
    SCOPED_TRACE(spec);
    EXPECT_GRADCHECK([&] { return head(x); }, dynattn::test_util::with_parameters({x}, *head));
  }
}

TEST(BilinearHead, Errors) {
  EXPECT_THAT(error_of([] { create_bilinear_head("fancy", 8, 2); }),
              HasSubstr("bilinear head: unknown kind 'fancy' in 'fancy' (known: full, "
                        "tensor_sketch, random_maclaurin)"));
  EXPECT_THAT(error_of([] { create_bilinear_head("full:d=64", 8, 2); }),
              HasSubstr("bilinear head full: unknown option 'd'"));
  EXPECT_THAT(error_of([] { create_bilinear_head("tensor_sketch:matrix_sqrt=5", 8, 2); }),
              HasSubstr("bilinear head tensor_sketch: unknown option 'matrix_sqrt'"));
  EXPECT_THAT(error_of([] { create_bilinear_head("random_maclaurin:algorithm=fft", 8, 2); }),
              HasSubstr("bilinear head random_maclaurin: unknown option 'algorithm'"));
  EXPECT_THAT(error_of([] { BilinearHead(BilinearHeadOptions(8, 2).sketch_algorithm("fft")); }),
              HasSubstr("BilinearHead: sketch_algorithm applies to kind 'tensor_sketch' only"));
  EXPECT_THAT(error_of([] { create_bilinear_head("tensor_sketch:d=0", 8, 2); }),
              HasSubstr("TensorSketchPooling: the output dimension d must be positive, got 0"));
  EXPECT_THAT(error_of([] { create_bilinear_head("random_maclaurin:d=many", 8, 2); }),
              HasSubstr("option 'd' expects an integer, got 'many'"));
  EXPECT_THAT(error_of([] { create_bilinear_head("full:dropout=1", 8, 2); }),
              HasSubstr("BilinearHead: dropout must be in [0, 1), got 1"));
  EXPECT_THAT(error_of([] { BilinearHead(BilinearHeadOptions(8, 2).kind("avg")); }),
              HasSubstr("BilinearHead: unknown kind 'avg'"));
  EXPECT_THAT(error_of([] {
                BilinearHead(BilinearHeadOptions(8, 2).kind("random_maclaurin").matrix_sqrt(2));
              }),
              HasSubstr("matrix_sqrt applies to kind 'full' only"));
  EXPECT_THAT(error_of([] { BilinearHead(BilinearHeadOptions(8, 0)); }),
              HasSubstr("BilinearHead: channels and num_classes must be positive"));
  auto head = create_bilinear_head("full", 8, 2);
  EXPECT_THAT(error_of([&] {
                head(torch::zeros({2, 8}));
              }),
              HasSubstr("BilinearHead: expected a 4-D input [N,C,H,W] with C=8, got [2, 8]"));
  EXPECT_THAT(error_of([&] {
                head(torch::zeros({2, 4, 3, 3}));
              }),
              HasSubstr("with C=8, got [2, 4, 3, 3]"));
}
