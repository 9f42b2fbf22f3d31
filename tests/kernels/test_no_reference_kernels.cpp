// Which implementation runs, not how fast: every zoo model and its deployed form, in inference
// (batch 1 and 8, contiguous and channels-last) and one training step, must not execute a oneDNN
// reference kernel ("ref:any", 1000x slower than the JIT ones) nor a convolution in the channel
// block of another ISA. ctest runs this executable natively and under ONEDNN_MAX_CPU_ISA=AVX2
// (tests/CMakeLists.txt), which also switches dynattn's 16-float forms off (ops/dispatch.h), so
// an AVX-512 machine checks the choices an AVX2 one makes.
//
// oneDNN's own verbose log is the witness: it names the implementation of every primitive it
// executes, ATen's and dynattn's alike.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dynattn/core/compat.h"
#include "dynattn/models/registry.h"
#include "dynattn/ops/dispatch.h"
#include "dynattn/reparam/deploy.h"

namespace {

// oneDNN reads its verbose setting once, at its first primitive: set it before anything runs.
[[maybe_unused]] const bool verbose_requested = [] {
  setenv("ONEDNN_VERBOSE", "1", 1);
  setenv("DNNL_VERBOSE", "1", 1);
  return true;
}();

// Runs `body` with file descriptor 1 redirected to a temporary file, and returns what was written.
template <class F>
std::string captured_stdout(F&& body) {
  std::fflush(stdout);
  char path[] = "/tmp/dynattn_verbose_XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0) << "cannot create a temporary file for the capture";
  if (fd < 0) return {};
  const int saved = dup(1);
  dup2(fd, 1);
  try {
    body();
  } catch (...) {
    std::fflush(stdout);
    dup2(saved, 1);
    close(saved);
    close(fd);
    unlink(path);
    throw;
  }
  std::fflush(stdout);
  dup2(saved, 1);
  close(saved);
  close(fd);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  unlink(path);
  return text.str();
}

struct VerboseSummary {
  int64_t executions = 0;
  std::vector<std::string> offending;  // reference kernels, or another ISA's channel blocks
};

// Lines "onednn_verbose,exec,cpu,<primitive>,<implementation>,<prop>,<memory descs>,...".
VerboseSummary summarise(const std::string& log) {
  VerboseSummary s;
  const bool avx512 = dynattn::cpu_capability().onednn_block == 16;
  std::istringstream lines(log);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("onednn_verbose,exec,", 0) != 0 && line.rfind("dnnl_verbose,exec,", 0) != 0)
      continue;
    ++s.executions;
    std::vector<std::string> fields;
    std::stringstream parts(line);
    std::string field;
    while (std::getline(parts, field, ',')) fields.push_back(field);
    if (fields.size() < 7) continue;
    const auto& primitive = fields[3];
    const auto& implementation = fields[4];
    const bool reference = implementation.rfind("ref", 0) == 0;
    // 16-channel activation blocks ("aBcd16b") given to a convolution of a CPU whose oneDNN
    // kernels take 8 run only as the reference kernel; flagged even if the name changes.
    const bool foreign_block =
        !avx512 && primitive == "convolution" && fields[6].find("aBcd16b") != std::string::npos;
    if (reference || foreign_block) s.offending.push_back(line);
  }
  return s;
}

std::vector<std::string> zoo_names() {
  std::vector<std::string> names;
  for (const auto& info : dynattn::list_models()) names.push_back(info.name);
  return names;
}

void run_inference(dynattn::Model& model, int64_t batch, bool channels_last) {
  dynattn::InferenceGuard guard;
  auto x = torch::randn({batch, 1, 28, 28});
  if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  model.forward(x);
}

class NoReferenceKernels : public ::testing::TestWithParam<std::string> {};

TEST_P(NoReferenceKernels, InInferenceTrainingAndTheDeployedForm) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN: nothing to check";
  const std::string name = GetParam();
  torch::manual_seed(1);
  std::string stage;
  const std::string log = captured_stdout([&] {
    auto model = dynattn::create_model(name);
    stage = "training step";
    model.ptr()->train();
    auto x = torch::randn({4, 1, 28, 28});
    model.forward(x).square().mean().backward();
    model.ptr()->eval();
    for (const bool deployed : {false, true}) {
      if (deployed) {
        stage = "deploy";
        dynattn::deploy(model, {2, 1, 28, 28});
      }
      for (const int64_t batch : {1, 8}) {
        for (const bool cl : {false, true}) {
          stage = std::string(deployed ? "deployed " : "") + "inference, batch " +
                  std::to_string(batch) + (cl ? ", channels-last" : ", contiguous");
          run_inference(model, batch, cl);
        }
      }
    }
  });
  const auto summary = summarise(log);
  EXPECT_GT(summary.executions, 0)
      << name << ": oneDNN's verbose log is empty, so nothing was checked (is ONEDNN_VERBOSE "
      << "honoured by this LibTorch?)";
  EXPECT_THAT(summary.offending, ::testing::IsEmpty())
      << name << " on " << dynattn::cpu_capability().describe()
      << ": oneDNN reference kernels or another ISA's channel blocks ran";
}

INSTANTIATE_TEST_SUITE_P(Zoo, NoReferenceKernels, ::testing::ValuesIn(zoo_names()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// The summary itself: a reference kernel and a foreign block are flagged, JIT kernels are not.
TEST(NoReferenceKernelsLog, FlagsReferenceKernelsAndForeignBlocks) {
  const std::string jit =
      "onednn_verbose,exec,cpu,convolution,jit:avx2,forward_inference,src_f32::blocked:aBcd8b:f0 "
      "wei_f32::blocked:ABcd8b8a:f0 dst_f32::blocked:aBcd8b:f0,,alg:convolution_direct,mb1,0.1\n";
  const std::string ref =
      "onednn_verbose,exec,cpu,convolution,ref:any,forward_inference,src_f32::blocked:abcd:f0 "
      "wei_f32::blocked:abcd:f0 dst_f32::blocked:abcd:f0,,alg:convolution_direct,mb1,900\n";
  const std::string block16 =
      "onednn_verbose,exec,cpu,convolution,jit:avx2,forward_inference,src_f32::blocked:aBcd16b:f0 "
      "wei_f32::blocked:ABcd16b16a:f0 dst_f32::blocked:aBcd16b:f0,,alg:convolution_direct,mb1,5\n";
  const auto a = summarise("other output\n" + jit + jit);
  EXPECT_EQ(a.executions, 2);
  EXPECT_TRUE(a.offending.empty());
  const auto b = summarise(jit + ref);
  ASSERT_EQ(b.offending.size(), 1u);
  EXPECT_THAT(b.offending[0], ::testing::HasSubstr("ref:any"));
  const auto c = summarise(block16);
  EXPECT_EQ(c.offending.size(), dynattn::cpu_capability().onednn_block == 16 ? 0u : 1u);
}

}  // namespace
