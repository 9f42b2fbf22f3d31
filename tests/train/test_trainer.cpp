#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dynattn/io/checkpoint.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/train/evaluate.h"
#include "dynattn/train/trainer.h"

using namespace dynattn;
using ::testing::HasSubstr;

namespace {

// A linear classifier on 8x8 images: trains in milliseconds, so the tests exercise the
// trainer's mechanics rather than a network.
struct TestLinearImpl : torch::nn::Cloneable<TestLinearImpl> {
  explicit TestLinearImpl(int64_t classes) : classes(classes) { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(64, classes)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x.flatten(1)); }
  int64_t classes;
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(TestLinear);

void register_test_models() {
  static bool done = false;
  if (done) return;
  done = true;
  register_model(
      {"test_linear", "linear classifier for tests", {"classes"}, [](const OptionMap& o) {
         return torch::nn::AnyModule(TestLinear(o.get_int("classes", 4)));
       }});
  // Always predicts class 0: a known confusion matrix.
  register_model({"test_always0", "constant prediction", {}, [](const OptionMap&) {
                    return torch::nn::AnyModule(torch::nn::Functional([](const torch::Tensor& x) {
                      auto logits = torch::zeros({x.size(0), 4});
                      logits.select(1, 0).fill_(1.0);
                      return logits;
                    }));
                  }});
}

// Class c has mean brightness (c + 1) / 5 plus noise: linearly separable enough.
InMemoryDataset synthetic(int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  auto labels = torch::randint(0, 4, {n}, gen, torch::kInt64);
  auto images = (labels.to(torch::kFloat).add(1.0).div(5.0)).view({n, 1, 1, 1}) +
                0.1 * torch::randn({n, 1, 8, 8}, gen);
  return InMemoryDataset(images.clamp(0, 1), labels);
}

// Fresh directories, removed when the test program exits.
std::string temp_dir() {
  struct Registry {
    std::vector<std::string> dirs;
    ~Registry() {
      for (const auto& d : dirs) std::filesystem::remove_all(d);
    }
  };
  static Registry registry;
  char tmpl[] = "/tmp/dynattn-trainer-XXXXXX";
  const char* d = mkdtemp(tmpl);
  if (d == nullptr) return "";
  registry.dirs.push_back(d);
  return d;
}

TrainOptions quick(const std::string& out, int64_t epochs) {
  return TrainOptions()
      .epochs(epochs)
      .batch_size(32)
      .optimizer(OptimizerOptions().lr(0.05))
      .warmup_epochs(0.5)
      .out_dir(out)
      .progress(0);
}

NamedTensors weights_of(Model& m) {
  return state_dict(*m.ptr());
}

}  // namespace

TEST(Trainer, LearnsAndWritesCheckpointAndMetrics) {
  register_test_models();
  const std::string dir = temp_dir();
  auto data = synthetic(512, 1);
  auto val = synthetic(128, 2);
  Model model = create_model("test_linear");
  auto result = train_model(model, data, &val, quick(dir, 3).optimizer(OptimizerOptions().lr(0.5)));
  ASSERT_FALSE(result.stopped);
  ASSERT_EQ(result.history.size(), 3u);
  EXPECT_LT(result.history.back().train_loss, result.history.front().train_loss);
  EXPECT_GT(result.history.back().val_accuracy, 0.8);
  std::ifstream jsonl(dir + "/metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(jsonl, line)) {
    auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["epoch"].get<int64_t>(), ++lines);
  }
  EXPECT_EQ(lines, 3);
  auto ckpt = read_checkpoint(dir, /*with_optimizer=*/true);
  EXPECT_EQ(ckpt.epoch, 3);
  EXPECT_EQ(ckpt.model_spec, "test_linear");
  EXPECT_FALSE(ckpt.optimizer.empty());
  auto meta = nlohmann::json::parse(ckpt.meta_json);
  EXPECT_EQ(meta["history"].size(), 3u);
  EXPECT_EQ(meta["train_options"]["batch_size"].get<int64_t>(), 32);
  // The checkpoint alone rebuilds the trained model.
  Model loaded = load_checkpoint_model(dir);
  auto x = synthetic(16, 9).images();
  model.ptr()->eval();
  EXPECT_TRUE(torch::equal(loaded.forward(x), model.forward(x)));
}

// A run interrupted after epoch 2 and resumed ends with exactly the weights of a run that
// was never interrupted: same shuffles, same schedule, same optimizer state.
TEST(Trainer, ResumeReproducesTheUninterruptedRun) {
  register_test_models();
  auto data = synthetic(256, 3);
  torch::manual_seed(7);
  Model a = create_model("test_linear");
  const std::string dir_a = temp_dir();
  train_model(a, data, nullptr, quick(dir_a, 4).crop_padding(1).flip(true));

  torch::manual_seed(7);
  Model b = create_model("test_linear");
  const std::string dir_b = temp_dir();
  int64_t steps = 0;
  TrainHooks crash;
  crash.step = [&](Model& m, const torch::Tensor& x, const torch::Tensor& y) {
    // 8 batches per epoch: fail in the middle of epoch 3.
    if (++steps == 2 * 8 + 3) throw std::runtime_error("simulated crash");
    auto logits = m.forward(x);
    return StepOutput{torch::nn::functional::cross_entropy(logits, y), logits};
  };
  EXPECT_THROW(train_model(b, data, nullptr, quick(dir_b, 4).crop_padding(1).flip(true), crash),
               std::runtime_error);
  EXPECT_EQ(read_checkpoint(dir_b).epoch, 2);

  torch::manual_seed(123);  // a different init: resume must overwrite it
  Model c = create_model("test_linear");
  auto result =
      train_model(c, data, nullptr, quick(dir_b, 4).crop_padding(1).flip(true).resume(true));
  ASSERT_EQ(result.history.size(), 4u);
  auto wa = weights_of(a);
  auto wc = weights_of(c);
  ASSERT_EQ(wa.size(), wc.size());
  for (size_t i = 0; i < wa.size(); ++i) {
    EXPECT_TRUE(torch::allclose(wa[i].second, wc[i].second, 1e-6, 1e-7)) << wa[i].first;
  }
}

