// Argument checks at the Python boundary: every argument arrives as a Python object and is
// checked here, so that a wrong type, an int out of range, a bool where an int is meant, an
// array of the wrong byte order or writability, or a string that is not valid Unicode is a
// TypeError / ValueError naming the argument, the expected and the given (never nanobind's
// generic "incompatible function arguments"). Call with the GIL held.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tensor_args.h"

namespace chunkvale::bind {

// How an argument's type is named in messages ("None", "float", "numpy.ndarray", ...).
std::string type_label(nanobind::handle h);

// A Python int (or an object with __index__, e.g. numpy.int64) in [lo, hi]. bool and
// numpy.bool_ are refused (TypeError), as are float, None and str; an int outside
// [lo, hi] is a ValueError.
int64_t int_arg(nanobind::handle h, const std::string& name, int64_t lo, int64_t hi);
inline int32_t int32_arg(nanobind::handle h, const std::string& name) {
  return int32_t(int_arg(h, name, INT32_MIN, INT32_MAX));
}
// str(h), as Python prints it.
std::string text_of(nanobind::handle h);
// sm_scale, for every front (KVCache's config, PagedAttention): a finite float > 0 (an int too,
// never a bool) within float32's range, so that it never rounds to 0 (the core's "default").
float sm_scale_arg(nanobind::handle h);
// A str whose text is valid Unicode (UTF-8 encodable: no lone surrogates).
std::string str_arg(nanobind::handle h, const std::string& name);
// A list or tuple of int32 token ids.
std::vector<int32_t> tokens_arg(nanobind::handle h, const std::string& name);
// An input array (numpy array, torch tensor or any DLPack exporter); read-only ones are
// accepted. Byte order, exportability and kind are checked; shape, dtype and device are
// the core's to check (it knows the cache's).
AnyArray in_array(nanobind::handle h, const std::string& name);
// An output array: as in_array, writable, and (a torch tensor) not requiring grad.
OutArray out_array(nanobind::handle h, const std::string& name);

}  // namespace chunkvale::bind
