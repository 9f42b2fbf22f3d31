// Peak memory of a piece of work, as LibTorch's own profiler measures it: the CPU allocator
// reports every allocation and free to the c10::MemoryReportingInfoBase installed in the
// thread-local debug info (DebugInfoKind::PROFILER_STATE); measure_peak_memory() installs one
// that keeps a running sum of the sizes and its maximum.
// Limits: counts what goes through c10's CPU allocator on the calling thread (tensors and the
// buffers ATen allocates as tensors), not memory that a library mallocs itself, not allocations
// on other threads (the debug info is thread-local), and not the allocator's own overhead. Frees
// of blocks allocated before fn started are not reported by c10 (it only knows the sizes of
// blocks it saw allocated while memory profiling was on): keep the tensors that fn frees inside
// fn.
#pragma once
#include <cstdint>
#include <functional>

namespace dynattn {

struct PeakMemory {
  int64_t peak_bytes = 0;   // highest sum of live allocations made during fn
  int64_t total_bytes = 0;  // sum of the sizes of every allocation made during fn
  int64_t allocations = 0;  // number of allocations
  int64_t end_bytes = 0;    // allocated during fn and still alive when it returned
};

// Runs fn() once and returns what the CPU allocator reported meanwhile. Nests: an enclosing
// measurement (or a running LibTorch profiler with memory profiling) still sees every event.
PeakMemory measure_peak_memory(const std::function<void()>& fn);

}  // namespace dynattn
