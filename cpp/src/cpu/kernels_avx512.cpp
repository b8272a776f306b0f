// The attention kernels built for the avx512 instruction set (see CMakeLists.txt flags).
#define CHUNKVALE_ISA_NS avx512
#include "attention_kernels.inc"
