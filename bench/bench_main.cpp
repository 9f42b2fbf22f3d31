// Entry point of dynattn_bench: the CLI's runtime policy (tuned malloc, every core unless
// OMP_NUM_THREADS says otherwise), then Google Benchmark.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "dynattn/core/runtime.h"

int main(int argc, char** argv) {
  // As the CLI does: restart with OpenBLAS's right kernels if it fell back to generic ones.
  const std::string core = dynattn::openblas_core_fix();
  if (!core.empty()) {
    setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
    execv("/proc/self/exe", argv);
  }
  dynattn::apply_malloc_policy(dynattn::MallocPolicy::kTuned);
  dynattn::configure_threads(0);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
