#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "dynattn/attention/bilinear_pooling.h"
#include "dynattn/attention/compact_bilinear_pooling.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "test_util.h"

using dynattn::BilinearNormalization;
using dynattn::BilinearPooling;
using dynattn::BilinearPoolingOptions;
using dynattn::CompactBilinearOptions;
using dynattn::RandomMaclaurinPooling;
using dynattn::TensorSketchPooling;
using dynattn::test_util::error_of;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

namespace {

BilinearNormalization no_normalization() {
  return BilinearNormalization().signed_sqrt(false).l2(false);
}

CompactBilinearOptions raw(int64_t c, int64_t d, int64_t seed = 0) {
  return CompactBilinearOptions(c, d).seed(seed).normalization(no_normalization());
}

// The pooled compact feature of x [1,C,H,W] without normalisation, in double.
torch::Tensor compact_feature(bool tensor_sketch, const torch::Tensor& x, int64_t d, int64_t seed) {
  const auto o = raw(x.size(1), d, seed);
  if (tensor_sketch) {
    TensorSketchPooling m(o);
    m->to(torch::kDouble);
    return m(x);
  }
  RandomMaclaurinPooling m(o);
  m->to(torch::kDouble);
  return m(x);
}

double scalar_product(const torch::Tensor& a, const torch::Tensor& b) {
  return (a * b).sum().item<double>();
}

// <f(x), f(y)> with one module (one draw of the projections) for both.
double sketched_product(bool tensor_sketch, const torch::Tensor& x, const torch::Tensor& y,
                        int64_t d, int64_t seed) {
  const auto f = compact_feature(tensor_sketch, torch::cat({x, y}), d, seed);
  return scalar_product(f[0], f[1]);
}

// Correlated vectors as [1,C,1,1] (one location), so <x,y>^2 is comparable to |x|^2 |y|^2 and
// the relative error of the estimate is O(1/sqrt(d)).
std::pair<torch::Tensor, torch::Tensor> correlated_pair(int64_t c, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto x = torch::randn({1, c, 1, 1}, gen, opts);
  const auto y = x + 0.5 * torch::randn({1, c, 1, 1}, gen, opts);
  return {x, y};
}

}  // namespace

// ---- the fixed random draws ----

TEST(CompactBilinearDraws, PinnedValuesOfPortableGenerator) {
  // From an independent implementation of MT19937-64 (checked against the standard's 10000th
  // output, 9981545732273789042) with h = r mod d and s = +1 iff the top bit of r is set.
  const auto draws = dynattn::draw_count_sketches(4, 4, 2048, 0);
  EXPECT_THAT(draws.h1, ElementsAre(1086, 395, 185, 1262));
  EXPECT_THAT(draws.s1, ElementsAre(1, -1, 1, -1));
  EXPECT_THAT(draws.h2, ElementsAre(870, 537, 1299, 1784));
  EXPECT_THAT(draws.s2, ElementsAre(1, -1, -1, -1));
  // Random Maclaurin: one bit per entry, most significant first; 65 entries of w1 [13, 5] span
  // two draws, and w2 continues in the second one.
  const auto w = dynattn::draw_rademacher(5, 5, 13, 7);
  auto signs = [](const std::vector<float>& v) {
    std::string out;
    for (float x : v) out += x > 0 ? '+' : '-';
    return out;
  };
  EXPECT_EQ(signs(w.first), "++-----+---+++++-++--+-+--++---++++-+-++-++--++-++-++--++-+--++++");
  EXPECT_EQ(signs(w.second), "+++--++-----+-+-++--+++-+-+-+---++++-+---++-+--++-----+-++---+---");
}

