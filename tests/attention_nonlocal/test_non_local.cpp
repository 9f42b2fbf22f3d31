#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "dynattn/attention/non_local.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/ops/conv2d.h"
#include "dynattn/ops/softmax_attention.h"
#include "dynattn/profile/mac_counter.h"
#include "gradcheck.h"
#include "kernel_policy.h"
#include "test_util.h"

using dynattn::NonLocalBlock;
using dynattn::NonLocalBlockImpl;
using dynattn::NonLocalOptions;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

namespace {

const std::vector<std::string> kModes = {"embedded", "gaussian", "dot", "concat"};

// Whether float CPU blocks run their softmax attention as one op (ops/softmax_attention.h).
bool fused_attention_applies() {
  const auto t = torch::zeros({1, 1, 1});
  return dynattn::softmax_attention_applicable(t, t, t);
}

// Why the kernel dispatch rules out the non-local block's own path `path` on this CPU and policy
// (ops/dispatch.h, op non_local_block), or nullptr when it may run.
const char* block_path_ruled_out(const std::string& path) {
  for (const auto& c : dynattn::kernel_op("non_local_block").candidates)
    if (c.name == path) return c.why_not();
  ADD_FAILURE() << "non_local_block has no candidate " << path;
  return "unknown path";
}

// Every parameter N(0, std), BN running statistics away from (0, 1): nothing is trivially zero.
void randomise(torch::nn::Module& m, double std = 0.5) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) p.normal_(0.0, std);
  for (auto& b : m.named_buffers()) {
    if (b.key().find("running_mean") != std::string::npos) b.value().normal_(0.0, 0.1);
    if (b.key().find("running_var") != std::string::npos) b.value().uniform_(0.5, 1.5);
  }
}

std::vector<double> values(const torch::Tensor& t) {
  auto d = t.detach().to(torch::kDouble).contiguous().cpu();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// max |actual - expected| <= rel * max(max |expected|, min_scale).
void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double rel,
                  double min_scale = 1e-12) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  const auto a = actual.detach().to(torch::kDouble).cpu();
  const auto e = expected.detach().to(torch::kDouble).cpu();
  const double scale = std::max(e.abs().max().item<double>(), min_scale);
  const double err = (a - e).abs().max().item<double>();
  EXPECT_LE(err, rel * scale) << "max abs error " << err << " at output scale " << scale;
}

struct Reference {
  torch::Tensor output;    // [N, C, H, W]
  torch::Tensor affinity;  // [N, Q, K]
};

// The block written out as loops over positions, from the paper's equations, in double, for a
// 2-D input and a block in eval mode (BN with running statistics).
Reference naive_non_local(NonLocalBlockImpl& block, const torch::Tensor& input) {
  const auto& o = block.options;
  const std::string mode = o.mode();
  const int64_t n_batch = input.size(0), c_in = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t inter = block.inter_channels();
  const bool sub = o.subsample();
  const int64_t hk = sub ? h / 2 : h, wk = sub ? w / 2 : w;
  const int64_t q_count = h * w, k_count = hk * wk;
  std::map<std::string, std::vector<double>> p;
  for (auto& kv : block.named_parameters()) p[kv.key()] = values(kv.value());
  for (auto& kv : block.named_buffers()) p[kv.key()] = values(kv.value());
  const auto x = values(input);
  auto at = [&](int64_t n, int64_t c, int64_t i, int64_t j) {
    return x[((n * c_in + c) * h + i) * w + j];
  };
  auto project = [&](const std::string& name, const std::vector<double>& in) {
    const auto& wt = p[name + ".weight"];
    const auto& b = p[name + ".bias"];
    const int64_t out_count = static_cast<int64_t>(b.size());
    const int64_t in_count = static_cast<int64_t>(in.size());
    std::vector<double> out(out_count);
    for (int64_t r = 0; r < out_count; ++r) {
      out[r] = b[r];
      for (int64_t c = 0; c < in_count; ++c) out[r] += wt[r * in_count + c] * in[c];
    }
    return out;
  };
  auto feature = [&](int64_t n, int64_t i, int64_t j) {
    std::vector<double> f(c_in);
    for (int64_t c = 0; c < c_in; ++c) f[c] = at(n, c, i, j);
    return f;
  };
  auto elementwise_max = [](std::vector<double> a, const std::vector<double>& b) {
    for (size_t k = 0; k < a.size(); ++k) a[k] = std::max(a[k], b[k]);
    return a;
  };
  // Key-side feature at key position (ki, kj): `name`'s projection (or the input when empty).
  auto key_feature = [&](const std::string& name, int64_t n, int64_t ki, int64_t kj) {
    auto map = [&](std::vector<double> f) { return name.empty() ? f : project(name, f); };
    if (!sub) return map(feature(n, ki, kj));
    std::vector<double> best;
    for (int64_t di = 0; di < 2; ++di) {
      for (int64_t dj = 0; dj < 2; ++dj) {
        auto f = feature(n, 2 * ki + di, 2 * kj + dj);
        if (!o.pool_first()) f = map(f);
        best = best.empty() ? f : elementwise_max(best, f);
      }
    }
    return o.pool_first() ? map(best) : best;
  };
  auto dot = [](const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t k = 0; k < a.size(); ++k) s += a[k] * b[k];
    return s;
  };

  auto output = torch::zeros(input.sizes(), torch::kDouble);
  auto affinity = torch::zeros({n_batch, q_count, k_count}, torch::kDouble);
  auto out_a = output.accessor<double, 4>();
  auto aff_a = affinity.accessor<double, 3>();
  const double scale = block.logit_scale();
  for (int64_t n = 0; n < n_batch; ++n) {
    std::vector<std::vector<double>> phi_k, g_k;
    for (int64_t ki = 0; ki < hk; ++ki) {
      for (int64_t kj = 0; kj < wk; ++kj) {
        phi_k.push_back(key_feature(mode == "gaussian" ? "" : "phi", n, ki, kj));
        g_k.push_back(key_feature("g", n, ki, kj));
      }
    }
    for (int64_t i = 0; i < h; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        const int64_t q = i * w + j;
        const auto theta =
            mode == "gaussian" ? feature(n, i, j) : project("theta", feature(n, i, j));
        std::vector<double> f(k_count);
        for (int64_t k = 0; k < k_count; ++k) {
          if (mode == "embedded" || mode == "gaussian") {
            f[k] = std::exp(scale * dot(theta, phi_k[k]));
          } else if (mode == "dot") {
            f[k] = dot(theta, phi_k[k]) / k_count;
          } else {
            const auto& wc = p["concat_project.weight"];
            double s = 0;
            for (int64_t r = 0; r < inter; ++r) s += wc[r] * theta[r] + wc[inter + r] * phi_k[k][r];
            f[k] = std::max(s, 0.0) / k_count;
          }
        }
        if (mode == "embedded" || mode == "gaussian") {
          double total = 0;
          for (double v : f) total += v;
          for (double& v : f) v /= total;
        }
        std::vector<double> y(inter, 0.0);
        for (int64_t k = 0; k < k_count; ++k) {
          aff_a[n][q][k] = f[k];
          for (int64_t r = 0; r < inter; ++r) y[r] += f[k] * g_k[k][r];
        }
        const auto wy = project("z", y);
        for (int64_t c = 0; c < c_in; ++c) {
          const double normalised =
              (wy[c] - p["bn.running_mean"][c]) / std::sqrt(p["bn.running_var"][c] + 1e-5);
          out_a[n][c][i][j] = p["bn.weight"][c] * normalised + p["bn.bias"][c] + at(n, c, i, j);
        }
      }
    }
  }
  return {output, affinity};
}