TEST(Trainer, NonFiniteLossStopsAndKeepsTheLastGoodCheckpoint) {
  register_test_models();
  auto data = synthetic(128, 4);
  Model model = create_model("test_linear");
  const std::string dir = temp_dir();
  int64_t steps = 0;
  TrainHooks hooks;
  hooks.step = [&](Model& m, const torch::Tensor& x, const torch::Tensor& y) {
    auto logits = m.forward(x);
    auto loss = torch::nn::functional::cross_entropy(logits, y);
    // 4 batches per epoch: the second batch of epoch 2 diverges.
    if (++steps == 6) loss = loss * std::numeric_limits<float>::quiet_NaN();
    return StepOutput{loss, logits};
  };
  auto result = train_model(model, data, nullptr, quick(dir, 3), hooks);
  EXPECT_TRUE(result.stopped);
  EXPECT_THAT(result.stop_reason, HasSubstr("NaN at epoch 2, batch 2"));
  EXPECT_THAT(result.stop_reason, HasSubstr("last good checkpoint (epoch 1)"));
  EXPECT_EQ(read_checkpoint(dir).epoch, 1);
  // The weights on disk are finite (the NaN step never reached them).
  for (const auto& kv : read_checkpoint(dir).weights) {
    EXPECT_TRUE(torch::isfinite(kv.second).all().item<bool>()) << kv.first;
  }
}

TEST(Trainer, ResumeRefusesAnotherModelOrAMissingRun) {
  register_test_models();
  auto data = synthetic(64, 5);
  const std::string dir = temp_dir();
  Model model = create_model("test_linear");
  train_model(model, data, nullptr, quick(dir, 1));
  Model other = create_model("test_linear:classes=5");
  try {
    train_model(other, data, nullptr, quick(dir, 2).resume(true));
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("holds model 'test_linear'"));
  }
  Model fresh = create_model("test_linear");
  EXPECT_THROW(train_model(fresh, data, nullptr, quick(temp_dir(), 2).resume(true)), c10::Error);
  EXPECT_THROW(train_model(fresh, data, nullptr, quick("", 2).resume(true)), c10::Error);
}

TEST(Trainer, OptimizerStateFromAnotherEpochIsDetected) {
  register_test_models();
  auto data = synthetic(64, 6);
  const std::string dir = temp_dir();
  Model model = create_model("test_linear");
  train_model(model, data, nullptr, quick(dir, 1));
  // Simulate a crash between the renames: the optimizer file says epoch 5.
  auto opt = read_safetensors(dir + "/optimizer.safetensors");
  write_safetensors(dir + "/optimizer.safetensors", opt.tensors,
                    {{"dynattn", R"({"model":"test_linear","epoch":5})"}});
  try {
    read_checkpoint(dir, /*with_optimizer=*/true);
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("optimizer state is from epoch 5"));
  }
}

TEST(Evaluate, ConfusionMatrixAndPerClassAccuracy) {
  register_test_models();
  auto labels = torch::tensor({0, 0, 1, 2, 2, 2, 3}, torch::kInt64);
  InMemoryDataset data(torch::zeros({7, 1, 8, 8}), labels);
  Model model = create_model("test_always0");
  auto r = evaluate(model, data, EvalOptions().batch_size(3).num_classes(4));
  EXPECT_EQ(r.count, 7);
  EXPECT_NEAR(r.accuracy, 2.0 / 7.0, 1e-12);
  auto expected =
      torch::tensor({2, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0}, torch::kInt64).view({4, 4});
  EXPECT_TRUE(torch::equal(r.confusion, expected)) << r.confusion;
  EXPECT_EQ(r.per_class, (std::vector<double>{1.0, 0.0, 0.0, 0.0}));
  EXPECT_THROW(evaluate(model, data, EvalOptions().num_classes(3)), c10::Error);
}

TEST(Checkpoint, LoadStateDictReportsEveryProblem) {
  torch::nn::Linear lin(3, 2);
  NamedTensors bad{{"weight", torch::zeros({2, 4})}, {"extra", torch::zeros({1})}};
  try {
    load_state_dict(*lin, bad, "w.safetensors");
    FAIL();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_THAT(msg, HasSubstr("w.safetensors"));
    EXPECT_THAT(msg, HasSubstr("missing 'bias'"));
    EXPECT_THAT(msg, HasSubstr("unexpected 'extra'"));
    EXPECT_THAT(msg, HasSubstr("'weight' has shape [2, 4], the model expects [2, 3]"));
  }
  // Half-precision weights load into a float model.
  NamedTensors half{{"weight", torch::ones({2, 3}, torch::kHalf)},
                    {"bias", torch::zeros({2}, torch::kBFloat16)}};
  load_state_dict(*lin, half, "half");
  EXPECT_TRUE(torch::equal(lin->weight, torch::ones({2, 3})));
}

TEST(Checkpoint, PlainWeightsFileIsNotACheckpoint) {
  const std::string dir = temp_dir();
  write_safetensors(dir + "/w.safetensors", {{"weight", torch::zeros({2})}});
  try {
    read_checkpoint(dir + "/w.safetensors");
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("no dynattn metadata"));
  }
}