TEST(CompactBilinearDraws, SameSeedSameSketchesAndBuffersInRange) {
  TensorSketchPooling a(CompactBilinearOptions(64, 512).seed(3));
  TensorSketchPooling b(CompactBilinearOptions(64, 512).seed(3));
  TensorSketchPooling c(CompactBilinearOptions(64, 512).seed(4));
  for (const char* name : {"h1", "s1", "h2", "s2"}) {
    EXPECT_TRUE(torch::equal(a->named_buffers()[name], b->named_buffers()[name])) << name;
    EXPECT_FALSE(torch::equal(a->named_buffers()[name], c->named_buffers()[name])) << name;
  }
  EXPECT_EQ(a->h1.scalar_type(), torch::kLong);
  EXPECT_GE(a->h1.min().item<int64_t>(), 0);
  EXPECT_LT(a->h1.max().item<int64_t>(), 512);
  EXPECT_TRUE(torch::equal(a->s1.abs(), torch::ones({64})));
  // The two sketches are drawn independently.
  EXPECT_FALSE(torch::equal(a->h1, a->h2));
  RandomMaclaurinPooling r1(CompactBilinearOptions(8, 300).seed(3));
  RandomMaclaurinPooling r2(CompactBilinearOptions(8, 300).seed(3));
  EXPECT_TRUE(torch::equal(r1->w1, r2->w1));
  EXPECT_TRUE(torch::equal(r1->w2, r2->w2));
  EXPECT_FALSE(torch::equal(r1->w1, r1->w2));
  EXPECT_TRUE(torch::equal(r1->w1.abs(), torch::ones({300, 8})));
  // Rademacher: about as many +1 as -1 (4800 entries: |mean| < 4 standard deviations).
  EXPECT_LT(std::abs(torch::cat({r1->w1, r1->w2}).mean().item<double>()), 4 / std::sqrt(4800.0));
}

TEST(CompactBilinearDraws, BuffersRoundTripThroughSaveAndLoad) {
  TensorSketchPooling ts(CompactBilinearOptions(6, 32).seed(11));
  std::vector<std::string> names;
  for (const auto& kv : ts->named_buffers()) names.push_back(kv.key());
  EXPECT_THAT(names, ElementsAre("h1", "s1", "h2", "s2"));
  std::stringstream stream;
  torch::save(ts, stream);
  TensorSketchPooling loaded(CompactBilinearOptions(6, 32).seed(12));
  torch::load(loaded, stream);
  const auto x = torch::randn({2, 6, 3, 3});
  EXPECT_TRUE(torch::equal(loaded(x), ts(x)));
  EXPECT_TRUE(torch::equal(ts->clone()->named_buffers()["h2"], ts->h2));

  RandomMaclaurinPooling rm(CompactBilinearOptions(6, 32).seed(11));
  names.clear();
  for (const auto& kv : rm->named_buffers()) names.push_back(kv.key());
  EXPECT_THAT(names, ElementsAre("w1", "w2"));
  std::stringstream stream2;
  torch::save(rm, stream2);
  RandomMaclaurinPooling rm_loaded(CompactBilinearOptions(6, 32).seed(12));
  torch::load(rm_loaded, stream2);
  EXPECT_TRUE(torch::equal(rm_loaded(x), rm(x)));
}

// ---- Tensor Sketch maths ----