std::vector<int64_t> all_queries(int64_t count) {
  std::vector<int64_t> q(count);
  for (int64_t i = 0; i < count; ++i) q[i] = i;
  return q;
}

std::shared_ptr<NonLocalBlockImpl> clone_of(const NonLocalBlock& block) {
  return std::dynamic_pointer_cast<NonLocalBlockImpl>(block->clone());
}

// One training step of b on x (in b's dtype) with a weighted sum as the loss: the output, the
// input gradient, every parameter's gradient and every buffer after it.
std::vector<torch::Tensor> training_step(NonLocalBlockImpl& b, const torch::Tensor& x) {
  b.zero_grad();
  const auto xx = x.to(b.g.ptr()->parameters()[0].scalar_type()).detach().clone().requires_grad_();
  const auto y = b.forward(xx);
  y.mul(torch::linspace(-1, 1, y.numel(), y.options()).view(y.sizes())).sum().backward();
  std::vector<torch::Tensor> out = {y.detach(), xx.grad()};
  for (const auto& p : b.parameters()) out.push_back(p.grad().clone());
  for (const auto& t : b.buffers()) out.push_back(t.clone());
  return out;
}

}  // namespace

TEST(NonLocalBlock, IsTheExactIdentityAtInitialisation) {
  const std::vector<std::vector<int64_t>> shapes = {{2, 8, 6}, {2, 8, 4, 4}, {2, 8, 2, 4, 4}};
  for (int64_t dims = 1; dims <= 3; ++dims) {
    for (const auto& mode : kModes) {
      SCOPED_TRACE("dims " + std::to_string(dims) + " mode " + mode);
      NonLocalBlock block(NonLocalOptions(8).dims(dims).mode(mode));
      const auto x = torch::randn(shapes[dims - 1]);
      EXPECT_TRUE(torch::equal(block->forward(x), x));
      block->eval();
      EXPECT_TRUE(torch::equal(block->forward(x), x));
      EXPECT_TRUE(torch::equal(block->forward_with_maps(x).output, x));
    }
  }
}

TEST(NonLocalBlock, ParameterNamesAndShapesFollowTheReference) {
  NonLocalBlock embedded(NonLocalOptions(8));
  std::vector<std::string> names;
  for (auto& p : embedded->named_parameters()) names.push_back(p.key());
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("theta.weight", "theta.bias", "phi.weight",
                                                     "phi.bias", "g.weight", "g.bias", "z.weight",
                                                     "z.bias", "bn.weight", "bn.bias"));
  EXPECT_EQ(embedded->named_parameters()["theta.weight"].sizes(),
            (std::vector<int64_t>{4, 8, 1, 1}));
  EXPECT_EQ(embedded->named_parameters()["z.weight"].sizes(), (std::vector<int64_t>{8, 4, 1, 1}));
  EXPECT_EQ(embedded->named_parameters()["bn.weight"].abs().sum().item<double>(), 0.0);

  NonLocalBlock gaussian(NonLocalOptions(8).mode("gaussian").dims(3));
  EXPECT_FALSE(gaussian->named_parameters().contains("theta.weight"));
  EXPECT_FALSE(gaussian->named_parameters().contains("phi.weight"));
  EXPECT_EQ(gaussian->named_parameters()["g.weight"].sizes(),
            (std::vector<int64_t>{4, 8, 1, 1, 1}));

  NonLocalBlock concat(NonLocalOptions(8).mode("concat").dims(1));
  EXPECT_EQ(concat->named_parameters()["concat_project.weight"].sizes(),
            (std::vector<int64_t>{1, 8, 1, 1}));
  EXPECT_FALSE(concat->named_parameters().contains("concat_project.bias"));
  EXPECT_EQ(concat->named_parameters()["g.weight"].sizes(), (std::vector<int64_t>{4, 8, 1}));
}

// Each pairwise function, with and without sub-sampling, pooling before or after the convs.
TEST(NonLocalBlock, MatchesNaiveReferenceForEveryPairwiseFunction) {
  struct Case {
    bool subsample, pool_first;
    std::vector<int64_t> shape;
  };
  const std::vector<Case> cases = {
      {false, true, {1, 4, 3, 3}},
      {true, true, {2, 4, 4, 4}},
      {true, false, {2, 4, 4, 5}},
      {false, true, {1, 4, 12, 12}},  // 144 keys: the affinity laid out [N, q, K]
      {true, false, {1, 4, 24, 25}}};
  for (const auto& mode : kModes) {
    for (const auto& c : cases) {
      SCOPED_TRACE(mode + (c.subsample ? (c.pool_first ? " pool first" : " pool after") : ""));
      NonLocalBlock block(
          NonLocalOptions(4).mode(mode).subsample(c.subsample).pool_first(c.pool_first));
      randomise(*block);
      block->eval();
      const auto x = torch::randn(c.shape);
      const int64_t queries = c.shape[2] * c.shape[3];
      block->set_map_queries(all_queries(queries));
      const auto result = block->forward_with_maps(x);
      const auto expected = naive_non_local(*block, x);
      expect_close(result.output, expected.output, 1e-5);
      expect_close(result.maps.at("affinity"), expected.affinity, 1e-5);
      expect_close(block->forward(x), expected.output, 1e-5);
    }
  }
}

