// Exceptions of the public API. Each maps to one Python exception type in the bindings;
// messages name the argument, what was expected and what was given.
// Messages are built with std::to_string, never iostreams: a toolchain that links libstdc++
// statically into the module (the GPU machine's /opt/gcc does) crashes formatting numbers
// through ostream once torch has loaded the shared libstdc++ (two copies' locale facets).
#pragma once
#include <cstdint>
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
// The resources a step can run out of, each bounded by one config field.
enum class Resource { PoolChunks, DeviceChunks, HostBlocks };
// The config field that bounds `r`: "capacity_chunks", "eviction.device_chunks",
// "eviction.host_bytes".
inline const char* resource_name(Resource r) {
  switch (r) {
    case Resource::PoolChunks: return "capacity_chunks";
    case Resource::DeviceChunks: return "eviction.device_chunks";
    case Resource::HostBlocks: return "eviction.host_bytes";
  }
  return "?";
}

// A resource is exhausted and nothing can be reclaimed (Python: chunkvale.CapacityError).
// `needed` and `available` are in the resource's unit (pool chunks, device chunks per
// evicting layer, host blocks), so a caller can decide without reading the message.
// An internal-invariant failure is std::logic_error, never this.
struct CapacityError : std::runtime_error {
  CapacityError(Resource r, int64_t needed, int64_t available, const std::string& message)
      : std::runtime_error(message), resource(r), needed(needed), available(available) {}
  Resource resource;
  int64_t needed, available;
};
// The spill file failed: a read or write error, or a block that does not hold what the cache
// wrote there (changed behind its back). Python: OSError. The cache itself stays consistent.
struct IOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace chunkvale
