#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <thread>

#include "dynattn/core/compat.h"
#include "dynattn/core/runtime.h"
#include "dynattn/core/version.h"

namespace dynattn {
namespace {

// Sets (or unsets, for nullptr) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

int hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

TEST(ResolveThreadCount, RequestedWins) {
  ScopedEnv env("OMP_NUM_THREADS", "3");
  EXPECT_EQ(resolve_thread_count(5), 5);
  EXPECT_EQ(resolve_thread_count(1), 1);
}

TEST(ResolveThreadCount, EnvironmentThenHardware) {
  {
    ScopedEnv env("OMP_NUM_THREADS", "3");
    EXPECT_EQ(resolve_thread_count(0), 3);
  }
  {
    ScopedEnv env("OMP_NUM_THREADS", "4,2");  // OpenMP nested list: outer level
    EXPECT_EQ(resolve_thread_count(0), 4);
  }
  {
    ScopedEnv env("OMP_NUM_THREADS", nullptr);
    EXPECT_EQ(resolve_thread_count(0), hardware_threads());
  }
  {
    ScopedEnv env("OMP_NUM_THREADS", "");
    EXPECT_EQ(resolve_thread_count(0), hardware_threads());
  }
}

TEST(ResolveThreadCount, BadValuesFailNamingTheVariable) {
  for (const char* bad : {"abc", "0", "-2", "2x", " ,3"}) {
    ScopedEnv env("OMP_NUM_THREADS", bad);
    try {
      resolve_thread_count(0);
      ADD_FAILURE() << "no error for OMP_NUM_THREADS=" << bad;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("OMP_NUM_THREADS"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(resolve_thread_count(-1), c10::Error);
}

TEST(ConfigureThreads, ReturnsTheCountInEffect) {
  const int before = torch::get_num_threads();
  EXPECT_EQ(configure_threads(1), 1);
  EXPECT_EQ(torch::get_num_threads(), 1);
  torch::set_num_threads(before);
}

TEST(MallocPolicy, NamesParseAndApply) {
  EXPECT_EQ(malloc_policy_name(MallocPolicy::kDefault), "default");
  EXPECT_EQ(malloc_policy_name(MallocPolicy::kTuned), "tuned");
  EXPECT_EQ(parse_malloc_policy("tuned"), MallocPolicy::kTuned);
  EXPECT_EQ(parse_malloc_policy("default"), MallocPolicy::kDefault);
  try {
    parse_malloc_policy("fast");
    ADD_FAILURE() << "no error for 'fast'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fast'"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(apply_malloc_policy(MallocPolicy::kDefault));
  EXPECT_NO_THROW(apply_malloc_policy(MallocPolicy::kTuned));
  // The allocator still works for large and small blocks.
  auto big = torch::ones({64, 1024, 1024});
  EXPECT_EQ(big.sum().item<float>(), 64.0f * 1024 * 1024);
}

TEST(Blas, PathClassification) {
  EXPECT_TRUE(is_reference_blas_path("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"));
  EXPECT_TRUE(is_reference_blas_path("/usr/lib64/libblas.so.3.11.0"));
  EXPECT_FALSE(is_reference_blas_path("/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3"));
  EXPECT_FALSE(is_reference_blas_path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"));
  EXPECT_EQ(blas_display_name("/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3"),
            "openblas-openmp");
  EXPECT_EQ(blas_display_name("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"), "reference-blas");
  EXPECT_EQ(blas_display_name("/opt/lib/libopenblasp-r0.3.21.so"), "openblasp-r0.3.21");
  EXPECT_EQ(blas_display_name(""), "unknown");
}

TEST(Blas, DetectFindsTheMappedLibrary) {
  const int threads = torch::get_num_threads();
  const BlasInfo info = detect_blas();
  EXPECT_EQ(torch::get_num_threads(), threads) << "the one-thread measurement must be undone";
  EXPECT_NE(info.library.find("blas"), std::string::npos) << info.library;
  EXPECT_GT(info.matmul_gflops, 0.0);
  EXPECT_EQ(info.reference, !info.warning.empty());
  if (info.reference) {
    EXPECT_NE(info.warning.find("libopenblas0-openmp"), std::string::npos);
    std::cerr << info.warning << "\n";
  }
  std::cerr << "[ info ] BLAS " << info.library << " " << info.matmul_gflops << " GFLOP/s\n";
}

TEST(Banner, NamesVersionsThreadsBlasAndMalloc) {
  BlasInfo blas;
  blas.library = "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3";
  blas.matmul_gflops = 180.4;
  const std::string banner = runtime_banner(2, MallocPolicy::kTuned, blas);
  EXPECT_EQ(banner, "dynattn " + version() + " | LibTorch " + torch_version_string() +
                        " | threads 2 | BLAS openblas-openmp (" + blas.library +
                        ") 180 GFLOP/s (1 thread) | malloc tuned");
  EXPECT_NE(banner.find("threads 2"), std::string::npos);
  EXPECT_NE(banner.find(torch_version_string()), std::string::npos);
  EXPECT_EQ(banner.find('\n'), std::string::npos);

  blas.library = "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3";
  blas.matmul_gflops = 5.8;
  blas.reference = true;
  const std::string slow = runtime_banner(3, MallocPolicy::kDefault, blas);
  EXPECT_NE(slow.find("threads 3"), std::string::npos);
  EXPECT_NE(slow.find("5.8 GFLOP/s"), std::string::npos);
  EXPECT_NE(slow.find("malloc default"), std::string::npos);
  EXPECT_NE(slow.find("\nWARNING"), std::string::npos);
}

TEST(Version, IsTheProjectVersion) {
  EXPECT_EQ(version(), "0.1.0");
}

}  // namespace
}  // namespace dynattn

TEST(Runtime, OpenBlasCoreFixRespectsTheUsersChoice) {
  const char* old = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = old ? old : "";
  setenv("OPENBLAS_CORETYPE", "Haswell", 1);
  EXPECT_EQ(dynattn::openblas_core_fix(), "");
  if (old) {
    setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
  } else {
    unsetenv("OPENBLAS_CORETYPE");
  }
}

TEST(Runtime, OpenBlasCoreFixOnlyReplacesGenericKernels) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) GTEST_SKIP() << "OPENBLAS_CORETYPE is set";
  const std::string core = dynattn::openblas_core();
  const std::string fix = dynattn::openblas_core_fix();
  if (core.empty()) {
    EXPECT_EQ(fix, "") << "no OpenBLAS loaded, nothing to fix";
  } else if (core == "Prescott" || core == "Core2" || core == "Nehalem") {
    EXPECT_TRUE(fix == "SkylakeX" || fix == "Haswell" || fix.empty()) << fix;
  } else {
    EXPECT_EQ(fix, "") << "OpenBLAS chose " << core << " itself";
  }
  EXPECT_EQ(dynattn::detect_blas().core, core);
}
