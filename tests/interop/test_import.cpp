// Weights exported from the public Python implementations load into our modules through the key
// maps, and the outputs match. The Python side (reference_attention.py, Debian's python3-torch)
// re-implements timm's SEModule, EcaModule, CbamModule, NonLocalAttn, the CBAM authors' code, and
// RepVGG (reference_repvgg.py: the authors' repvgg.py and timm's ByobNet) with their own parameter
// names; nothing here is shared with our C++ except the file format.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "dynattn/core/compat.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/key_map.h"
#include "dynattn/io/safetensors.h"
#include "dynattn/models/registry.h"
#include "dynattn/reparam/deploy.h"

namespace fs = std::filesystem;

namespace {

const char* kPython = "/usr/bin/python3";

// The reference files, written once per test run into a temporary directory.
class ImportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system((std::string(kPython) + " -c 'import torch' >/dev/null 2>&1").c_str()) != 0)
      return;
    dir_ = (fs::temp_directory_path() / ("dynattn-import-" + std::to_string(::getpid()))).string();
    for (const char* script : {"reference_attention.py", "reference_repvgg.py"}) {
      const std::string cmd = std::string(kPython) + " " DYNATTN_SOURCE_DIR "/tests/interop/" +
                              script + " --out " + dir_ + " >/dev/null";
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
  }
  static void TearDownTestSuite() {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  void SetUp() override {
    if (dir_.empty()) GTEST_SKIP() << kPython << " has no torch (install python3-torch)";
  }

  // Loads case `name` into `spec` through `key_map` and compares with the Python output.
  void expect_matches(const std::string& name, const std::string& spec,
                      const std::string& key_map) {
    auto model = dynattn::create_model_or_attention(spec);
    const auto weights = dynattn::read_safetensors(dir_ + "/" + name + ".weights.safetensors");
    const auto mapped =
        dynattn::apply_key_map(weights.tensors, dynattn::get_key_map(key_map), *model.ptr(), name);
    dynattn::load_state_dict(*model.ptr(), mapped, name);
    model.ptr()->eval();
    const auto io = dynattn::read_safetensors(dir_ + "/" + name + ".io.safetensors");
    dynattn::InferenceGuard guard;
    const auto y = model.forward(*io.find("x"));
    const auto& expected = *io.find("y");
    ASSERT_EQ(y.sizes(), expected.sizes()) << name;
    const double scale = expected.abs().max().item<double>();
    EXPECT_LE((y - expected).abs().max().item<double>(), 1e-5 * std::max(1.0, scale))
        << name << " loaded into " << spec << " with key map " << key_map;
    // Loading is not a no-op: a fresh module gives something else.
    auto fresh = dynattn::create_model_or_attention(spec);
    fresh.ptr()->eval();
    EXPECT_GT((fresh.forward(*io.find("x")) - expected).abs().max().item<double>(), 1e-3) << name;
  }

  static std::string dir_;
};
std::string ImportTest::dir_;

}  // namespace

TEST_F(ImportTest, TimmSEModule) {
  // timm rounds C/16 = 4 up to a multiple of 8.
  expect_matches("timm_se", "se:channels=64,policy=divisible", "timm");
}

TEST_F(ImportTest, TimmEcaModule) {
  expect_matches("timm_eca", "eca:channels=64", "timm");
}

TEST_F(ImportTest, TimmCbamModule) {
  expect_matches("timm_cbam", "cbam:channels=64,max_first=false,mlp_bias=false", "timm");
}

TEST_F(ImportTest, OfficialCbam) {
  expect_matches("official_cbam", "cbam:channels=64", "cbam-official");
}

TEST_F(ImportTest, TimmNonLocalAttn) {
  // timm: width make_divisible(C/8, 8), scale 1/sqrt(C), no sub-sampling.
  expect_matches("timm_nl", "nl:channels=32,inter=8,scale=channels,subsample=false", "timm");
}

TEST_F(ImportTest, OfficialRepVGG) {
  expect_matches("official_repvgg_a0", "repvgg_a0", "repvgg-official");
}

TEST_F(ImportTest, OfficialRepVGGDeployedByTheAuthorsCode) {
  // The authors' switch_to_deploy() output (rbr_reparam) loads into our deployed form.
  expect_matches("official_repvgg_a0g2_deployed", "repvgg_a0g2:deployed=true", "repvgg-official");
}

TEST_F(ImportTest, TimmRepVGG) {
  expect_matches("timm_repvgg_a0g4", "repvgg_a0g4", "timm");
}

TEST_F(ImportTest, OfficialRepVGGDeploysToTheSameOutput) {
  // Train-form weights of the authors' code, deployed by our deploy(): same output.
  auto model = dynattn::create_model("repvgg_a0");
  const auto weights = dynattn::read_safetensors(dir_ + "/official_repvgg_a0.weights.safetensors");
  dynattn::load_state_dict(*model.ptr(), weights.tensors, "official_repvgg_a0");
  model.ptr()->eval();
  const auto report = dynattn::deploy(model, {2, 1, 28, 28});
  EXPECT_EQ(report.merged.size(), 22u);  // stage0 + 2 + 4 + 14 + 1 blocks
  const auto io = dynattn::read_safetensors(dir_ + "/official_repvgg_a0.io.safetensors");
  dynattn::InferenceGuard guard;
  const auto& expected = *io.find("y");
  EXPECT_LE((model.forward(*io.find("x")) - expected).abs().max().item<double>(),
            1e-5 * std::max(1.0, expected.abs().max().item<double>()));
}
