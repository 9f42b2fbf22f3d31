// Interop with an independent implementation: tests/io/write_safetensors_reference.py writes
// and checks safetensors files with Python torch + struct + json.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "dynattn/io/atomic_file.h"
#include "dynattn/io/safetensors.h"

namespace fs = std::filesystem;

namespace {

const std::string kPython = "/usr/bin/python3";
const std::string kScript =
    std::string(DYNATTN_SOURCE_DIR) + "/tests/io/write_safetensors_reference.py";

int run(const std::string& command) {
  const int status = std::system(command.c_str());
  return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool python_torch_available() {
  return run(kPython + " -c 'import torch' > /dev/null 2>&1") == 0;
}

std::string quoted(const std::string& s) {
  return "'" + s + "'";
}

class SafetensorsPython : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!python_torch_available()) {
      GTEST_SKIP() << kPython << " cannot import torch: python3-torch is missing "
                   << "(scripts/install-deps.sh installs it)";
    }
    char tmpl[] = "/tmp/dynattn_st_py_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return dir_ + "/" + name; }
  // The script's reference file, loaded by the C++ reader.
  dynattn::SafetensorsFile load_reference() {
    EXPECT_EQ(run(kPython + " " + quoted(kScript) + " --out " + quoted(file("py.safetensors")) +
                  " --values " + quoted(file("values.json"))),
              0);
    return dynattn::read_safetensors(file("py.safetensors"));
  }

  std::string dir_;
};

// Element bit patterns as unsigned integers, the form the script writes to values.json.
std::vector<uint64_t> bits(const torch::Tensor& tensor) {
  const auto t = tensor.contiguous();
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  std::vector<uint64_t> out(t.numel(), 0);
  for (size_t i = 0; i < out.size(); ++i)
    std::memcpy(&out[i], p + i * t.element_size(), t.element_size());
  return out;
}

}  // namespace

TEST_F(SafetensorsPython, ReadsFilesWrittenByPython) {
  const auto file = load_reference();
  const auto values = nlohmann::json::parse(dynattn::read_file(this->file("values.json")));
  EXPECT_EQ(file.metadata, values.at("metadata").get<decltype(file.metadata)>());
  ASSERT_EQ(file.tensors.size(), values.at("tensors").size());
  const std::map<std::string, torch::ScalarType> dtypes = {{"F32", torch::kFloat32},
                                                           {"F16", torch::kFloat16},
                                                           {"BF16", torch::kBFloat16},
                                                           {"I64", torch::kInt64}};
  for (const auto& [name, want] : values.at("tensors").items()) {
    SCOPED_TRACE(name);
    const torch::Tensor* t = file.find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->scalar_type(), dtypes.at(want.at("dtype").get<std::string>()));
    EXPECT_EQ(t->sizes().vec(), want.at("shape").get<std::vector<int64_t>>());
    EXPECT_EQ(bits(*t), want.at("bits").get<std::vector<uint64_t>>());
  }
  // Spot-check decoded values, not only bits.
  EXPECT_TRUE(torch::equal(*file.find("arange_f32"),
                           torch::arange(12, torch::kFloat32).reshape({3, 4}) * 0.25 - 1.0));
  EXPECT_EQ(file.find("scalar_f32")->dim(), 0);
  EXPECT_FLOAT_EQ(file.find("scalar_f32")->item<float>(), 3.14159f);
}

TEST_F(SafetensorsPython, PythonReadsFilesWrittenByCpp) {
  // Rewrite the reference values from non-contiguous views, in a different order: the
  // script must find the same bits.
  const auto reference = load_reference();
  std::vector<std::pair<std::string, torch::Tensor>> tensors(reference.tensors.rbegin(),
                                                             reference.tensors.rend());
  for (auto& [name, t] : tensors) {
    if (t.dim() == 2) t = t.t().contiguous().t();
  }
  ASSERT_FALSE(tensors.back().second.is_contiguous());
  dynattn::write_safetensors(file("cpp.safetensors"), tensors, reference.metadata);
  EXPECT_EQ(run(kPython + " " + quoted(kScript) + " --check " + quoted(file("cpp.safetensors"))),
            0);

  // The check is real: a changed value fails it.
  for (auto& [name, t] : tensors) {
    if (name == "arange_f32") t = t + 1;
  }
  dynattn::write_safetensors(file("bad.safetensors"), tensors, reference.metadata);
  EXPECT_NE(run(kPython + " " + quoted(kScript) + " --check " + quoted(file("bad.safetensors")) +
                " 2> /dev/null"),
            0);
}
