#include "dynattn/core/runtime.h"

#include "dynattn/core/strings.h"

#include <dlfcn.h>

#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <limits.h>
#include <stdlib.h>
#endif

#include "dynattn/core/compat.h"
#include "dynattn/core/version.h"
#include "dynattn/profile/benchmark.h"

namespace dynattn {
namespace {

std::string basename_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string parent_dir_name(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return "";
  return basename_of(path.substr(0, slash));
}

bool contains(const std::string& s, const char* part) {
  return s.find(part) != std::string::npos;
}

bool names_optimised_blas(const std::string& path) {
  for (const char* part : {"openblas", "mkl", "blis", "atlas", "accelerate"}) {
    if (contains(path, part)) return true;
  }
  return false;
}

std::string resolve_path(const std::string& path) {
#if defined(__unix__) || defined(__APPLE__)
  char buffer[PATH_MAX];
  if (realpath(path.c_str(), buffer) != nullptr) return buffer;
#endif
  return path;
}

// Paths of the mapped shared objects that look like a CPU BLAS, in /proc/self/maps order,
// without duplicates. Empty where /proc does not exist.
std::vector<std::string> mapped_blas_libraries() {
  std::vector<std::string> found;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    // "address perms offset dev inode   /path/to/file"
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = trim(line.substr(slash));
    const std::string base = basename_of(path);
    if (!contains(base, "blas") && !contains(base, "libmkl_")) continue;
    // GPU BLAS libraries of CUDA / ROCm builds do not run CPU matrix products.
    if (contains(base, "cublas") || contains(base, "hipblas") || contains(base, "rocblas")) {
      continue;
    }
    const std::string resolved = resolve_path(path);
    if (std::find(found.begin(), found.end(), resolved) == found.end()) found.push_back(resolved);
  }
  return found;
}

std::string format_gflops(double gflops) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(gflops < 10 ? 1 : 0) << gflops;
  return out.str();
}

}  // namespace

