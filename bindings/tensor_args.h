// DLPack tensors (numpy arrays, torch tensors, ...) to the core's TensorView.
#pragma once
#include <nanobind/ndarray.h>

#include "chunkvale/tensor.h"

namespace chunkvale::bind {

using AnyArray = nanobind::ndarray<nanobind::ro>;  // inputs (read-only ones accepted)
using OutArray = nanobind::ndarray<>;              // outputs (must be writable)

// Describes an array; dtype and device are recorded, not checked (the core checks
// them against the cache, naming the argument).
TensorView view_of(const AnyArray& a);
inline TensorView view_of(const OutArray& a) { return view_of(AnyArray(a)); }

}  // namespace chunkvale::bind