TEST(NonLocalBlock, WorksOnOneTwoAndThreeSpatialDimensions) {
  struct Case {
    int64_t dims;
    std::vector<int64_t> shape;
    int64_t keys_subsampled;
  };
  // 1-D pools by 2, 2-D by 2x2, 3-D by 1x2x2 (every frame stays); odd sizes are floored.
  const std::vector<Case> cases = {
      {1, {2, 6, 10}, 5}, {2, {2, 6, 4, 6}, 6}, {2, {1, 6, 5, 5}, 4}, {3, {1, 6, 3, 4, 4}, 12}};
  for (const auto& c : cases) {
    for (bool subsample : {true, false}) {
      SCOPED_TRACE("dims " + std::to_string(c.dims) + (subsample ? " subsampled" : ""));
      NonLocalBlock block(NonLocalOptions(6).dims(c.dims).subsample(subsample));
      randomise(*block);
      const auto x = torch::randn(c.shape);
      const auto result = block->forward_with_maps(x);
      EXPECT_EQ(result.output.sizes(), x.sizes());
      const int64_t queries = x.numel() / (x.size(0) * x.size(1));
      const auto& affinity = result.maps.at("affinity");
      EXPECT_EQ(affinity.sizes(),
                (std::vector<int64_t>{c.shape[0], 1, subsample ? c.keys_subsampled : queries}));
      expect_close(affinity.sum(-1), torch::ones({c.shape[0], 1}), 1e-6);
      // forward() takes the fused training path where it applies: other rounding.
      expect_close(block->forward(x), result.output, 1e-5);
    }
  }
}

TEST(NonLocalBlock, SubsamplingKeepsAQuarterOfTheKeys) {
  NonLocalBlock block(NonLocalOptions(4));
  const auto x = torch::randn({1, 4, 8, 6});
  EXPECT_EQ(block->forward_with_maps(x).maps.at("affinity").size(2), 48 / 4);
  NonLocalBlock full(NonLocalOptions(4).subsample(false));
  EXPECT_EQ(full->forward_with_maps(x).maps.at("affinity").size(2), 48);
}

TEST(NonLocalBlock, DefaultMapQueryIsTheCentrePosition) {
  NonLocalBlock block(NonLocalOptions(4));
  randomise(*block);
  const auto x = torch::randn({2, 4, 4, 6});
  const auto centre = block->forward_with_maps(x).maps.at("affinity");
  block->set_map_queries({2 * 6 + 3});
  EXPECT_TRUE(torch::equal(block->forward_with_maps(x).maps.at("affinity"), centre));
  block->set_map_queries({0, 23, 5});
  const auto three = block->forward_with_maps(x).maps.at("affinity");
  EXPECT_EQ(three.sizes(), (std::vector<int64_t>{2, 3, 6}));
  block->set_map_queries(all_queries(24));
  const auto all = block->forward_with_maps(x).maps.at("affinity");
  expect_close(three, all.index_select(1, torch::tensor({0, 23, 5})), 1e-6);
}

TEST(NonLocalBlock, PoolFirstDiffersFromPoolAfterUnlessTheConvsCommuteWithMax) {
  for (const auto& mode : kModes) {
    SCOPED_TRACE(mode);
    const auto x = torch::randn({2, 4, 4, 4});
    NonLocalBlock first(NonLocalOptions(4).mode(mode).inter_channels(4).pool_first(true));
    randomise(*first);
    first->eval();
    auto after = clone_of(first);
    after->options.pool_first(false);
    EXPECT_GT((first->forward(x) - after->forward(x)).abs().max().item<double>(), 1e-3);

    // A positive diagonal conv is increasing in every channel, so max-pooling commutes with it.
    {
      torch::NoGradGuard no_grad;
      for (const char* name : {"phi.weight", "g.weight"}) {
        auto params = first->named_parameters();
        if (!params.contains(name)) continue;
        params[name].copy_(torch::diag(torch::rand({4}) + 0.5).view({4, 4, 1, 1}));
      }
    }
    after = clone_of(first);
    after->options.pool_first(false);
    expect_close(after->forward(x), first->forward(x), 1e-6);

    // Without sub-sampling the switch has nothing to act on.
    auto full_first = clone_of(first);
    full_first->options.subsample(false);
    randomise(*full_first);
    auto full_after = std::dynamic_pointer_cast<NonLocalBlockImpl>(full_first->clone());
    full_after->options.pool_first(false);
    EXPECT_TRUE(torch::equal(full_first->forward(x), full_after->forward(x)));
  }
}

// log a_ij - mean_j log a_ij = s * (l_ij - mean_j l_ij): the switch scales the logits, nothing
// else.
TEST(NonLocalBlock, ScaleSwitchScalesExactlyTheLogits) {
  auto centred_log = [](const torch::Tensor& a) {
    const auto l = a.log();
    return l - l.mean(-1, true);
  };
  // The same seed gives the same parameters whatever the scale.
  auto make = [](const std::string& mode, const std::string& scale) {
    torch::manual_seed(3);
    NonLocalBlock block(NonLocalOptions(8).mode(mode).scale(scale));
    randomise(*block, 0.3);
    block->to(torch::kDouble);
    block->eval();
    block->set_map_queries(all_queries(16));
    return block;
  };
  const auto x = torch::randn({2, 8, 4, 4}, torch::kDouble);
  for (const std::string mode : {"embedded", "gaussian"}) {
    SCOPED_TRACE(mode);
    auto none = make(mode, "none");
    EXPECT_EQ(none->logit_scale(), 1.0);
    const auto reference = centred_log(none->forward_with_maps(x).maps.at("affinity"));
    for (const auto& [scale, factor] : std::vector<std::pair<std::string, double>>{
             {"inter", 0.5}, {"channels", 1 / std::sqrt(8.0)}}) {
      SCOPED_TRACE(scale);
      auto scaled = make(mode, scale);
      EXPECT_DOUBLE_EQ(scaled->logit_scale(), factor);
      const auto log_affinity = centred_log(scaled->forward_with_maps(x).maps.at("affinity"));
      expect_close(log_affinity, reference * factor, 1e-10);
      // Only the affinity changes: g's side of the block is the same.
      EXPECT_TRUE(torch::equal(scaled->named_parameters()["g.weight"],
                               none->named_parameters()["g.weight"]));
    }
  }
  EXPECT_DOUBLE_EQ(NonLocalBlock(NonLocalOptions(8))->logit_scale(), 0.5);  // auto = inter
  EXPECT_DOUBLE_EQ(NonLocalBlock(NonLocalOptions(8).mode("gaussian"))->logit_scale(), 1.0);
  EXPECT_DOUBLE_EQ(NonLocalBlock(NonLocalOptions(8).mode("dot"))->logit_scale(), 1.0);
}

