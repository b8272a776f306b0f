// The attention kernels built for the generic instruction set (see CMakeLists.txt flags).
#define CHUNKVALE_ISA_NS generic
#include "attention_kernels.inc"
