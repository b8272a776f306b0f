#include <cstdlib>

#include "chunkvale/errors.h"
#include "kernels.h"

namespace chunkvale {
namespace {
enum class Isa { Generic, Avx2, Avx512, Avx512Bf16 };  // in order: each runs where the next does
constexpr Isa kAll[] = {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Generic};  // best first
const char* name_of(Isa i) {
  switch (i) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

Isa detect() {
#if defined(CHUNKVALE_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa best() {
  static const Isa chosen = detect();
  return chosen;
}
}  // namespace

std::vector<std::string> kernel_isas() {
  std::vector<std::string> out;
  for (Isa i : kAll)
    if (int(i) <= int(best())) out.push_back(name_of(i));
  return out;
}

const KernelTable* kernels_for(DType dtype, int head_dim, const std::string& isa_arg) {
  // An empty kernel_isa defers to CHUNKVALE_KERNEL_ISA (forcing a path in a whole program,
  // e.g. a benchmark of the engine), then to the best this CPU runs.
  const char* env = std::getenv("CHUNKVALE_KERNEL_ISA");
  const bool from_env = isa_arg.empty() && env && *env;
  const std::string isa = from_env ? std::string(env) : isa_arg;
  const char* what = from_env ? "CHUNKVALE_KERNEL_ISA" : "kernel_isa";
  Isa want = best();
  if (!isa.empty()) {
    bool known = false;
    for (Isa i : kAll)
      if (isa == name_of(i)) want = i, known = true;
    if (!known)
      throw ValueError(std::string(what) + ": expected '' (best), 'avx512bf16', 'avx512', 'avx2' or 'generic', got '" +
                       isa + "'");
    if (int(want) > int(best()))
      throw ValueError(std::string(what) + ": expected an instruction set this CPU runs (best: " +
                       std::string(name_of(best())) + "), got '" + isa + "'");
  }
#if defined(CHUNKVALE_X86)
  switch (want) {
    case Isa::Avx512Bf16: return avx512bf16::table(dtype, head_dim);
    case Isa::Avx512: return avx512::table(dtype, head_dim);
    case Isa::Avx2: return avx2::table(dtype, head_dim);
    default: break;
  }
#endif
  return generic::table(dtype, head_dim);
}

const char* kernel_isa() { return name_of(best()); }

}  // namespace chunkvale