TEST(NonLocalBlock, ChunkedAffinityEqualsUnchunked) {
  struct Case {
    bool subsample;
    std::vector<int64_t> shape;
    int64_t limit, chunks;
  };
  // N * K = 2 * 4: three queries per chunk, 16 in six chunks (the last one short). Without
  // sub-sampling 144 keys (the [N, q, K] layout): five queries per chunk, 144 in 29 chunks.
  const std::vector<Case> cases = {{true, {2, 4, 4, 4}, 2 * 4 * 3, 6},
                                   {false, {1, 4, 12, 12}, 144 * 5 + 7, 29}};
  for (const auto& c : cases) {
    for (const auto& mode : kModes) {
      SCOPED_TRACE(mode + (c.subsample ? " subsampled" : ""));
      NonLocalBlock block(NonLocalOptions(4).mode(mode).subsample(c.subsample));
      randomise(*block);
      // Eval-mode BN: batch statistics would make z's bias gradient a sum of rounding errors.
      block->eval();
      auto chunked = clone_of(block);
      chunked->options.max_affinity_elements(c.limit);
      const auto x = torch::randn(c.shape);
      // With autograd: the inference path never materialises the affinity, nothing to chunk.
      const auto x_grad = x.clone().requires_grad_();
      const auto whole = dynattn::count_macs([&] {
        c10::InferenceMode off(false);
        torch::AutoGradMode grad(true);
        block->forward(x_grad);
      });
      const auto parts = dynattn::count_macs([&] {
        c10::InferenceMode off(false);
        torch::AutoGradMode grad(true);
        chunked->forward(x_grad);
      });
      EXPECT_EQ(parts.macs, whole.macs);
      if (mode != "concat") {
        // Unchunked, the softmax modes run as one op (ops/softmax_attention.h) where it applies.
        if ((mode == "embedded" || mode == "gaussian") && fused_attention_applies())
          EXPECT_EQ(whole.calls.at("dynattn::softmax_attention"), 1);
        else
          EXPECT_EQ(whole.calls.at("aten::bmm"), 2);
        EXPECT_EQ(parts.calls.at("aten::bmm"), 2 * c.chunks);
      }

      const auto xa = x.clone().requires_grad_();
      const auto xb = x.clone().requires_grad_();
      const auto ya = block->forward(xa);
      const auto yb = chunked->forward(xb);
      expect_close(yb, ya, 1e-6);
      const auto w = torch::randn_like(ya);
      (ya * w).sum().backward();
      (yb * w).sum().backward();
      expect_close(xb.grad(), xa.grad(), 1e-5);
      // Some gradients are zero in exact arithmetic (phi's bias under a softmax): compare them
      // at the scale of the largest parameter gradient.
      auto pa = block->named_parameters();
      double grad_scale = 0;
      for (auto& kv : pa)
        grad_scale = std::max(grad_scale, kv.value().grad().abs().max().item<double>());
      for (auto& kv : chunked->named_parameters()) {
        SCOPED_TRACE(kv.key());
        expect_close(kv.value().grad(), pa[kv.key()].grad(), 1e-5, grad_scale);
      }
    }
  }
}

TEST(NonLocalBlock, GradientsMatchFiniteDifferences) {
  for (const auto& mode : kModes) {
    for (bool pool_first : {true, false}) {
      SCOPED_TRACE(mode + (pool_first ? " pool first" : " pool after"));
      NonLocalBlock block(NonLocalOptions(4).mode(mode).pool_first(pool_first));
      block->to(torch::kDouble);
      randomise(*block);  // bn.weight non-zero, else nothing reaches the branch
      if (mode == "embedded") block->options.max_affinity_elements(2 * 4 * 5);
      auto x = torch::randn({2, 4, 4, 4}, torch::kDouble).requires_grad_();
      EXPECT_GRADCHECK([&] { return block->forward(x); },
                       dynattn::test_util::with_parameters({x}, *block));
    }
    // 144 keys: the [N, q, K] layout of the affinity.
    SCOPED_TRACE(mode + " without sub-sampling");
    NonLocalBlock block(NonLocalOptions(2).mode(mode).subsample(false));
    block->to(torch::kDouble);
    randomise(*block);
    auto x = torch::randn({1, 2, 12, 12}, torch::kDouble).requires_grad_();
    EXPECT_GRADCHECK([&] { return block->forward(x); },
                     dynattn::test_util::with_parameters({x}, *block));
  }
}

TEST(NonLocalBlock, TimmOptionsGiveTimmsWidthAndScale) {
  EXPECT_EQ(NonLocalBlock(dynattn::timm_non_local_options(16))->inter_channels(), 8);
  EXPECT_EQ(NonLocalBlock(dynattn::timm_non_local_options(64))->inter_channels(), 8);
  EXPECT_EQ(NonLocalBlock(dynattn::timm_non_local_options(256))->inter_channels(), 32);
  EXPECT_EQ(NonLocalBlock(dynattn::timm_non_local_options(100))->inter_channels(), 16);
  const auto o = dynattn::timm_non_local_options(64);
  EXPECT_FALSE(o.subsample());
  EXPECT_EQ(o.mode(), "embedded");
  EXPECT_DOUBLE_EQ(NonLocalBlock(o)->logit_scale(), 1.0 / 8.0);
}

// tests/attention_nonlocal/make_timm_fixture.py wrote timm's NonLocalAttn weights (keys t, p,
// g, z, norm), an input and its outputs; regenerate with /usr/bin/python3 make_timm_fixture.py.
TEST(NonLocalBlock, MatchesTimmNonLocalAttn) {
  const auto file = dynattn::read_safetensors(std::string(DYNATTN_SOURCE_DIR) +
                                              "/tests/attention_nonlocal/"
                                              "timm_non_local_fixture.safetensors");
  const std::vector<std::pair<std::string, std::string>> renames = {
      {"t.", "theta."}, {"p.", "phi."}, {"g.", "g."}, {"z.", "z."}, {"norm.", "bn."}};
  NonLocalBlock block(dynattn::timm_non_local_options(16));
  auto params = block->named_parameters();
  auto buffers = block->named_buffers();
  int assigned = 0;
  {
    torch::NoGradGuard no_grad;
    for (const auto& [key, tensor] : file.tensors) {
      for (const auto& [from, to] : renames) {
        if (key.rfind(from, 0) != 0) continue;
        const std::string name = to + key.substr(from.size());
        auto* target = params.find(name);
        if (target == nullptr) target = buffers.find(name);
        ASSERT_NE(target, nullptr) << name;
        ASSERT_EQ(target->sizes(), tensor.sizes()) << name;
        target->copy_(tensor);
        ++assigned;
      }
    }
  }
  EXPECT_EQ(assigned, 12);  // 10 parameters + BN running mean and variance
  const auto x = *file.find("input");
  block->eval();
  expect_close(block->forward(x), *file.find("output_eval"), 1e-5);
  block->train();
  expect_close(block->forward(x), *file.find("output_train"), 1e-5);
}