TEST(TensorSketchPooling, HandCheckedOddAndEvenDimensions) {
  for (const char* algorithm : {"fft", "gram"}) {
    SCOPED_TRACE(algorithm);
    const auto x = torch::tensor({1.0, 2.0}, torch::kDouble).view({1, 2, 1, 1});
    // d = 3, h1 = (0, 2), s1 = (1, -1), h2 = (1, 1), s2 = (1, 1): psi1 = (1, 0, -2),
    // psi2 = (0, 3, 0); circular convolution (psi1 * psi2)_k = sum_j psi1_j psi2_{k-j mod 3}
    // = (-2*3, 1*3, 0) = (-6, 3, 0).
    TensorSketchPooling odd(raw(2, 3).sketch_algorithm(algorithm));
    odd->to(torch::kDouble);
    odd->h1.copy_(torch::tensor({0, 2}));
    odd->s1.copy_(torch::tensor({1.0, -1.0}));
    odd->h2.copy_(torch::tensor({1, 1}));
    odd->s2.copy_(torch::tensor({1.0, 1.0}));
    EXPECT_TRUE(
        torch::allclose(odd(x), torch::tensor({{-6.0, 3.0, 0.0}}, torch::kDouble), 0, 1e-12));
    // d = 4, h1 = (0, 3), s1 = (1, 1), h2 = (1, 2), s2 = (-1, 1): psi1 = (1, 0, 0, 2),
    // psi2 = (0, -1, 2, 0); conv = psi2_k + 2 psi2_{k+1 mod 4} = (-2, 3, 2, 0).
    TensorSketchPooling even(raw(2, 4).sketch_algorithm(algorithm));
    even->to(torch::kDouble);
    even->h1.copy_(torch::tensor({0, 3}));
    even->s1.copy_(torch::tensor({1.0, 1.0}));
    even->h2.copy_(torch::tensor({1, 2}));
    even->s2.copy_(torch::tensor({-1.0, 1.0}));
    EXPECT_TRUE(
        torch::allclose(even(x), torch::tensor({{-2.0, 3.0, 2.0, 0.0}}, torch::kDouble), 0, 1e-12));
    // Two locations, x and 3x: the sketch is quadratic, so the sum is (1 + 9) = 10 times the one
    // above and the mean 5 times.
    const auto two = torch::cat({x, 3 * x}, 3);
    EXPECT_TRUE(torch::allclose(even(two), 5 * even(x), 0, 1e-12));
    even->options.average(false);
    EXPECT_TRUE(torch::allclose(even(two), 10 * even(x), 0, 1e-12));
  }
}

TEST(TensorSketchPooling, EqualsNaiveCountSketchAndCircularConvolution) {
  torch::manual_seed(1);
  const int64_t c = 5, d = 7;
  const auto a = torch::randn({2, c, 2, 3}, torch::kDouble);
  const auto b = torch::randn({2, 4, 2, 3}, torch::kDouble);
  TensorSketchPooling m(raw(c, d, 9).channels_b(4).average(false).sketch_algorithm("fft"));
  m->to(torch::kDouble);
  const auto out = m(a, b);
  // The Gram form gives the same sketch.
  m->options.sketch_algorithm("gram");
  EXPECT_TRUE(torch::allclose(m(a, b), out, 1e-12, 1e-12));
  const auto h1 = m->h1.to(torch::kLong), h2 = m->h2.to(torch::kLong);
  auto expected = torch::zeros({2, d}, torch::kDouble);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t y = 0; y < 2; ++y)
      for (int64_t x = 0; x < 3; ++x) {
        std::vector<double> p1(d, 0.0), p2(d, 0.0);
        for (int64_t i = 0; i < c; ++i)
          p1[h1[i].item<int64_t>()] += m->s1[i].item<double>() * a[n][i][y][x].item<double>();
        for (int64_t j = 0; j < 4; ++j)
          p2[h2[j].item<int64_t>()] += m->s2[j].item<double>() * b[n][j][y][x].item<double>();
        for (int64_t k = 0; k < d; ++k) {
          double v = 0;
          for (int64_t j = 0; j < d; ++j) v += p1[j] * p2[(k - j + d) % d];
          expected[n][k] += v;
        }
      }
  EXPECT_TRUE(torch::allclose(out, expected, 1e-12, 1e-12));
}

// ---- Random Maclaurin maths ----

