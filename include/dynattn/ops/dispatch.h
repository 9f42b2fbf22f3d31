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

// One candidate kernel of an op: its name, the rule on inputs (shown by `--kernels list`) and
// whether this CPU and policy allow it at all (empty: yes; otherwise why not).
struct KernelCandidate {
  std::string name;
  std::string rule;
  std::string (*unavailable)(const CpuCapability&, const KernelPolicy&) = nullptr;
  std::string why_not() const;  // unavailable(cpu_capability(), kernel_policy()), or ""
};

// An op and its candidates in order of preference; the last is the plain ATen form, which
// always applies.
struct KernelOpInfo {
  std::string name;
  std::string summary;
  std::vector<KernelCandidate> candidates;
};

// Every op of the library that has more than its ATen form, in a fixed order.
const std::vector<KernelOpInfo>& kernel_ops();
const KernelOpInfo& kernel_op(const std::string& name);  // error when unknown

// The `dynattn --kernels list` report: the CPU, the policy, then per op its candidates, which
// are available here and why not.
std::string kernel_list_report();

// Availability rules shared by the candidates.
std::string needs_dynattn_policy(const CpuCapability&, const KernelPolicy& p);
std::string needs_onednn(const CpuCapability& cpu, const KernelPolicy& p);
std::string needs_avx512_wide(const CpuCapability& cpu, const KernelPolicy& p);
std::string always_available(const CpuCapability&, const KernelPolicy&);

}  // namespace dynattn