// Embedded gaussian, C=8, inter=4, 4x4 input (Q=16), 2x2 sub-sampling (K=4), batch 1.
TEST(NonLocalBlock, CountsConvolutionAndAffinityMacs) {
  const auto x = torch::randn({1, 8, 4, 4});
  NonLocalBlock first(NonLocalOptions(8));
  const auto count = dynattn::count_macs([&] { first->forward(x); });
  // theta 16*8*4 + phi 4*8*4 + g 4*8*4 + z 16*4*8 = 1280; theta^T phi 16*4*4 + g a^T 4*4*16 = 512
  EXPECT_EQ(count.macs, 1280 + 512);
  EXPECT_EQ(count.by_op.at(fused_attention_applies() ? "dynattn::softmax_attention" : "aten::bmm"),
            512);
  NonLocalBlock after(NonLocalOptions(8).pool_first(false));
  EXPECT_EQ(dynattn::count_macs([&] { after->forward(x); }).macs, 4 * 512 + 512);
  NonLocalBlock full(NonLocalOptions(8).subsample(false));
  EXPECT_EQ(dynattn::count_macs([&] { full->forward(x); }).macs, 4 * 512 + 2 * 16 * 16 * 4);
  // The map costs nothing in forward() and its own rows in forward_with_maps().
  const auto with_maps = dynattn::count_macs([&] { first->forward_with_maps(x); });
  EXPECT_EQ(with_maps.macs, 1280 + 512 + 1 * 4 * 4);
}

TEST(NonLocalBlock, RejectsBadInputsAndOptions) {
  NonLocalBlock block(NonLocalOptions(4));
  EXPECT_THAT(error_of([&] {
                block->forward(torch::randn({1, 4, 4}));
              }),
              HasSubstr("NonLocalBlock: expected a 4-D input [N,C,H,W] with C=4, got [1, 4, 4]"));
  EXPECT_THAT(error_of([&] {
                block->forward(torch::randn({1, 6, 4, 4}));
              }),
              HasSubstr("with C=4, got [1, 6, 4, 4]"));
  EXPECT_THAT(error_of([&] {
                block->forward(torch::ones({1, 4, 4, 4}, torch::kLong));
              }),
              HasSubstr("NonLocalBlock: expected a floating-point input, got Long"));
  EXPECT_THAT(error_of([&] {
                block->forward(torch::randn({1, 4, 1, 4}));
              }),
              HasSubstr("sub-sampling halves"));
  NonLocalBlock video(NonLocalOptions(4).dims(3));
  EXPECT_THAT(error_of([&] {
                video->forward(torch::randn({1, 4, 4, 4}));
              }),
              HasSubstr("5-D input [N,C,T,H,W]"));
  block->set_map_queries({16});
  EXPECT_THAT(error_of([&] {
                block->forward_with_maps(torch::randn({1, 4, 4, 4}));
              }),
              HasSubstr("map query 16 is outside [0, 16)"));

  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).mode("softmax")); }),
              HasSubstr("mode must be embedded, gaussian, dot or concat, got 'softmax'"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).inter_channels(0)); }),
              HasSubstr("inter_channels must be positive, got 0"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(1)); }),
              HasSubstr("inter channels must be positive, got 0 = floor(1 * 0.5)"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).inter_ratio(-1)); }),
              HasSubstr("inter_ratio must be positive"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).dims(4)); }),
              HasSubstr("dims must be 1, 2 or 3, got 4"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(0)); }),
              HasSubstr("channels must be positive"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).scale("sqrt")); }),
              HasSubstr("scale must be auto, none, inter or channels, got 'sqrt'"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).mode("dot").scale("inter")); }),
              HasSubstr("applies to the softmax modes (embedded, gaussian) only"));
  EXPECT_THAT(error_of([] { NonLocalBlock(NonLocalOptions(4).max_affinity_elements(0)); }),
              HasSubstr("max_affinity_elements must be positive"));
}

TEST(NonLocalBlock, CloneCopiesParametersIntoIndependentModules) {
  NonLocalBlock block(NonLocalOptions(4).mode("concat").dims(1));
  randomise(*block);
  auto copy = clone_of(block);
  const auto x = torch::randn({2, 4, 6});
  EXPECT_TRUE(torch::equal(copy->forward(x), block->forward(x)));
  {
    torch::NoGradGuard no_grad;
    copy->named_parameters()["concat_project.weight"].add_(1.0);
  }
  EXPECT_FALSE(torch::equal(copy->forward(x), block->forward(x)));
}

TEST(NonLocalBlock, AcceptsMmcvModeNamesAndPrintsItsConfiguration) {
  NonLocalBlock block(NonLocalOptions(8).mode("dot_product").subsample(false));
  std::ostringstream text;
  block->pretty_print(text);
  EXPECT_EQ(text.str(),
            "dynattn::NonLocalBlock(channels=8, inter=4, dims=2, mode=dot, subsample=false, "
            "pool_first=true, logit_scale=1)");
  for (const std::string alias : {"embedded_gaussian", "concatenation"}) {
    EXPECT_EQ(NonLocalBlock(NonLocalOptions(8).mode(alias))
                  ->named_parameters()
                  .contains("concat_project.weight"),
              alias == "concatenation");
  }
}

