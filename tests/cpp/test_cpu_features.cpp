// What the CPU and the kernel let this process run: the kernel table's instruction sets agree
// with the report of why each one does or does not run, forcing one that does not run is a
// ValueError carrying that reason (never a SIGILL), and AMX tile state is requested the way
// Linux hands it out: granted where the CPU has AMX, refused with the kernel's error elsewhere.
#include <cstdio>
#include <string>

#include "check.h"
#include "chunkvale/errors.h"
#include "cpu_features.h"
#include "kernels.h"

using namespace chunkvale;

int main() {
  const CpuFeatures& f = cpu_features();
  const auto isas = kernel_isas();
  const auto report = kernel_isa_report();
  std::printf("runs:");
  for (const auto& i : isas) std::printf(" %s", i.c_str());
  std::printf("\n");
  CHECK(!isas.empty() && isas.back() == "generic");
  CHECK(isas.front() == kernel_isa());
  for (const auto& [name, why] : report) {
    std::printf("  %-10s %s\n", name.c_str(), why.empty() ? "runs" : why.c_str());
    bool listed = false;
    for (const auto& i : isas) listed |= i == name;
    EXPECT(listed == why.empty(), "%s: listed %d, reason '%s'", name.c_str(), int(listed), why.c_str());
    if (why.empty()) {
      CHECK(kernels_for(DType::BFloat16, 64, name) != nullptr);
    } else {
      CHECK_THROWS(kernels_for(DType::BFloat16, 64, name), ValueError, why.c_str());
    }
  }
  CHECK_THROWS(kernels_for(DType::Float32, 64, "amx"), ValueError, "'amx_bf16', 'avx512bf16'");

  // AMX tile state: the request either succeeds (where the CPU and OS have AMX) or names the
  // kernel's refusal; asking twice gives the same answer.
  std::string why;
  const bool granted = request_amx_tile_state(&why);
  std::printf("AMX tile state: %s\n", granted ? "granted" : why.c_str());
  if (f.amx_bf16) {
    CHECK(granted == f.amx_granted);
  } else {
    CHECK(!f.amx_granted && !f.amx_refusal.empty());
    if (!granted) CHECK(why.find("arch_prctl") != std::string::npos || why.find("not available") != std::string::npos);
  }
  std::string why2;
  CHECK(request_amx_tile_state(&why2) == granted);
  return failures();
}