TEST(RandomMaclaurinPooling, HandChecked) {
  // W1 = [[1,1],[1,-1]], W2 = [[1,-1],[-1,-1]], x = (1, 2): W1 x = (3, -1), W2 x = (-1, -3),
  // product (-3, 3), divided by sqrt(d) = sqrt(2).
  RandomMaclaurinPooling m(raw(2, 2));
  m->to(torch::kDouble);
  m->w1.copy_(torch::tensor({{1.0, 1.0}, {1.0, -1.0}}));
  m->w2.copy_(torch::tensor({{1.0, -1.0}, {-1.0, -1.0}}));
  const auto x = torch::tensor({1.0, 2.0}, torch::kDouble).view({1, 2, 1, 1});
  const double r = std::sqrt(2.0);
  EXPECT_TRUE(
      torch::allclose(m(x), torch::tensor({{-3.0 / r, 3.0 / r}}, torch::kDouble), 0, 1e-15));
}

TEST(RandomMaclaurinPooling, EqualsProjectionFormula) {
  torch::manual_seed(2);
  const auto a = torch::randn({2, 3, 2, 2}, torch::kDouble);
  const auto b = torch::randn({2, 5, 2, 2}, torch::kDouble);
  RandomMaclaurinPooling m(raw(3, 6, 4).channels_b(5));
  m->to(torch::kDouble);
  // sum over locations of (W1 a_l) * (W2 b_l), then / (H*W) / sqrt(d).
  const auto pa = torch::matmul(m->w1, a.flatten(2));  // [2, 6, 4]
  const auto pb = torch::matmul(m->w2, b.flatten(2));
  const auto expected = (pa * pb).sum(2) / 4.0 / std::sqrt(6.0);
  EXPECT_TRUE(torch::allclose(m(a, b), expected, 1e-13, 1e-13));
  // Symmetric: the same with a for both streams (one stacked product inside).
  RandomMaclaurinPooling sym(raw(3, 6, 4));
  sym->to(torch::kDouble);
  const auto qa = torch::matmul(sym->w1, a.flatten(2)), qb = torch::matmul(sym->w2, a.flatten(2));
  EXPECT_TRUE(torch::allclose(sym(a), (qa * qb).sum(2) / 4.0 / std::sqrt(6.0), 1e-13, 1e-13));
}

// ---- the approximation property, statistically ----

TEST(CompactBilinearPooling, InnerProductOfVectorsIsUnbiasedForSquaredInnerProduct) {
  // E[<TS(x), TS(y)>] = E[<RM(x), RM(y)>] = <x, y>^2. With cos(x, y) ~ 0.9 and d = 8192 the
  // relative error has a standard deviation of about 0.03 (RM: sqrt(((|x|^2|y|^2 + 2<x,y>^2)^2
  // / <x,y>^4 - 1) / d)); the mean over 8 seeds must be below 0.06. Sketching x and y with
  // different seeds (independent projections) has expectation 0, i.e. relative error ~1.
  const int64_t c = 64, d = 8192;
  for (bool ts : {true, false}) {
    double err = 0, scrambled = 0;
    for (int64_t seed = 0; seed < 8; ++seed) {
      const auto xy = correlated_pair(c, 100 + seed);
      const double exact = std::pow(scalar_product(xy.first, xy.second), 2);
      const auto fx = compact_feature(ts, xy.first, d, seed);
      err += std::abs(sketched_product(ts, xy.first, xy.second, d, seed) - exact) / exact / 8;
      scrambled +=
          std::abs(scalar_product(fx, compact_feature(ts, xy.second, d, seed + 1000)) - exact) /
          exact / 8;
    }
    SCOPED_TRACE(ts ? "tensor sketch" : "random maclaurin");
    EXPECT_LT(err, 0.06);
    EXPECT_GT(scrambled, 0.7);
  }
}