TEST(NonLocalSlot, CreatesConfiguredBlocks) {
  auto module = dynattn::create_attention("nl", 16);
  auto* block = dynamic_cast<NonLocalBlockImpl*>(module.ptr().get());
  ASSERT_NE(block, nullptr);
  EXPECT_EQ(block->inter_channels(), 8);
  EXPECT_EQ(block->options.mode(), "embedded");
  EXPECT_TRUE(block->options.subsample());
  EXPECT_TRUE(block->options.pool_first());
  const auto x = torch::randn({2, 16, 4, 4});
  EXPECT_TRUE(torch::equal(module.forward(x), x));

  module = dynattn::create_attention(
      "nl:mode=gaussian,inter=4,subsample=0,pool_first=0,scale=channels,dims=1,max_affinity=64",
      16);
  block = dynamic_cast<NonLocalBlockImpl*>(module.ptr().get());
  ASSERT_NE(block, nullptr);
  EXPECT_EQ(block->inter_channels(), 4);
  EXPECT_EQ(block->options.mode(), "gaussian");
  EXPECT_FALSE(block->options.subsample());
  EXPECT_FALSE(block->options.pool_first());
  EXPECT_EQ(block->options.dims(), 1);
  EXPECT_EQ(block->options.max_affinity_elements(), 64);
  EXPECT_DOUBLE_EQ(block->logit_scale(), 0.25);
  EXPECT_EQ(
      dynattn::create_attention("nl:ratio=0.25", 16).ptr<NonLocalBlockImpl>()->inter_channels(), 4);

  EXPECT_THAT(error_of([] { dynattn::create_attention("nl:reduction=2", 16); }),
              HasSubstr("reduction"));
  EXPECT_THAT(error_of([] { dynattn::create_attention("nl:inter=4,ratio=0.5", 16); }),
              HasSubstr("give inter or ratio, not both"));
  EXPECT_THAT(error_of([] { dynattn::create_attention("nl:inter=0", 16); }),
              HasSubstr("inter_channels must be positive"));
  EXPECT_THAT(error_of([] { dynattn::create_attention("nl:mode=fancy", 16); }),
              HasSubstr("got 'fancy'"));
}

TEST(NonLocalSlot, GivesItsAffinityThroughABackbone) {
  dynattn::CifarResNet net(dynattn::CifarResNetOptions().depth(8).stage_attention("nl"));
  net->eval();
  const auto x = torch::randn({2, 1, 28, 28});
  const auto result = net->forward_with_maps(x);
  // Stage 1 at 28x28 (196 keys after 2x2 pooling), stage 2 at 14x14 (49 keys).
  EXPECT_EQ(result.maps.at("stage_attn1.affinity").sizes(), (std::vector<int64_t>{2, 1, 196}));
  EXPECT_EQ(result.maps.at("stage_attn2.affinity").sizes(), (std::vector<int64_t>{2, 1, 49}));
  EXPECT_TRUE(torch::equal(result.output, net->forward(x)));
}

TEST(NonLocalBlock, FusedAttentionGivesTheAtenFormsOutputAndGradients) {
  if (!fused_attention_applies()) GTEST_SKIP() << "no attention kernel in this build";
  for (const std::string mode : {"embedded", "gaussian"}) {
    for (bool subsample : {true, false}) {
      SCOPED_TRACE(mode + (subsample ? " subsampled" : ""));
      torch::manual_seed(9);
      NonLocalBlock block(NonLocalOptions(8).mode(mode).subsample(subsample));
      randomise(*block);
      block->eval();  // batch statistics would make z's bias gradient a sum of rounding errors
      auto block64 = clone_of(block);
      block64->to(torch::kDouble);
      const auto x = torch::randn({3, 8, 6, 5});
      // Output, input gradient and parameter gradients of one backward.
      auto run = [&](auto& b, bool fused) {
        const auto previous = dynattn::kernel_policy();
        dynattn::testing::set_dynattn_kernels(fused);
        b->zero_grad();
        const auto xx =
            x.to(b->g.ptr()->parameters()[0].scalar_type()).detach().clone().requires_grad_();
        const auto y = b->forward(xx);
        y.mul(torch::linspace(-1, 1, y.numel(), y.options()).view(y.sizes())).sum().backward();
        dynattn::set_kernel_policy(previous);
        std::vector<torch::Tensor> out = {y.detach(), xx.grad()};
        for (const auto& p : b->parameters()) out.push_back(p.grad().clone());
        return out;
      };
      const auto fused = run(block, true);
      const auto aten = run(block, false);
      const auto exact = run(block64, false);
      ASSERT_EQ(fused.size(), exact.size());
      // Against double: within 1e-5 of each tensor's scale (at least 1: phi's bias gradient is
      // zero in exact arithmetic, only the rounding of terms of order 1 is left), or no worse
      // than twice ATen's own float error.
      for (size_t i = 0; i < fused.size(); ++i) {
        SCOPED_TRACE("tensor " + std::to_string(i));
        const double fused_error =
            (fused[i].to(torch::kDouble) - exact[i]).abs().max().item<double>();
        const double aten_error =
            (aten[i].to(torch::kDouble) - exact[i]).abs().max().item<double>();
        EXPECT_LE(fused_error, std::max(2 * aten_error,
                                        1e-5 * std::max(1.0, exact[i].abs().max().item<double>())));
      }
    }
  }
}

TEST(NonLocalBlock, InferencePathEqualsTheDoubleAtenForm) {
  // Eval mode without autograd on float CPU input: oneDNN products with BN, g's bias and the
  // residual folded in, phi's bias dropped (the softmax cancels it), the attention kernel
  // between. Against the ATen form in double, 1-, 2- and 3-D, every pooling choice, biases and
  // running statistics random; then again after a weight changes in place.
  const std::vector<std::vector<int64_t>> shapes = {{3, 8, 11}, {2, 8, 7, 6}, {2, 8, 3, 5, 4}};
  for (const std::string mode : {"embedded", "gaussian"}) {
    for (const auto& shape : shapes) {
      for (const auto& [subsample, pool_first] :
           std::vector<std::pair<bool, bool>>{{true, true}, {true, false}, {false, true}}) {
        SCOPED_TRACE(mode + " dims " + std::to_string(shape.size() - 2) +
                     (subsample ? (pool_first ? " pooled first" : " pooled after") : ""));
        torch::manual_seed(12);
        NonLocalBlock block(NonLocalOptions(8)
                                .mode(mode)
                                .dims(static_cast<int64_t>(shape.size()) - 2)
                                .subsample(subsample)
                                .pool_first(pool_first));
        randomise(*block);
        block->eval();
        const auto x = torch::randn(shape);
        auto check = [&] {
          auto block64 = clone_of(block);
          block64->to(torch::kDouble);
          torch::NoGradGuard no_grad;
          expect_close(block->forward(x), block64->forward(x.to(torch::kDouble)), 1e-5);
          // The same MACs as the convolutions and products of the ATen form.
          const auto count = dynattn::count_macs([&] { block->forward(x); });
          const auto count64 = dynattn::count_macs([&] { block64->forward(x.to(torch::kDouble)); });
          EXPECT_EQ(count.macs, count64.macs);
          return count;
        };
        const auto count = check();
        if (fused_attention_applies() && count.calls.count("dynattn::pointwise_conv") == 0)
          ADD_FAILURE() << "the inference path did not run";
        {
          torch::NoGradGuard no_grad;
          block->named_parameters()["z.weight"].mul_(-2.0);
          block->named_buffers()["bn.running_mean"].add_(0.5);
        }
        check();
      }
    }
  }
}

