#include "cpu_features.h"

#include <cerrno>
#include <cstring>

#if defined(CHUNKVALE_X86) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define CHUNKVALE_CPUID 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace chunkvale {
namespace {

#if defined(CHUNKVALE_CPUID)
// XCR0: the register state the OS saves and restores (bits 17/18: tile config / tile data).
uint64_t xcr0() {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // no OSXSAVE
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(CHUNKVALE_CPUID)
  __builtin_cpu_init();
  f.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512_bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  uint32_t a = 0, b = 0, c = 0, d = 0;
  const bool leaf7 = __get_cpuid_count(7, 0, &a, &b, &c, &d);
  const bool cpu_amx = leaf7 && (d & (1u << 24)) && (d & (1u << 22));  // AMX-TILE, AMX-BF16
  const bool os_amx = (xcr0() & (uint64_t(3) << 17)) == (uint64_t(3) << 17);
  f.amx_bf16 = cpu_amx && os_amx && f.avx512_bf16;
  if (!cpu_amx)
    f.amx_refusal = "this CPU has no AMX-BF16 (CPUID)";
  else if (!os_amx)
    f.amx_refusal = "the OS does not enable AMX tile state (XCR0)";
  else if (!f.avx512_bf16)
    f.amx_refusal = "this CPU has AMX but no AVX512-BF16, which the matrix-engine kernels also use";
  else
    f.amx_granted = request_amx_tile_state(&f.amx_refusal);
#else
  f.amx_refusal = "not an x86-64 build";
#endif
  return f;
}

}  // namespace

bool request_amx_tile_state(std::string* why) {
#if defined(__linux__) && defined(CHUNKVALE_X86)
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0) return true;
  if (why)
    *why = std::string("the kernel refused AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) "
                       "failed with ") + std::strerror(errno);
  return false;
#else
  if (why) *why = "AMX tile state is requested through Linux's arch_prctl, not available in this build";
  return false;
#endif
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace chunkvale
