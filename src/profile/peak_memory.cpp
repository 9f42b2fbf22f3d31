#include "dynattn/profile/peak_memory.h"

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <algorithm>
#include <memory>

#include "dynattn/core/compat.h"

namespace dynattn {
namespace {

// Accumulates the allocator's reports; forwards them to the reporter it displaced, if any.
class PeakMemoryReporter : public c10::MemoryReportingInfoBase {
 public:
  explicit PeakMemoryReporter(c10::MemoryReportingInfoBase* outer) : outer_(outer) {}

  void reportMemoryUsage(void* ptr, int64_t alloc_size, MemoryReportTotal total_allocated,
                         MemoryReportTotal total_reserved, c10::Device device) override {
    if (device.is_cpu()) {
      current_ += alloc_size;
      if (alloc_size > 0) {
        result_.total_bytes += alloc_size;
        ++result_.allocations;
      }
      result_.peak_bytes = std::max(result_.peak_bytes, current_);
    }
    if (outer_ && outer_->memoryProfilingEnabled())
      outer_->reportMemoryUsage(ptr, alloc_size, total_allocated, total_reserved, device);
  }

  bool memoryProfilingEnabled() const override { return true; }

  PeakMemory result() const {
    PeakMemory r = result_;
    r.end_bytes = current_;
    return r;
  }

 private:
  c10::MemoryReportingInfoBase* outer_;
  PeakMemory result_;
  int64_t current_ = 0;
};

}  // namespace

PeakMemory measure_peak_memory(const std::function<void()>& fn) {
  auto* outer = dynamic_cast<c10::MemoryReportingInfoBase*>(
      c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE));
  auto reporter = std::make_shared<PeakMemoryReporter>(outer);
  {
    c10::DebugInfoGuard guard(c10::DebugInfoKind::PROFILER_STATE, reporter);
    fn();
  }
  return reporter->result();
}

}  // namespace dynattn
