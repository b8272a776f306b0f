#include <cstdlib>

#include "chunkvale/errors.h"
#include "cpu_features.h"
#include "kernels.h"

namespace chunkvale {
namespace {
// In order: each runs where the next does.
enum class Isa { Generic, Avx2, Avx512, Avx512Bf16, AmxBf16 };
constexpr Isa kAll[] = {Isa::AmxBf16, Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Generic};  // best first
const char* name_of(Isa i) {
  switch (i) {
    case Isa::AmxBf16: return "amx_bf16";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

// Whether this build has the kernels of `i` (AMX needs a compiler that targets it).
bool built(Isa i) {
#if !defined(CHUNKVALE_X86)
  return i == Isa::Generic;
#elif !defined(CHUNKVALE_HAVE_AMX)
  return i != Isa::AmxBf16;
#else
  (void)i;
  return true;
#endif
}

Isa detect() {
  const CpuFeatures& f = cpu_features();
  if (built(Isa::AmxBf16) && f.amx_bf16 && f.amx_granted) return Isa::AmxBf16;
  if (f.avx512) return f.avx512_bf16 ? Isa::Avx512Bf16 : Isa::Avx512;
  if (f.avx2_fma) return Isa::Avx2;
  return Isa::Generic;
}

Isa best() {
  static const Isa chosen = detect();
  return chosen;
}

// Why `i` does not run here ("" when it does).
std::string why_not(Isa i) {
  if (!built(i)) return "not in this build (the compiler does not target it)";
  if (int(i) <= int(best())) return "";
  const CpuFeatures& f = cpu_features();
  switch (i) {
    case Isa::AmxBf16: return f.amx_refusal.empty() ? "this CPU does not run it" : f.amx_refusal;
    case Isa::Avx512Bf16: return "this CPU has no AVX512-BF16";
    case Isa::Avx512: return "this CPU has no AVX-512 (F, BW, VL, DQ)";
    default: return "this CPU has no AVX2 with FMA";
  }
}
}  // namespace

std::vector<std::string> kernel_isas() {
  std::vector<std::string> out;
  for (Isa i : kAll)
    if (int(i) <= int(best()) && built(i)) out.push_back(name_of(i));
  return out;
}

std::vector<std::pair<std::string, std::string>> kernel_isa_report() {
  std::vector<std::pair<std::string, std::string>> out;
  for (Isa i : kAll) out.emplace_back(name_of(i), why_not(i));
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
      throw ValueError(std::string(what) + ": expected '' (best), 'amx_bf16', 'avx512bf16', 'avx512', 'avx2' or "
                       "'generic', got '" + isa + "'");
    const std::string why = why_not(want);
    if (!why.empty())
      throw ValueError(std::string(what) + ": expected an instruction set this CPU runs (" +
                       std::string(name_of(best())) + " or below), got '" + isa + "': " + why);
  }
#if defined(CHUNKVALE_X86)
  switch (want) {
#if defined(CHUNKVALE_HAVE_AMX)
    case Isa::AmxBf16: return amx_bf16::table(dtype, head_dim);
#endif
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