TEST(CompactBilinearPooling, PooledInnerProductApproximatesFrobeniusOfFullBilinear) {
  // <CBP(X), CBP(Y)> ~ <Phi_X, Phi_Y>_F = sum_{l,m} <x_l, y_m>^2 (both averaged over H*W).
  torch::manual_seed(3);
  const int64_t c = 16, d = 8192;
  const auto x = torch::relu(torch::randn({1, c, 4, 4}, torch::kDouble));
  const auto y = torch::relu(x + 0.3 * torch::randn({1, c, 4, 4}, torch::kDouble));
  BilinearPooling full(BilinearPoolingOptions(c).normalization(no_normalization()));
  const double exact = scalar_product(full(x), full(y));
  for (bool ts : {true, false}) {
    double err = 0, scrambled = 0;
    for (int64_t seed = 0; seed < 8; ++seed) {
      const auto fx = compact_feature(ts, x, d, seed);
      err += std::abs(sketched_product(ts, x, y, d, seed) - exact) / exact / 8;
      scrambled +=
          std::abs(scalar_product(fx, compact_feature(ts, y, d, seed + 1000)) - exact) / exact / 8;
    }
    SCOPED_TRACE(ts ? "tensor sketch" : "random maclaurin");
    EXPECT_LT(err, 0.06);
    EXPECT_GT(scrambled, 0.5);
  }
}

TEST(CompactBilinearPooling, ErrorShrinksAsOneOverSqrtD) {
  // Root-mean-square relative error over 128 seeds at d = 256 and d = 4096: the ratio should be
  // sqrt(16) = 4 (measured 3.5 to 4.9 over other draws); an estimator with a bias or a variance
  // that does not fall with d would give about 1.
  const int64_t c = 64, seeds = 128;
  const auto xy = correlated_pair(c, 7);
  const double exact = std::pow(scalar_product(xy.first, xy.second), 2);
  for (bool ts : {true, false}) {
    double rms[2] = {0, 0};
    const int64_t dims[2] = {256, 4096};
    for (int k = 0; k < 2; ++k) {
      for (int64_t seed = 0; seed < seeds; ++seed) {
        const double est = sketched_product(ts, xy.first, xy.second, dims[k], seed);
        rms[k] += std::pow((est - exact) / exact, 2) / seeds;
      }
      rms[k] = std::sqrt(rms[k]);
    }
    SCOPED_TRACE(ts ? "tensor sketch" : "random maclaurin");
    EXPECT_GT(rms[0] / rms[1], 2.8) << rms[0] << " " << rms[1];
    EXPECT_LT(rms[0] / rms[1], 5.7) << rms[0] << " " << rms[1];
  }
}

// ---- normalisation, gradients, cost, errors ----

TEST(CompactBilinearPooling, NormalizationAndMaps) {
  torch::manual_seed(4);
  const auto x = torch::randn({2, 4, 3, 3});
  TensorSketchPooling ts(CompactBilinearOptions(4, 64));
  const auto result = ts->forward_with_maps(x);
  EXPECT_TRUE(torch::equal(result.output, ts(x)));
  const auto s = dynattn::signed_sqrt(result.maps.at("sketch"), 1e-5);
  EXPECT_TRUE(torch::allclose(result.output, s / s.norm(2, {1}, true), 1e-6, 1e-6));
  RandomMaclaurinPooling rm(
      CompactBilinearOptions(4, 64).normalization(BilinearNormalization().signed_sqrt(false)));
  const auto r = rm->forward_with_maps(x);
  const auto sk = r.maps.at("sketch");
  EXPECT_EQ(sk.sizes(), torch::IntArrayRef({2, 64}));
  EXPECT_TRUE(torch::allclose(r.output, sk / sk.norm(2, {1}, true), 1e-6, 1e-6));
}

