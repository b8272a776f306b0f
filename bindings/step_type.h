// chunkvale.Step: the Step that KVCache.plan() returns, bound as a Python type (its rows,
// positions, commit(), cancel(), committed), and the check of a `step` argument.
#pragma once
#include <nanobind/nanobind.h>

#include <string>

#include "chunkvale/step.h"

namespace chunkvale::bind {
void bind_step(nanobind::module_& m);
// The Step an argument holds: TypeError naming `name` for anything else (the cache itself
// says whether it is its open step).
const Step& step_arg(nanobind::handle h, const std::string& name);
}  // namespace chunkvale::bind