int resolve_thread_count(int requested) {
  TORCH_CHECK(requested >= 0, "threads: expected a count >= 0 (0 = automatic), got ", requested);
  if (requested > 0) return requested;
  const char* env = std::getenv("OMP_NUM_THREADS");
  const std::string value = env ? trim(env) : "";
  if (!value.empty()) {
    // OpenMP allows a list ("4,2") for nested levels; the first entry is the outer level.
    const std::string first = trim(value.substr(0, value.find(',')));
    char* end = nullptr;
    errno = 0;
    const long n = std::strtol(first.c_str(), &end, 10);
    TORCH_CHECK(!first.empty() && errno == 0 && *end == '\0' && n > 0 && n <= INT_MAX,
                "environment variable OMP_NUM_THREADS='", env,
                "' is not a positive integer; set it to a thread count such as 4, or unset it");
    return static_cast<int>(n);
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

int configure_threads(int requested) {
  torch::set_num_threads(resolve_thread_count(requested));
  return torch::get_num_threads();
}

void apply_malloc_policy(MallocPolicy policy) {
  if (policy == MallocPolicy::kDefault) return;
#if defined(__GLIBC__)
  // 32 MiB is glibc's largest allowed mmap threshold on 64-bit; setting it also turns off the
  // dynamic threshold. The trim threshold keeps freed memory for the next forward pass.
  TORCH_CHECK(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1,
              "malloc policy tuned: mallopt(M_MMAP_THRESHOLD, 33554432) failed");
  TORCH_CHECK(mallopt(M_TRIM_THRESHOLD, 1000000000) == 1,
              "malloc policy tuned: mallopt(M_TRIM_THRESHOLD, 1000000000) failed");
#else
  TORCH_WARN_ONCE("malloc policy tuned: needs glibc's mallopt; the allocator is left as it is");
#endif
}

std::string malloc_policy_name(MallocPolicy policy) {
  switch (policy) {
    case MallocPolicy::kDefault:
      return "default";
    case MallocPolicy::kTuned:
      return "tuned";
  }
  TORCH_CHECK(false, "malloc_policy_name: unknown MallocPolicy value ", static_cast<int>(policy));
}

MallocPolicy parse_malloc_policy(const std::string& name) {
  if (name == "default") return MallocPolicy::kDefault;
  if (name == "tuned") return MallocPolicy::kTuned;
  TORCH_CHECK(false, "malloc policy: expected 'default' or 'tuned', got '", name, "'");
}

bool is_reference_blas_path(const std::string& path) {
  if (contains(path, "/blas/")) return true;
  return basename_of(path).rfind("libblas.so", 0) == 0 && !names_optimised_blas(path);
}

std::string blas_display_name(const std::string& path) {
  if (path.empty()) return "unknown";
  if (contains(path, "/blas/")) return "reference-blas";
  std::string base = basename_of(path);
  if (base.rfind("lib", 0) == 0) base = base.substr(3);
  base = base.substr(0, base.find(".so"));
  if (base == "blas") {
    // Debian's alternatives install every implementation as <dir>/libblas.so.3: the
    // directory (openblas-openmp, openblas-pthread, blis-openmp, ...) says which.
    const std::string dir = parent_dir_name(path);
    return names_optimised_blas(dir) ? dir : "blas";
  }
  return base;
}

std::string openblas_core() {
  using CoreNameFn = char* (*)();
  auto fn = reinterpret_cast<CoreNameFn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (fn == nullptr) return "";
  const char* name = fn();
  return name ? trim(name) : "";
}

std::string openblas_core_fix() {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return "";  // the user's choice stands
  std::string core = openblas_core();
  std::transform(core.begin(), core.end(), core.begin(), ::tolower);
  static const char* kGeneric[] = {"prescott",  "core2",  "penryn", "dunnington",
                                   "nehalem",   "atom",   "katmai", "coppermine",
                                   "northwood", "banias", "unknown"};
  if (std::find(std::begin(kGeneric), std::end(kGeneric), core) == std::end(kGeneric)) return "";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return "";
}

BlasInfo detect_blas() {
  BlasInfo info;
  info.core = openblas_core();
  const auto libraries = mapped_blas_libraries();
  // LibTorch links libblas.so.3 before any libopenblas.so.0, so its sgemm_ is the one that
  // runs when both are mapped.
  for (const auto& lib : libraries) {
    if (basename_of(lib).rfind("libblas", 0) == 0) {
      info.library = lib;
      break;
    }
  }
  if (info.library.empty() && !libraries.empty()) info.library = libraries.front();

  // One thread: the reference BLAS is single-threaded anyway, and a multi-threaded OpenMP gemm
  // on a machine whose other cores are busy waits at every barrier for a descheduled thread
  // (OpenBLAS measured 4.2 GFLOP/s here with 2 threads during a compile, 34 with one).
  info.matmul_gflops = measure_matmul_gflops(256, /*threads_hint=*/1);
  // On one thread, 256x256: reference BLAS ~5 GFLOP/s; OpenBLAS 34 even when it misdetects
  // the CPU and runs its generic kernels (~170 with the right ones). The threshold sits in
  // between with room for a slower machine.
  constexpr double kSlowGflops = 12.0;
  const bool reference_path = !info.library.empty() && is_reference_blas_path(info.library);
  info.reference = reference_path || info.matmul_gflops < kSlowGflops;
  if (info.reference) {
    std::ostringstream w;
    w << "************************************************************************\n"
      << "WARNING: matrix products run on the reference BLAS ("
      << (info.library.empty() ? std::string("library not found") : info.library) << ",\n"
      << "         " << format_gflops(info.matmul_gflops)
      << " GFLOP/s on a 256x256 product). Linear layers, attention and\n"
      << "         convolutions that fall back to GEMM will be 10-30x slower, and any\n"
      << "         timing taken now is meaningless.\n"
      << "         Fix: sudo apt-get install libopenblas0-openmp\n"
      << "              (or run scripts/install-deps.sh), then start again.\n"
      << "************************************************************************";
    info.warning = w.str();
  }
  return info;
}

std::string runtime_banner(int threads, MallocPolicy policy, const BlasInfo& blas) {
  std::ostringstream out;
  out << "dynattn " << version() << " | LibTorch " << torch_version_string() << " | threads "
      << threads << " | BLAS " << blas_display_name(blas.library);
  if (!blas.library.empty()) out << " (" << blas.library << ")";
  if (!blas.core.empty()) out << " core " << blas.core;
  out << " " << format_gflops(blas.matmul_gflops) << " GFLOP/s (1 thread) | malloc "
      << malloc_policy_name(policy);
  if (blas.reference) {
    out << "\nWARNING: reference BLAS in use: matrix products are 10-30x slower; install "
           "libopenblas0-openmp (scripts/install-deps.sh)";
  }
  return out.str();
}

}  // namespace dynattn
