// The C++ type of an fp16 element: _Float16 where the compiler has it in C++ (x86-64 since
// GCC 12), ARM's __fp16 storage type on aarch64 (GCC adds _Float16 to C++ there only in 13).
#pragma once

namespace chunkvale {
#if defined(__aarch64__)
using half_t = __fp16;
#else
using half_t = _Float16;
#endif
}  // namespace chunkvale
