// What the kernel headers compile against, in one place: the CUDA runtime and the PTX
// primitives under nvcc, or emulate.h's host emulation of both when CHUNKVALE_EMULATE is
// defined (the emulation tests in tests/cpp/cuda/), plus the headers the kernels share with
// the CPU (pool view, dtype conversion, softmax state).
#pragma once
#include <cstdint>

#ifdef CHUNKVALE_EMULATE
#include "emulate.h"
#else
#include "attention_ptx.cuh"
#endif

#include "chunkvale/detail/dtype_convert.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/detail/softmax_state.h"
