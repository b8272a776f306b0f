// The storage dtypes (fp32, fp16, bf16) to and from fp32, for the CPU kernels, the CUDA
// kernels, the emulator and the backends' host code. bf16 is done on the bits (it is the
// top half of an fp32), so host and device agree exactly; fp16 uses the hardware type of
// each side (_Float16 / __fp16 on the CPU, __half under CUDA and the emulator).
#pragma once
#include <cstdint>
#include <cstring>

#include "chunkvale/detail/host_device.h"

#if defined(__CUDACC__) || defined(CHUNKVALE_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define CHUNKVALE_CUDA_TYPES 1
#endif

namespace chunkvale {

#if !defined(CHUNKVALE_CUDA_TYPES)
// The C++ type of an fp16 element on the CPU: _Float16 where the compiler has it in C++
// (x86-64 since GCC 12), ARM's __fp16 storage type on aarch64 (GCC adds _Float16 to C++
// there only in 13).
#if defined(__aarch64__)
using half_t = __fp16;
#else
using half_t = _Float16;
#endif
#endif

// The bits of x as a To (memcpy: defined behaviour, one move on host and device).
template <class To, class From>
CHUNKVALE_HD To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}

CHUNKVALE_HD float bf16_to_float(uint16_t b) { return bit_cast<float>(uint32_t(b) << 16); }
// Round to nearest even; NaNs stay (quiet) NaNs.
CHUNKVALE_HD uint16_t float_to_bf16(float f) {
  uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

#if !defined(CHUNKVALE_CUDA_TYPES)
// (CUDA code reads fp16 bits with bits_to_float_as<__half>.)
inline float f16_to_float(uint16_t bits) { return float(bit_cast<half_t>(bits)); }
#endif

#if defined(CHUNKVALE_CUDA_TYPES)
// The CUDA element types (__half, __nv_bfloat16) and their uint16_t storage bits.
template <typename T>
struct CudaElem;
template <>
struct CudaElem<__half> {
  CHUNKVALE_HD static float to(__half x) { return __half2float(x); }
  CHUNKVALE_HD static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct CudaElem<__nv_bfloat16> {
  CHUNKVALE_HD static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  CHUNKVALE_HD static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <typename T>
CHUNKVALE_HD float to_float(T x) {
  return CudaElem<T>::to(x);
}
template <typename T>
CHUNKVALE_HD T from_float(float x) {
  return CudaElem<T>::from(x);
}

// The element of type T stored in `bits`, as fp32 (and back: the bits of x rounded to T).
template <typename T>
CHUNKVALE_HD float bits_to_float_as(uint16_t bits) {
  return to_float<T>(bit_cast<T>(bits));
}
template <typename T>
CHUNKVALE_HD uint16_t float_to_bits_as(float x) {
  return bit_cast<uint16_t>(from_float<T>(x));
}
#endif

}  // namespace chunkvale
