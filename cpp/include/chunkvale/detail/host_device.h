// CHUNKVALE_HD marks a function that the CPU kernels, the CUDA kernels and the CUDA host
// code (and cuda/emulate.h, which runs the kernels on the CPU) all call: __host__ __device__
// under nvcc, nothing elsewhere.
#pragma once

#if defined(__CUDACC__)
#define CHUNKVALE_HD __host__ __device__ __forceinline__
#else
#define CHUNKVALE_HD inline __attribute__((always_inline))
#endif
