// The attention kernels built for AMX-BF16 (see CMakeLists.txt flags): the avx512bf16
// kernels, with bf16 caches' many-row units on the matrix engine (attention_amx.inc).
#define CHUNKVALE_ISA_NS amx_bf16
#include "attention_kernels.inc"