TEST(NonLocalBlock, PoolingGradientGoesToTheFirstMaximum) {
  // Under autograd (kernel selection on) the 2x max-pool is a direct loop with its own backward.
  // Inputs with ties (small integers): its gradient goes to the window's first maximum, as
  // ATen's max_pool in double. (LibTorch 1.13's float max_pool picks another of the tied
  // elements: against the double form its input gradient is off by O(1) here.)
  const std::vector<std::vector<int64_t>> shapes = {{2, 4, 9}, {2, 4, 5, 7}, {1, 4, 3, 5, 3}};
  for (const auto& shape : shapes) {
    for (bool pool_first : {true, false}) {
      SCOPED_TRACE(std::to_string(shape.size() - 2) + "-D" + (pool_first ? " pool first" : ""));
      torch::manual_seed(3);
      NonLocalBlock block(
          NonLocalOptions(4).dims(static_cast<int64_t>(shape.size()) - 2).pool_first(pool_first));
      randomise(*block, 0.1);
      const auto x = torch::randint(0, 3, shape).to(torch::kFloat);
      auto block64 = clone_of(block);
      block64->to(torch::kDouble);
      auto input_gradient = [&](auto& b, bool kernels) {
        const auto previous = dynattn::kernel_policy();
        dynattn::testing::set_dynattn_kernels(kernels);
        const auto xx = x.to(b->g.ptr()->parameters()[0].scalar_type()).requires_grad_();
        const auto y = b->forward(xx);
        y.mul(torch::linspace(-1, 1, y.numel(), y.options()).view(y.sizes())).sum().backward();
        dynattn::set_kernel_policy(previous);
        return xx.grad();
      };
      expect_close(input_gradient(block, true), input_gradient(block64, false), 1e-5);
    }
  }
}

TEST(NonLocalBlock, PoolingMatchesTheAtenFormOnEveryPlaneSize) {
  // The direct 2x max-pool has two forms: small planes (windows in one vector, pooled rows within
  // four: up to 8x8, 7x9, ...) pick each window's elements by permutation; larger planes run two
  // passes over runs of planes. Every size from 2x2 to 12x12, with ties (small integers), against
  // the ATen form in double: the input gradient of the training path (to the window's first
  // maximum), and the inference output with a NaN in the second image (a key becomes NaN, and with
  // it every query of that image; the first image stays as it is; in training BN's batch
  // statistics would spread it).
  for (int64_t h = 2; h <= 12; ++h) {
    for (int64_t w = 2; w <= 12; ++w) {
      SCOPED_TRACE(std::to_string(h) + "x" + std::to_string(w));
      torch::manual_seed(h * 13 + w);
      NonLocalBlock block(NonLocalOptions(4));
      randomise(*block, 0.1);
      auto block64 = clone_of(block);
      block64->to(torch::kDouble);
      auto x = torch::randint(0, 3, {2, 4, h, w}).to(torch::kFloat);
      auto run = [&](auto& b, bool kernels, bool training) {
        const auto previous = dynattn::kernel_policy();
        dynattn::testing::set_dynattn_kernels(kernels);
        b->train(training);
        const auto xx = x.to(b->g.ptr()->parameters()[0].scalar_type());
        std::pair<torch::Tensor, torch::Tensor> out;
        if (training) {
          const auto input = xx.clone().requires_grad_();
          const auto y = b->forward(input);
          y.nan_to_num(0.0)
              .mul(torch::linspace(-1, 1, y.numel(), y.options()).view(y.sizes()))
              .sum()
              .backward();
          out = {y.detach(), input.grad()};
        } else {
          torch::NoGradGuard no_grad;
          out = {b->forward(xx), torch::Tensor()};
        }
        dynattn::set_kernel_policy(previous);
        return out;
      };
      const auto [y, dx] = run(block, true, true);
      const auto [y64, dx64] = run(block64, false, true);
      expect_close(dx, dx64, 1e-5);
      x[1][2][2 * (h / 2) - 1][2 * (w / 2) - 1] =
          std::numeric_limits<float>::quiet_NaN();  // in the last window
      const auto inference = run(block, true, false).first;
      const auto inference64 = run(block64, false, false).first;
      EXPECT_TRUE(torch::equal(inference.isnan(), inference64.isnan()));
      EXPECT_TRUE(inference[1].isnan().all().item<bool>());
      expect_close(inference[0], inference64[0], 1e-5);
    }
  }
}

TEST(NonLocalBlock, NaNInTheInputSpreadsAsOnTheAtenPath) {
  // A NaN in a pooling window makes that key NaN (max_pool keeps NaNs), so every query of its
  // image attends to it; the other image stays finite. Inference and training paths against the
  // ATen form, on maps whose windows the vector passes cover in several ways (odd sizes, planes
  // across a chunk boundary).
  for (const auto& shape : std::vector<std::vector<int64_t>>{{2, 8, 7, 7}, {2, 8, 6, 9}}) {
    for (bool training : {false, true}) {
      SCOPED_TRACE(std::string(training ? "training " : "inference ") + std::to_string(shape[3]));
      torch::manual_seed(4);
      NonLocalBlock block(NonLocalOptions(8));
      randomise(*block, 0.1);
      block->train(training);
      auto x = torch::randn(shape);
      x[0][3][2][4] = std::numeric_limits<float>::quiet_NaN();
      auto run = [&](bool kernels) {
        const auto previous = dynattn::kernel_policy();
        dynattn::testing::set_dynattn_kernels(kernels);
        torch::Tensor y;
        if (training) {
          y = block->forward(x.clone().requires_grad_());
        } else {
          torch::NoGradGuard no_grad;
          y = block->forward(x);
        }
        dynattn::set_kernel_policy(previous);
        return y.detach();
      };
      const auto fused = run(true), aten = run(false);
      EXPECT_TRUE(torch::equal(fused.isnan(), aten.isnan()));
      EXPECT_TRUE(fused[0].isnan().all().item<bool>()) << "a NaN key reaches every query";
      if (!training) EXPECT_TRUE(fused[1].isfinite().all().item<bool>());
    }
  }
}

