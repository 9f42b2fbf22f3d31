#include "dynattn/ops/dispatch.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

#ifdef DYNATTN_HAVE_ONEDNN
#include <dnnl.hpp>
#endif

namespace dynattn {
namespace {

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) break;
    auto name = line.substr(colon + 1);
    name.erase(0, name.find_first_not_of(" \t"));
    return name;
  }
  return "unknown";
}

#ifdef DYNATTN_HAVE_ONEDNN
std::string onednn_isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_mic:
      return "avx512_mic";
    case dnnl::cpu_isa::avx512_mic_4ops:
      return "avx512_mic_4ops";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "all";
  }
}
#endif

CpuCapability detect() {
  CpuCapability c;
  c.model = cpu_model_name();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  c.avx512 = __builtin_cpu_supports("avx512f");
#endif
  // One cap for both: DYNATTN_MAX_CPU_ISA, else oneDNN's own ONEDNN_MAX_CPU_ISA (or its older
  // name DNNL_MAX_CPU_ISA). Any value without "AVX512" in it (SSE41, AVX, AVX2, AVX2_VNNI) rules
  // out the 16-float forms.
  c.isa_limit = upper(env_or_empty("DYNATTN_MAX_CPU_ISA"));
  if (c.isa_limit.empty()) c.isa_limit = upper(env_or_empty("ONEDNN_MAX_CPU_ISA"));
  if (c.isa_limit.empty()) c.isa_limit = upper(env_or_empty("DNNL_MAX_CPU_ISA"));
  if (c.isa_limit == "ALL") c.isa_limit.clear();
  if (!c.isa_limit.empty() && c.isa_limit.find("AVX512") == std::string::npos) c.avx512 = false;
  if (!c.isa_limit.empty() && c.isa_limit.find("AVX2") == std::string::npos &&
      c.isa_limit.find("AVX512") == std::string::npos)
    c.avx2 = false;
#ifdef DYNATTN_HAVE_ONEDNN
  const auto isa = dnnl::get_effective_cpu_isa();
  c.onednn_isa = onednn_isa_name(isa);
  // oneDNN's AVX-512 direct conv kernels take 16-channel blocks; its AVX2, AVX and SSE4.1 ones
  // take 8 (nChw8c). Asked for the other block size, oneDNN has only its reference kernel.
  const auto bits = static_cast<unsigned>(isa);
  const auto avx512_core = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
  c.onednn_block = (bits & avx512_core) == avx512_core ? 16 : 8;
#else
  c.onednn_isa = at::hasMKLDNN() ? "inside ATen" : "none";
  c.onednn_block = c.avx512 ? 16 : 8;
#endif
  return c;
}

std::atomic<bool> g_dynattn{true};
std::atomic<bool> g_wide_vectors{true};
std::atomic<int> g_winograd{static_cast<int>(WinogradPolicy::kMeasured)};

const char* winograd_name(WinogradPolicy p) {
  switch (p) {
    case WinogradPolicy::kNever:
      return "never";
    case WinogradPolicy::kWhenSupported:
      return "always";
    default:
      return "measured";
  }
}

}  // namespace

std::string CpuCapability::describe() const {
  std::ostringstream s;
  s << model << "; ISA "
    << (avx512 ? "AVX-512"
        : avx2 ? "AVX2"
               : "baseline x86-64")
    << "; oneDNN " << onednn_isa << " (" << onednn_block << "-channel blocks)";
  if (!isa_limit.empty()) s << "; capped by MAX_CPU_ISA=" << isa_limit;
  return s.str();
}

const CpuCapability& cpu_capability() {
  static const CpuCapability capability = detect();
  return capability;
}

void set_kernel_policy(const KernelPolicy& policy) {
  g_dynattn.store(policy.dynattn);
  g_wide_vectors.store(policy.wide_vectors);
  g_winograd.store(static_cast<int>(policy.winograd));
}

KernelPolicy kernel_policy() {
  KernelPolicy p;
  p.dynattn = g_dynattn.load(std::memory_order_relaxed);
  p.wide_vectors = g_wide_vectors.load(std::memory_order_relaxed);
  p.winograd = static_cast<WinogradPolicy>(g_winograd.load(std::memory_order_relaxed));
  return p;
}

bool dynattn_kernels_enabled() {
  return g_dynattn.load(std::memory_order_relaxed);
}

bool wide_vector_kernels_run() {
  return needs_avx512_wide(cpu_capability(), kernel_policy()) == nullptr;
}

const char* KernelCandidate::why_not() const {
  return unavailable == nullptr ? nullptr : unavailable(cpu_capability(), kernel_policy());
}

const char* needs_dynattn_policy(const CpuCapability&, const KernelPolicy& p) {
  return p.dynattn ? nullptr : "--kernels aten";
}

const char* needs_onednn(const CpuCapability&, const KernelPolicy& p) {
  if (!p.dynattn) return "--kernels aten";
  if (!at::hasMKLDNN()) return "LibTorch built without oneDNN";
  return nullptr;
}

const char* needs_avx512_wide(const CpuCapability& cpu, const KernelPolicy& p) {
  if (!p.dynattn) return "--kernels aten";
  if (!cpu.avx512)
    return cpu.isa_limit.empty() ? "this CPU has no AVX-512" : "AVX-512 capped by MAX_CPU_ISA";
  if (!p.wide_vectors) return "16-float forms switched off";
  return nullptr;
}

const KernelOpInfo& kernel_op(const std::string& name) {
  for (const auto& op : kernel_ops())
    if (op.name == name) return op;
  TORCH_CHECK(false, "kernel dispatch: no op named '", name, "'");
}

std::string kernel_list_report() {
  const auto& cpu = cpu_capability();
  const auto policy = kernel_policy();
  std::ostringstream s;
  s << "CPU: " << cpu.describe() << "\n";
  s << "policy: --kernels " << (policy.dynattn ? "dynattn" : "aten") << ", --winograd "
    << winograd_name(policy.winograd) << (policy.wide_vectors ? "" : ", 16-float forms off")
    << "\n";
  s << "Per op, candidates in order of preference: the first that is available here and applies "
       "to the input runs.\n";
  for (const auto& op : kernel_ops()) {
    s << "\n"
      << op.name << ": " << op.summary << (op.dispatched ? "" : " [rules in the op's own checks]")
      << "\n";
    for (const auto& c : op.candidates) {
      const char* why = c.why_not();
      s << "  " << (why == nullptr ? "[available]  " : "[not here]   ") << c.name;
      if (why != nullptr) s << " (" << why << ")";
      s << "\n      " << c.rule << "\n";
    }
  }
  return s.str();
}

}  // namespace dynattn
