// The attention kernels built for AVX-512 with BF16 dot products (see CMakeLists.txt flags):
// the avx512 kernels, with bf16 storage using VDPBF16PS in the lanes path (bf16_dot.inc).
#define CHUNKVALE_ISA_NS avx512bf16
#include "attention_kernels.inc"
