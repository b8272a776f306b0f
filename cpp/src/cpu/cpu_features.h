// What this CPU and this process may run, asked once: the instruction-set features the
// kernels are chosen by, and AMX tile state, which Linux hands out per process on request
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); a tile instruction without it dies
// with SIGILL. kernels_dispatch.cpp picks kernels from this.
#pragma once
#include <string>

namespace chunkvale {

struct CpuFeatures {
  bool avx2_fma = false;
  bool avx512 = false;       // F, BW, VL, DQ
  bool avx512_bf16 = false;
  bool amx_bf16 = false;     // AMX-TILE and AMX-BF16 in CPUID, tile state enabled by the OS (XCR0)
  bool amx_granted = false;  // and this process was granted tile state
  std::string amx_refusal;   // why amx_bf16 does not run here ("" when it does)
};

// Detected on first use (the AMX permission is requested then, once per process).
const CpuFeatures& cpu_features();

// Requests AMX tile state for this process. True when granted (or already held); otherwise
// false with the reason (the kernel's error) in *why.
bool request_amx_tile_state(std::string* why);

}  // namespace chunkvale
