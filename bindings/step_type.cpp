#include "step_type.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "arg_checks.h"
#include "chunkvale/errors.h"

namespace nb = nanobind;

namespace chunkvale::bind {

const Step& step_arg(nb::handle h, const std::string& name) {
  const Step* s = nullptr;
  if (!nb::try_cast<const Step*>(h, s) || !s)
    throw TypeError(name + ": expected the Step returned by plan(), got " + type_label(h));
  return *s;
}

void bind_step(nb::module_& m) {
  nb::class_<Step>(m, "Step",
                   "One planned step, bound to its cache. Rows row_offsets[i]:row_offsets[i+1] belong to "
                   "seq_ids[i]; positions[r] is row r's position in its sequence (for RoPE). commit() once every "
                   "layer was appended; cancel() drops a step that is not committed (idempotent; a committed step "
                   "stays committed: see committed).")
      .def_prop_ro("id", &Step::id)
      .def_prop_ro("num_tokens", &Step::num_tokens)
      .def_prop_ro("seq_ids", [](const Step& s) { return s.seq_ids(); })
      .def_prop_ro("row_offsets", [](const Step& s) { return s.row_offsets(); })
      // A view of the step's own copy, kept alive by the Step (writable, as numpy arrays are).
      .def_prop_ro("positions", [](nb::handle self) {
        const std::vector<int64_t>& p = nb::cast<const Step&>(self).positions();
        return nb::ndarray<nb::numpy, int64_t, nb::ndim<1>>(const_cast<int64_t*>(p.data()), {p.size()}, self);
      })
      .def_prop_ro("committed", &Step::committed)
      .def_prop_ro("cancelled", &Step::cancelled)
      .def("commit", &Step::commit, nb::call_guard<nb::gil_scoped_release>(),
           "Commits the step (every layer appended); a no-op when it is committed already.")
      .def("cancel", &Step::cancel, nb::call_guard<nb::gil_scoped_release>(),
           "Drops the step unless it is committed; returns whether it is cancelled. Never raises for a "
           "committed or cancelled step.")
      .def("__repr__", [](const Step& s) {
        const char* state = s.committed() ? "committed" : s.cancelled() ? "cancelled" : "open";
        return "Step(id=" + std::to_string(s.id()) + ", num_tokens=" + std::to_string(s.num_tokens()) + ", " +
               state + ")";
      });
}

}  // namespace chunkvale::bind
