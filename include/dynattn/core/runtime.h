// Process set-up shared by the CLI and the benchmarks: thread count, allocator policy and the
// BLAS actually in use. Each of these silently changes speed by 2-30x when wrong (a reference
// BLAS, glibc returning every large tensor to the OS), so they are decided in one place and
// printed in one banner.
#pragma once
#include <string>

namespace dynattn {

// requested > 0 wins; 0 means automatic: OMP_NUM_THREADS if set (the first entry of a list
// such as "4,2"), else the number of hardware threads. Fails if requested < 0 or if
// OMP_NUM_THREADS is set to something that is not a positive integer.
int resolve_thread_count(int requested);

// Sets LibTorch's intra-op thread count to resolve_thread_count(requested) and returns the
// count actually in effect (torch::get_num_threads()).
int configure_threads(int requested);

// kDefault leaves the allocator as it is. kTuned keeps large blocks in the heap: with glibc's
// default dynamic mmap threshold, tensors of a few MiB are mmapped and unmapped on every
// allocation, which can make the same forward pass 2-3x slower. kTuned is the same as running
// with MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1000000000. Only glibc has
// mallopt; elsewhere kTuned is a no-op (with a warning). kDefault does not undo kTuned.
enum class MallocPolicy { kDefault, kTuned };
void apply_malloc_policy(MallocPolicy policy);
std::string malloc_policy_name(MallocPolicy policy);        // "default" / "tuned"
MallocPolicy parse_malloc_policy(const std::string& name);  // inverse; fails on anything else

struct BlasInfo {
  std::string library;       // resolved path of the BLAS mapped into this process; "" if none found
  double matmul_gflops = 0;  // one 256x256 float product on one thread, best of a few
  bool reference = false;    // the unoptimised reference BLAS (or something as slow)
  std::string warning;       // multi-line advice when reference, else ""
  std::string core;          // OpenBLAS's kernel set ("SkylakeX", "Prescott", ...), "" if unknown
};

// The kernel set OpenBLAS chose for this CPU (openblas_get_corename), "" when OpenBLAS is not
// loaded.
std::string openblas_core();

// Debian 12's OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to its generic
// "Prescott" kernels: sgemm runs ~5x slower (34 vs 168 GFLOP/s measured here). Returns the
// OPENBLAS_CORETYPE this CPU supports ("SkylakeX" with AVX-512, "Haswell" with AVX2) when
// OpenBLAS picked a generic core and the user did not set OPENBLAS_CORETYPE; "" otherwise.
// OpenBLAS reads the variable once, when it is loaded: the CLI re-executes itself with it set;
// programs embedding dynattn set it in their environment (see README).
std::string openblas_core_fix();

// Finds the BLAS shared object in /proc/self/maps (libblas.so.3 first: LibTorch's gemm calls
// bind to it) and measures it with a small matrix product on one thread (a few milliseconds).
BlasInfo detect_blas();

// Whether `path` names the reference BLAS: a ".../blas/libblas.so*" or a libblas.so* outside
// any OpenBLAS / MKL / BLIS / ATLAS directory.
bool is_reference_blas_path(const std::string& path);

// Short name for a BLAS path: "openblas-openmp" for .../openblas-openmp/libblas.so.3,
// "reference-blas" for .../blas/libblas.so.3, "unknown" for "".
std::string blas_display_name(const std::string& path);

// "dynattn 0.1.0 | LibTorch 1.13.1 | threads 2 | BLAS openblas-openmp (/usr/...) 34 GFLOP/s
// (1 thread) | malloc tuned", plus a second warning line when the BLAS is the reference one.
std::string runtime_banner(int threads, MallocPolicy policy, const BlasInfo& blas);

}  // namespace dynattn
