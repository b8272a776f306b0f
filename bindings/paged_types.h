// PagedAttention and PagedPlan bound as Python types (chunkvale.PagedAttention,
// chunkvale.PagedPlan): the stateless entry point over a caller's paged KV pool.
#pragma once
#include <nanobind/nanobind.h>

namespace chunkvale::bind {
void bind_paged_types(nanobind::module_& m);
}
