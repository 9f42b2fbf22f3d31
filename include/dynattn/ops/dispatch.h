// The kernel dispatch: the one place that knows the running CPU, the user's kernel policy and,
// for each op, the ordered list of its candidate kernels.
//
// Why one place: a kernel path that is fast on one x86 CPU can be a thousand times slower on
// another (oneDNN's reference convolution ran the deployed RepVGG-A0 at 1.9 s per image on an
// AVX2 CPU, because its conv stack asked for the 16-channel blocked layout that only AVX-512
// kernels take). Choices made from one machine's measurements, spread over many "applies" checks,
// cannot be seen or tested as a whole; here every op lists its candidates with the rule for each,
// `dynattn --kernels list` prints them for the running CPU, and tests/ops/test_kernel_dispatch.cpp
// walks every candidate against the op's ATen form.
//
// The CPU is read once. ONEDNN_MAX_CPU_ISA caps oneDNN's kernels; DYNATTN_MAX_CPU_ISA (default:
// the value of ONEDNN_MAX_CPU_ISA) caps dynattn's own 16-float forms the same way, so that
// `ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX-512 machine choose exactly as an AVX2 one does.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dynattn {

// What the running CPU offers dynattn's and oneDNN's kernels (after the ISA caps above).
struct CpuCapability {
  std::string model;         // "model name" of /proc/cpuinfo, or "unknown"
  bool avx2 = false;         // AVX2 with FMA
  bool avx512 = false;       // AVX-512 F, unless capped: dynattn's 16-float forms may run
  std::string onednn_isa;    // oneDNN's effective ISA ("avx2", "avx512_core", ...; "none")
  int64_t onednn_block = 8;  // channel block of oneDNN's direct conv kernels: 16 AVX-512, 8 else
  std::string isa_limit;     // the cap in force ("AVX2", ...), empty when none
  std::string describe() const;  // one line: model, ISA, oneDNN ISA, block
};
const CpuCapability& cpu_capability();

// Which Winograd convolutions a deployed conv stack (ops/onednn_chain.h) may run.
enum class WinogradPolicy { kNever, kMeasured, kWhenSupported };

// The user's choice, read by every op through kernel_policy(); set once by the CLI's global
// options (`--kernels`, `--winograd`) or by tests and benchmarks.
struct KernelPolicy {
  bool dynattn = true;       // --kernels dynattn (default) or aten: ATen's own choices everywhere
  bool wide_vectors = true;  // dynattn's 16-float forms where the CPU has AVX-512 (tests: off)
  WinogradPolicy winograd = WinogradPolicy::kMeasured;
};
void set_kernel_policy(const KernelPolicy& policy);
KernelPolicy kernel_policy();

// Restores the policy in force when it was made, at scope exit (tests, benchmarks).
class KernelPolicyGuard {
 public:
  explicit KernelPolicyGuard(const KernelPolicy& policy) : saved_(kernel_policy()) {
    set_kernel_policy(policy);
  }
  ~KernelPolicyGuard() { set_kernel_policy(saved_); }
  KernelPolicyGuard(const KernelPolicyGuard&) = delete;
  KernelPolicyGuard& operator=(const KernelPolicyGuard&) = delete;

 private:
  KernelPolicy saved_;
};

// Shorthands every op uses: dynattn's kernels are allowed at all, and its 16-float forms run.
bool dynattn_kernels_enabled();
bool wide_vector_kernels_run();

// ---- The registry ----

// Why a candidate cannot run with this CPU and policy, or nullptr when it can.
using Unavailable = const char* (*)(const CpuCapability&, const KernelPolicy&);

// One candidate kernel of an op: its name, the rule on inputs (shown by `--kernels list`) and
// whether this CPU and policy allow it at all.
struct KernelCandidate {
  std::string name;
  std::string rule;
  Unavailable unavailable = nullptr;
  const char* why_not() const;  // unavailable(cpu_capability(), kernel_policy()), or nullptr
  bool available() const { return why_not() == nullptr; }
};

