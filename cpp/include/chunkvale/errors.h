// Exceptions of the public API. Each maps to one Python exception type in the bindings;
// messages name the argument, what was expected and what was given.
// Messages are built with std::to_string, never iostreams: a toolchain that links libstdc++
// statically into the module (the GPU machine's /opt/gcc does) crashes formatting numbers
// through ostream once torch has loaded the shared libstdc++ (two copies' locale facets).
#pragma once
#include <stdexcept>
#include <string>

namespace chunkvale {

// Bad value, shape, state or stale step (Python: ValueError).
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Wrong dtype or tensor kind/device (Python: TypeError).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Unknown or removed sequence id (Python: KeyError).
struct KeyError : std::out_of_range {
  using std::out_of_range::out_of_range;
};
// The pool is full and nothing can be reclaimed (Python: chunkvale.CapacityError).
struct CapacityError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The spill file failed: a read or write error, or a block that does not hold what the cache
// wrote there (changed behind its back). Python: OSError. The cache itself stays consistent.
struct IOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace chunkvale
