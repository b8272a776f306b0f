#include "kernels.h"

namespace chunkvale {
namespace {
enum class Isa { Generic, Avx2, Avx512 };

Isa detect() {
#if defined(CHUNKVALE_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}
}  // namespace

const KernelTable* kernels_for(DType dtype, int head_dim) {
#if defined(CHUNKVALE_X86)
  switch (isa()) {
    case Isa::Avx512: return avx512::table(dtype, head_dim);
    case Isa::Avx2: return avx2::table(dtype, head_dim);
    default: break;
  }
#endif
  return generic::table(dtype, head_dim);
}

const char* kernel_isa() {
  switch (isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace chunkvale
