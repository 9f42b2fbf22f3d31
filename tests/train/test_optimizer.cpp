#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/train/optimizer.h"
#include "dynattn/train/schedule.h"

using namespace dynattn;

namespace {

// A small model with 2-D and 1-D parameters.
torch::nn::Sequential tiny_model() {
  torch::manual_seed(3);
  return torch::nn::Sequential(torch::nn::Linear(5, 4), torch::nn::ReLU(), torch::nn::Linear(4, 3));
}

void fill_grads(torch::nn::Module& m, int step) {
  torch::manual_seed(100 + step);
  for (auto& p : m.parameters()) p.mutable_grad() = torch::randn_like(p);
}

void expect_same_params(torch::nn::Module& a, torch::nn::Module& b, double tol) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::allclose(pa[i], pb[i], tol, tol)) << "parameter " << i;
  }
}

}  // namespace

// Our SGD must follow torch.optim.SGD exactly (LibTorch's C++ port is the reference).
TEST(Optimizer, SgdMatchesTorchOptim) {
  for (bool nesterov : {false, true}) {
    auto ours_model = tiny_model();
    auto ref_model = tiny_model();
    auto ours = make_optimizer(
        *ours_model,
        OptimizerOptions().name("sgd").lr(0.05).momentum(0.9).nesterov(nesterov).weight_decay(
            1e-2));
    torch::optim::SGD ref(
        ref_model->parameters(),
        torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(nesterov).weight_decay(1e-2));
    for (int s = 0; s < 5; ++s) {
      fill_grads(*ours_model, s);
      fill_grads(*ref_model, s);
      ours->step();
      ref.step();
    }
    expect_same_params(*ours_model, *ref_model, 1e-6);
  }
}

TEST(Optimizer, AdamWMatchesTorchOptim) {
  auto ours_model = tiny_model();
  auto ref_model = tiny_model();
  auto ours =
      make_optimizer(*ours_model, OptimizerOptions().name("adamw").lr(1e-2).weight_decay(0.05));
  torch::optim::AdamW ref(ref_model->parameters(),
                          torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
  for (int s = 0; s < 6; ++s) {
    fill_grads(*ours_model, s);
    fill_grads(*ref_model, s);
    ours->step();
    ref.step();
  }
  expect_same_params(*ours_model, *ref_model, 1e-6);
}

TEST(Optimizer, NormAndBiasCanBeLeftOutOfWeightDecay) {
  auto model = tiny_model();
  auto opt = make_optimizer(
      *model,
      OptimizerOptions().name("sgd").lr(0.1).momentum(0).weight_decay(0.5).decay_norm_and_bias(
          false));
  std::vector<torch::Tensor> before;
  for (auto& p : model->parameters()) {
    before.push_back(p.detach().clone());
    p.mutable_grad() = torch::zeros_like(p);
  }
  opt->step();
  auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].dim() == 1) {
      EXPECT_TRUE(torch::equal(params[i], before[i])) << "bias " << i << " was decayed";
    } else {
      EXPECT_TRUE(torch::allclose(params[i], before[i] * 0.95)) << "weight " << i;
    }
  }
}

// Saving and restoring the named state continues the run exactly.
TEST(Optimizer, StateRoundTripContinuesIdentically) {
  for (const std::string name : {"sgd", "adamw"}) {
    auto a = tiny_model();
    auto opt_a = make_optimizer(*a, OptimizerOptions().name(name).lr(0.01));
    for (int s = 0; s < 3; ++s) {
      fill_grads(*a, s);
      opt_a->step();
    }
    auto b = tiny_model();
    {
      torch::NoGradGuard g;
      for (size_t i = 0; i < a->parameters().size(); ++i)
        b->parameters()[i].copy_(a->parameters()[i]);
    }
    auto opt_b = make_optimizer(*b, OptimizerOptions().name(name).lr(0.01));
    NamedTensors saved;
    for (auto& kv : opt_a->state()) saved.emplace_back(kv.first, kv.second.clone());
    opt_b->load_state(saved, "test");
    for (int s = 3; s < 6; ++s) {
      fill_grads(*a, s);
      fill_grads(*b, s);
      opt_a->step();
      opt_b->step();
    }
    expect_same_params(*a, *b, 0);
  }
}

TEST(Optimizer, StateKeysUseParameterNames) {
  auto model = tiny_model();
  auto opt = make_optimizer(*model, OptimizerOptions().name("sgd"));
  fill_grads(*model, 0);
  opt->step();
  std::vector<std::string> keys;
  for (auto& kv : opt->state()) keys.push_back(kv.first);
  EXPECT_THAT(keys, ::testing::Contains("0.weight.momentum_buffer"));
  EXPECT_THAT(keys, ::testing::Contains("2.bias.momentum_buffer"));
}

TEST(Optimizer, ErrorsAreClear) {
  auto model = tiny_model();
  try {
    make_optimizer(*model, OptimizerOptions().name("rmsprop"));
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), ::testing::HasSubstr("unknown 'rmsprop'"));
  }
  EXPECT_THROW(make_optimizer(*model, OptimizerOptions().lr(-1)), c10::Error);
  auto opt = make_optimizer(*model, OptimizerOptions().name("adamw"));
  try {
    opt->load_state({}, "ckpt/optimizer.safetensors");
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), ::testing::HasSubstr("ckpt/optimizer.safetensors"));
  }
}

TEST(Schedule, WarmupThenCosineToZero) {
  CosineSchedule s;
  s.base_lr = 0.1;
  s.warmup_steps = 10;
  s.total_steps = 110;
  EXPECT_NEAR(s.lr(0), 0.01, 1e-12);
  EXPECT_NEAR(s.lr(9), 0.1, 1e-12);
  EXPECT_NEAR(s.lr(10), 0.1, 1e-12);
  EXPECT_NEAR(s.lr(60), 0.05, 1e-12);  // half-way through the decay
  EXPECT_NEAR(s.lr(110), 0.0, 1e-12);
  for (int64_t t = 11; t < 110; ++t) EXPECT_LT(s.lr(t), s.lr(t - 1));
}