TEST(NonLocalBlock, InferencePathWithParametersMadeUnderInferenceMode) {
  // Inference tensors keep no version counter: nothing folded from them may be reused after an
  // in-place change.
  c10::InferenceMode inference;
  torch::manual_seed(13);
  NonLocalBlock block(NonLocalOptions(8));
  randomise(*block);
  block->eval();
  const auto x = torch::randn({2, 8, 6, 6});
  auto reference = [&] {
    auto block64 = clone_of(block);
    block64->to(torch::kDouble);
    return block64->forward(x.to(torch::kDouble));
  };
  expect_close(block->forward(x), reference(), 1e-5);
  block->named_parameters()["z.weight"].mul_(-3.0);
  expect_close(block->forward(x), reference(), 1e-5);
}

TEST(NonLocalBlock, TrainingPathEqualsTheDoubleAtenForm) {
  // Training mode on float CPU input (embedded): one autograd node with a hand-written backward.
  // Output, input and parameter gradients and BN's running statistics against the ATen form in
  // double, 1-, 2- and 3-D, with and without sub-sampling, two steps (the running statistics
  // average over them).
  if (const char* why = block_path_ruled_out("training")) GTEST_SKIP() << "training path: " << why;
  const std::vector<std::vector<int64_t>> shapes = {{3, 8, 11}, {2, 8, 7, 6}, {2, 8, 3, 5, 4}};
  for (const auto& shape : shapes) {
    for (bool subsample : {true, false}) {
      SCOPED_TRACE(std::to_string(shape.size() - 2) + "-D" + (subsample ? " subsampled" : ""));
      torch::manual_seed(14);
      NonLocalBlock block(
          NonLocalOptions(8).dims(static_cast<int64_t>(shape.size()) - 2).subsample(subsample));
      randomise(*block);
      auto block64 = clone_of(block);
      block64->to(torch::kDouble);
      for (int step = 0; step < 2; ++step) {
        const auto x = torch::randn(shape);
        auto counted = clone_of(block);  // a forward of its own: the running statistics move
        const auto count = dynattn::count_macs([&] {
          c10::InferenceMode off(false);
          torch::AutoGradMode grad(true);
          training_step(*counted, x);
        });
        if (fused_attention_applies() && count.calls.count("dynattn::pointwise_conv") == 0)
          ADD_FAILURE() << "the training path did not run";
        const auto fused = training_step(*block, x);
        const auto exact = training_step(*block64, x);
        ASSERT_EQ(fused.size(), exact.size());
        for (size_t i = 0; i < fused.size(); ++i) {
          SCOPED_TRACE("tensor " + std::to_string(i) + ", step " + std::to_string(step));
          expect_close(fused[i], exact[i], 1e-5, 1.0);
        }
        // The inference form folded from the statistics this step wrote is rebuilt.
        block->eval();
        block64->eval();
        {
          torch::NoGradGuard no_grad;
          expect_close(block->forward(x), block64->forward(x.to(torch::kDouble)), 1e-5);
        }
        block->train();
        block64->train();
      }
    }
  }
}

TEST(NonLocalBlock, InferencePoolingEqualsTheAutogradPath) {
  // Without autograd the 2x max-pool of phi/g runs as a direct loop; with autograd as max_pool.
  // Same maxima, for 1-, 2- and 3-D inputs with odd sizes, pooled first or after the convs.
  const std::vector<std::vector<int64_t>> shapes = {{2, 4, 9}, {2, 4, 5, 7}, {1, 4, 3, 5, 3}};
  for (const auto& shape : shapes) {
    for (bool pool_first : {true, false}) {
      SCOPED_TRACE(std::to_string(shape.size() - 2) + "-D" + (pool_first ? " pool first" : ""));
      torch::manual_seed(2);
      NonLocalBlock block(
          NonLocalOptions(4).dims(static_cast<int64_t>(shape.size()) - 2).pool_first(pool_first));
      randomise(*block);
      block->eval();
      const auto x = torch::randn(shape);
      torch::Tensor direct;
      {
        torch::NoGradGuard no_grad;
        direct = block->forward(x);
      }
      const auto pooled = block->forward(x.clone().requires_grad_()).detach();
      EXPECT_TRUE(direct.allclose(pooled, 1e-6, 1e-6));
    }
  }
}

TEST(NonLocalBlock, ZAppliedToTheKeysFirstEqualsTheDoubleAtenForm) {
  // With few keys against the queries and channels (here 32 channels at 7x7, sub-sampled to 3x3
  // keys), the fast paths compute (W_z g) P^T instead of W_z (g P^T). Training (output, input
  // and parameter gradients, running statistics) and inference (embedded and gaussian) against
  // the ATen form in double; and that form is the one taken, and not at 14x14.
  if (const char* why = block_path_ruled_out("inference_z_on_keys"))
    GTEST_SKIP() << "z-on-keys path: " << why;
  const auto x = torch::randn({3, 32, 7, 7});
  for (const std::string mode : {"embedded", "gaussian"}) {
    SCOPED_TRACE(mode);
    torch::manual_seed(15);
    NonLocalBlock block(NonLocalOptions(32).mode(mode));
    randomise(*block, 0.2);
    auto block64 = clone_of(block);
    block64->to(torch::kDouble);
    if (mode == "embedded") {
      EXPECT_TRUE(block->projects_z_on_keys(x.clone().requires_grad_()));
      const auto fused = training_step(*block, x);
      const auto exact = training_step(*block64, x);
      ASSERT_EQ(fused.size(), exact.size());
      for (size_t i = 0; i < fused.size(); ++i) {
        SCOPED_TRACE("training, tensor " + std::to_string(i));
        expect_close(fused[i], exact[i], 1e-5, 1.0);
      }
    }
    block->eval();
    block64->eval();
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(block->projects_z_on_keys(x));
    EXPECT_FALSE(block->projects_z_on_keys(torch::randn({3, 32, 14, 14})));
    expect_close(block->forward(x), block64->forward(x.to(torch::kDouble)), 1e-5);
    // The MACs of the block as defined, not of the form run.
    EXPECT_EQ(dynattn::count_macs([&] { block->forward(x); }).macs,
              dynattn::count_macs([&] { block64->forward(x.to(torch::kDouble)); }).macs);
  }
}