TEST(CompactBilinearPooling, Gradcheck) {
  torch::manual_seed(5);
  const auto x = torch::randn({2, 3, 2, 2}, torch::kDouble).requires_grad_();
  const auto b = torch::randn({2, 4, 2, 2}, torch::kDouble).requires_grad_();
  TensorSketchPooling ts(CompactBilinearOptions(3, 16).seed(1));
  ts->to(torch::kDouble);
  EXPECT_GRADCHECK([&] { return ts(x); }, {x});
  TensorSketchPooling ts2(raw(3, 9, 2).channels_b(4));
  ts2->to(torch::kDouble);
  EXPECT_GRADCHECK([&] { return ts2(x, b); }, {x, b});
  for (const char* algorithm : {"fft", "gram"}) {
    SCOPED_TRACE(algorithm);
    TensorSketchPooling ts3(CompactBilinearOptions(3, 10).seed(3).sketch_algorithm(algorithm));
    ts3->to(torch::kDouble);
    EXPECT_GRADCHECK([&] { return ts3(x); }, {x});
  }
  RandomMaclaurinPooling rm(CompactBilinearOptions(3, 16).seed(1));
  rm->to(torch::kDouble);
  EXPECT_GRADCHECK([&] { return rm(x); }, {x});
  RandomMaclaurinPooling rm2(raw(3, 9, 2).channels_b(4));
  rm2->to(torch::kDouble);
  EXPECT_GRADCHECK([&] { return rm2(x, b); }, {x, b});
}

TEST(CompactBilinearPooling, DoubleModuleMatchesFloatModule) {
  // to(kDouble) also casts the int64 hash buffers; they are read back as int64. Compared
  // before the signed square root, whose slope near 0 (up to 1/(2 sqrt(eps))) magnifies float
  // rounding.
  torch::manual_seed(6);
  const auto x = torch::randn({2, 8, 3, 3});
  TensorSketchPooling ts(raw(8, 128));
  const auto f = ts(x);
  ts->to(torch::kDouble);
  EXPECT_EQ(ts->h1.scalar_type(), torch::kDouble);
  const auto dbl = ts(x.to(torch::kDouble));
  EXPECT_EQ(dbl.scalar_type(), torch::kDouble);
  const double diff = (dbl - f.to(torch::kDouble)).abs().max().item<double>();
  EXPECT_LT(diff, 1e-5 * f.abs().max().item<double>()) << diff;
}

TEST(CompactBilinearPooling, Macs) {
  const int64_t n = 2, c = 8, hw = 6, d = 32;
  const auto x = torch::randn({n, c, 2, 3});
  RandomMaclaurinPooling rm{CompactBilinearOptions(c, d)};
  const auto count = dynattn::count_macs([&] { rm(x); });
  EXPECT_EQ(count.macs, n * hw * 2 * c * d);  // [N*HW, C] x [C, 2d]
  EXPECT_EQ(count.by_op.at("aten::mm"), n * hw * 2 * c * d);
  // Tensor Sketch: the Gram form counts its bmm; the FFT form runs no matrix product.
  TensorSketchPooling gram{CompactBilinearOptions(c, d).sketch_algorithm("gram")};
  EXPECT_EQ(dynattn::count_macs([&] { gram(x); }).macs, n * c * c * hw);
  TensorSketchPooling fft{CompactBilinearOptions(c, d).sketch_algorithm("fft")};
  EXPECT_EQ(dynattn::count_macs([&] { fft(x); }).macs, 0);
}

TEST(TensorSketchPooling, AutoAlgorithmPicksTheCheaperForm) {
  // gram when Ca*Cb <= 4 d ceil(log2 d).
  EXPECT_EQ(TensorSketchPooling(CompactBilinearOptions(64, 2048))->algorithm(), "gram");
  EXPECT_EQ(TensorSketchPooling(CompactBilinearOptions(512, 8192))->algorithm(), "gram");
  EXPECT_EQ(TensorSketchPooling(CompactBilinearOptions(512, 16))->algorithm(), "fft");
  EXPECT_EQ(TensorSketchPooling(CompactBilinearOptions(16, 16))->algorithm(), "gram");  // 256
  EXPECT_EQ(TensorSketchPooling(CompactBilinearOptions(17, 16))->algorithm(), "fft");   // 289
  EXPECT_EQ(
      TensorSketchPooling(CompactBilinearOptions(64, 2048).sketch_algorithm("fft"))->algorithm(),
      "fft");
}

