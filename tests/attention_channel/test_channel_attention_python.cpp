// Parity with the public Python implementations: reference_channel_attention.py transcribes
// timm's SEModule / EcaModule / CbamModule and the official CBAM / BAM under their own parameter
// names, loads our weights through the name mapping the importers use, and returns eval- and
// train-mode outputs and the BN statistics after one train-mode forward.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "channel_test_util.h"
#include "dynattn/attention/bam.h"
#include "dynattn/attention/cbam.h"
#include "dynattn/attention/efficient_channel_attention.h"
#include "dynattn/attention/squeeze_excitation.h"
#include "dynattn/io/safetensors.h"

namespace fs = std::filesystem;
using namespace dynattn;

namespace {

const std::string kPython = "/usr/bin/python3";
const std::string kScript =
    std::string(DYNATTN_SOURCE_DIR) + "/tests/attention_channel/reference_channel_attention.py";

int run(const std::string& command) {
  const int status = std::system(command.c_str());
  return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

struct Case {
  std::string name;
  nlohmann::json reference;  // what the Python side builds
  std::function<std::shared_ptr<torch::nn::Module>()> build;
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
};

template <class Holder>
Case make_case(const std::string& name, nlohmann::json reference, std::function<Holder()> build) {
  return {name, std::move(reference), [build] { return build().ptr(); },
          [](torch::nn::Module& m, const torch::Tensor& x) {
            return dynamic_cast<typename Holder::ContainedType&>(m).forward(x);
          }};
}

std::vector<Case> cases() {
  return {
      make_case<SqueezeExcitation>("se_floor", {{"kind", "timm_se"}, {"channels", 32}, {"rd", 2}},
                                   [] { return SqueezeExcitation(32); }),
      make_case<SqueezeExcitation>(
          "se_timm", {{"kind", "timm_se"}, {"channels", 64}, {"gate", "hard_sigmoid"}},
          [] {
            return SqueezeExcitation(
                SqueezeExcitationOptions(64).reduction_policy("divisible").gate("hard_sigmoid"));
          }),
      make_case<EfficientChannelAttention>("eca_64", {{"kind", "timm_eca"}, {"channels", 64}},
                                           [] { return EfficientChannelAttention(64); }),
      make_case<EfficientChannelAttention>("eca_256", {{"kind", "timm_eca"}, {"channels", 256}},
                                           [] { return EfficientChannelAttention(256); }),
      make_case<CBAM>("cbam_official", {{"kind", "official_cbam"}, {"channels", 32}},
                      [] { return CBAM(32); }),
      make_case<CBAM>("cbam_timm", {{"kind", "timm_cbam"}, {"channels", 40}},
                      [] { return CBAM(CBAMOptions::timm(40)); }),
      make_case<BAM>("bam_official",
                     {{"kind", "official_bam"}, {"channels", 32}, {"product", true}},
                     [] { return BAM(BAMOptions(32).product(true)); }),
      make_case<BAM>("bam_paper", {{"kind", "official_bam"}, {"channels", 32}, {"product", false}},
                     [] { return BAM(32); }),
  };
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

class ChannelAttentionPython : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (run(kPython + " -c 'import torch' > /dev/null 2>&1") != 0) {
      skip_reason_ = kPython + " cannot import torch (scripts/install-deps.sh installs it)";
      return;
    }
    char tmpl[] = "/tmp/dynattn_channel_attn_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    nlohmann::json meta = nlohmann::json::object();
    uint64_t seed = 100;
    for (const auto& c : cases()) {
      auto module = c.build();
      test_util::randomize(*module, seed++);
      modules_[c.name] = module;
      inputs_[c.name] = torch::randn({4, c.reference["channels"].get<int64_t>(), 6, 6});
      tensors.emplace_back(c.name + "/input", inputs_[c.name]);
      for (const auto& p : module->named_parameters())
        tensors.emplace_back(c.name + "/" + p.key(), p.value());
      for (const auto& b : module->named_buffers())
        tensors.emplace_back(c.name + "/" + b.key(), b.value());
      meta[c.name] = c.reference;
    }
    write_safetensors(dir_ + "/in.safetensors", tensors, {{"cases", meta.dump()}});
    const std::string cmd =
        kPython + " '" + kScript + "' '" + dir_ + "/in.safetensors' '" + dir_ + "/out.safetensors'";
    ASSERT_EQ(run(cmd), 0) << cmd;
    reference_ = read_safetensors(dir_ + "/out.safetensors").as_map();
    ready_ = true;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
    ready_ = false;
    modules_.clear();
    inputs_.clear();
    reference_.clear();
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    if (!ready_) FAIL() << "the Python reference " << kScript << " did not run";
  }

  // Eval then train forward of one case against the reference, and the BN statistics after.
  void check(const std::string& name) {
    ASSERT_TRUE(modules_.count(name)) << name;
    const Case* c = nullptr;
    static const auto all = cases();
    for (const auto& k : all)
      if (k.name == name) c = &k;
    ASSERT_NE(c, nullptr);
    auto& module = *modules_[name];
    const auto& x = inputs_[name];
    torch::NoGradGuard no_grad;
    module.eval();
    auto eval_out = c->forward(module, x);
    ASSERT_TRUE(reference_.count(name + "/eval"));
    EXPECT_TRUE(test_util::close_to_reference(eval_out, reference_[name + "/eval"]))
        << name << " eval: max abs diff "
        << test_util::max_abs_diff(eval_out, reference_[name + "/eval"]);
    module.train();
    auto train_out = c->forward(module, x);
    EXPECT_TRUE(test_util::close_to_reference(train_out, reference_[name + "/train"]))
        << name << " train: max abs diff "
        << test_util::max_abs_diff(train_out, reference_[name + "/train"]);
    for (const auto& b : module.named_buffers()) {
      if (!ends_with(b.key(), "running_mean") && !ends_with(b.key(), "running_var")) continue;
      const std::string key = name + "/after/" + b.key();
      ASSERT_TRUE(reference_.count(key)) << key;
      EXPECT_TRUE(test_util::close_to_reference(b.value(), reference_[key])) << key;
    }
  }

  static inline bool ready_ = false;
  static inline std::string skip_reason_;
  static inline std::string dir_;
  static inline std::map<std::string, std::shared_ptr<torch::nn::Module>> modules_;
  static inline std::map<std::string, torch::Tensor> inputs_;
  static inline std::map<std::string, torch::Tensor> reference_;
};

}  // namespace

TEST_F(ChannelAttentionPython, SqueezeExcitationMatchesTimmWithThePapersWidth) {
  check("se_floor");
}
TEST_F(ChannelAttentionPython, SqueezeExcitationTimmPresetMatchesTimm) {
  check("se_timm");
}
TEST_F(ChannelAttentionPython, EcaMatchesTimm) {
  check("eca_64");
  check("eca_256");
}
TEST_F(ChannelAttentionPython, CbamMatchesTheOfficialCode) {
  check("cbam_official");
}
TEST_F(ChannelAttentionPython, CbamTimmPresetMatchesTimm) {
  check("cbam_timm");
}
TEST_F(ChannelAttentionPython, BamProductMatchesTheOfficialCode) {
  check("bam_official");
}
TEST_F(ChannelAttentionPython, BamSumMatchesThePaperForm) {
  check("bam_paper");
}
