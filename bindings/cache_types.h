// The core's value types bound as Python types: CacheStats (read-only, also a read-only
// mapping, so stats()["field"] keeps working), CacheConfig and EvictionConfig (the config
// python/chunkvale/config.py builds after checking every field's type and range), StepNeeds.
#pragma once
#include <nanobind/nanobind.h>

namespace chunkvale::bind {
void bind_cache_types(nanobind::module_& m);
}