TEST(CompactBilinearPooling, WorkInsideAnyModuleWithOneArgument) {
  const auto x = torch::randn({1, 4, 2, 2});
  torch::nn::AnyModule ts(TensorSketchPooling(CompactBilinearOptions(4, 8)));
  torch::nn::AnyModule rm(RandomMaclaurinPooling(CompactBilinearOptions(4, 8)));
  EXPECT_EQ(ts.forward(x).sizes(), torch::IntArrayRef({1, 8}));
  EXPECT_EQ(rm.forward(x).sizes(), torch::IntArrayRef({1, 8}));
}

TEST(CompactBilinearPooling, Errors) {
  EXPECT_THAT(error_of([] { TensorSketchPooling(CompactBilinearOptions(4, 0)); }),
              HasSubstr("TensorSketchPooling: the output dimension d must be positive, got 0"));
  EXPECT_THAT(error_of([] { RandomMaclaurinPooling(CompactBilinearOptions(4, -3)); }),
              HasSubstr("RandomMaclaurinPooling: the output dimension d must be positive, got -3"));
  EXPECT_THAT(error_of([] { TensorSketchPooling(CompactBilinearOptions(0, 8)); }),
              HasSubstr("TensorSketchPooling: channels must be positive, got 0"));
  EXPECT_THAT(error_of([] { TensorSketchPooling(CompactBilinearOptions(4, 8).seed(-1)); }),
              HasSubstr("seed must be >= 0, got -1"));
  EXPECT_THAT(error_of([] {
                RandomMaclaurinPooling(CompactBilinearOptions(4, 8).normalization(
                    BilinearNormalization().sqrt_form("x")));
              }),
              HasSubstr("RandomMaclaurinPooling: sqrt_form must be 'stable' or 'reference'"));
  EXPECT_THAT(
      error_of([] { TensorSketchPooling(CompactBilinearOptions(4, 8).sketch_algorithm("dft")); }),
      HasSubstr(
          "TensorSketchPooling: sketch_algorithm must be 'auto', 'gram' or 'fft', got 'dft'"));
  EXPECT_THAT(error_of([] {
                RandomMaclaurinPooling(CompactBilinearOptions(4, 8).sketch_algorithm("fft"));
              }),
              HasSubstr("RandomMaclaurinPooling: sketch_algorithm applies to Tensor Sketch only"));
  TensorSketchPooling ts(CompactBilinearOptions(4, 8));
  RandomMaclaurinPooling rm(CompactBilinearOptions(4, 8).channels_b(3));
  EXPECT_THAT(
      error_of([&] {
        ts(torch::zeros({4, 2, 2}));
      }),
      HasSubstr("TensorSketchPooling: expected a 4-D input [N,C,H,W] with C=4, got [4, 2, 2]"));
  EXPECT_THAT(error_of([&] {
                ts(torch::zeros({1, 3, 2, 2}));
              }),
              HasSubstr("with C=4, got [1, 3, 2, 2]"));
  EXPECT_THAT(error_of([&] {
                rm(torch::zeros({1, 4, 2, 2}));
              }),
              HasSubstr("RandomMaclaurinPooling: forward(x) is the symmetric form and needs "
                        "channels_b = channels"));
  EXPECT_THAT(error_of([&] {
                rm(torch::zeros({1, 4, 2, 2}), torch::zeros({1, 4, 2, 2}));
              }),
              HasSubstr("RandomMaclaurinPooling: expected a 4-D input [N,C,H,W] with C=3"));
  EXPECT_THAT(error_of([&] {
                rm(torch::zeros({1, 4, 2, 2}), torch::zeros({2, 3, 2, 2}));
              }),
              HasSubstr("the two streams must have the same N, H and W"));
  EXPECT_THAT(error_of([] { dynattn::draw_count_sketches(4, 4, 0, 1); }),
              HasSubstr("draw_count_sketches: channels and dim must be positive"));
}
