// The attention kernels built for the avx2 instruction set (see CMakeLists.txt flags).
#define CHUNKVALE_ISA_NS avx2
#include "attention_kernels.inc"