// An op and its candidates in order of preference; the last is the plain ATen form, which
// always applies. `dispatched`: a KernelOp (below) makes the choice and tests/ops'
// harness walks its candidates; otherwise the op's own checks implement the rules listed.
struct KernelOpInfo {
  std::string name;
  std::string summary;
  std::vector<KernelCandidate> candidates;
  bool dispatched = false;
};

// Every op of the library that has more than its ATen form, in a fixed order.
const std::vector<KernelOpInfo>& kernel_ops();
const KernelOpInfo& kernel_op(const std::string& name);  // error when unknown

// The `dynattn --kernels list` report: the CPU, the policy, then per op its candidates, which
// are available here and why not.
std::string kernel_list_report();

// Availability rules shared by the candidates (nullptr: available).
const char* needs_dynattn_policy(const CpuCapability&, const KernelPolicy& p);
const char* needs_onednn(const CpuCapability& cpu, const KernelPolicy& p);
const char* needs_avx512_wide(const CpuCapability& cpu, const KernelPolicy& p);

// The choice for one op: candidates bound to functions over the op's arguments, in the table's
// order (checked at construction). A call runs the first candidate that is available here and
// applies to the arguments; the last (ATen) always applies. Function pointers, so that a choice
// costs a few loads and no allocation.
template <class Args>
class KernelOp {
 public:
  struct Candidate {
    const char* name;
    bool (*applies)(const Args&);
    torch::Tensor (*run)(const Args&);
  };

  KernelOp(const char* op, std::vector<Candidate> candidates)
      : info_(kernel_op(op)), candidates_(std::move(candidates)) {
    TORCH_CHECK(info_.dispatched && candidates_.size() == info_.candidates.size(),
                "kernel dispatch: op ", op, " binds ", candidates_.size(),
                " candidates, its table entry lists ", info_.candidates.size());
    for (size_t i = 0; i < candidates_.size(); ++i)
      TORCH_CHECK(info_.candidates[i].name == candidates_[i].name, "kernel dispatch: op ", op,
                  " candidate ", i, " is '", candidates_[i].name, "' here and '",
                  info_.candidates[i].name, "' in the table");
  }

  torch::Tensor operator()(const Args& args) const { return candidates_[choose(args)].run(args); }

  size_t choose(const Args& args) const {
    for (size_t i = 0; i + 1 < candidates_.size(); ++i)
      if (info_.candidates[i].available() && candidates_[i].applies(args)) return i;
    return candidates_.size() - 1;
  }
  const char* chosen(const Args& args) const { return candidates_[choose(args)].name; }

  // Whether the named candidate could run on these arguments here (available and applies).
  bool can_run(const std::string& name, const Args& args) const {
    const size_t i = index(name);
    return info_.candidates[i].available() && candidates_[i].applies(args);
  }
  // The named candidate whatever the preference (tests/ops' harness); refuses one that cannot
  // run here.
  torch::Tensor run(const std::string& name, const Args& args) const {
    const size_t i = index(name);
    const char* why = info_.candidates[i].why_not();
    TORCH_CHECK(why == nullptr, "kernel dispatch: ", info_.name, "/", name,
                " is not available here: ", why);
    TORCH_CHECK(candidates_[i].applies(args), "kernel dispatch: ", info_.name, "/", name,
                " does not apply to these arguments");
    return candidates_[i].run(args);
  }
  const KernelOpInfo& info() const { return info_; }

 private:
  size_t index(const std::string& name) const {
    for (size_t i = 0; i < candidates_.size(); ++i)
      if (name == candidates_[i].name) return i;
    TORCH_CHECK(false, "kernel dispatch: op ", info_.name, " has no candidate '", name, "'");
  }
  const KernelOpInfo& info_;
  std::vector<Candidate> candidates_;
};

// Always true: the ATen candidate's applicability.
template <class Args>
bool always_applies(const Args&) {
  return true;
}

}  // namespace dynattn
