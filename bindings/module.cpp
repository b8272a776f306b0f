// chunkvale._native: the core's API for Python. Tensors cross as DLPack (no libtorch);
// python/chunkvale wraps this with allocation of outputs and friendlier types.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>

#include "chunkvale/kv_cache.h"
#include "arg_checks.h"
#include "cache_types.h"
#include "paged_types.h"
#include "step_type.h"
#include "tensor_args.h"

namespace nb = nanobind;
using namespace nb::literals;
using chunkvale::bind::AnyArray;
using chunkvale::bind::in_array;
using chunkvale::bind::int32_arg;
using chunkvale::bind::int_arg;
using chunkvale::bind::OutArray;
using chunkvale::bind::out_array;
using chunkvale::bind::step_arg;
using chunkvale::bind::str_arg;
using chunkvale::bind::tokens_arg;
using chunkvale::bind::view_of;

namespace chunkvale {
const char* kernel_isa();
std::vector<std::string> kernel_isas();
std::vector<std::pair<std::string, std::string>> kernel_isa_report();
bool cuda_backend_built();
}

namespace {

using chunkvale::KVCache;

std::vector<chunkvale::PlanEntry> parse_entries(nb::handle entries) {
  if (!nb::isinstance<nb::list>(entries) && !nb::isinstance<nb::tuple>(entries))
    throw chunkvale::TypeError("entries: expected a list of (seq, n_new) or (seq, token_ids) pairs, got " +
                               chunkvale::bind::type_label(entries));
  std::vector<chunkvale::PlanEntry> out;
  size_t i = 0;
  for (nb::handle e : entries) {
    std::string arg = "entries[" + std::to_string(i++) + "]";
    if (!nb::isinstance<nb::tuple>(e) && !nb::isinstance<nb::list>(e))
      throw chunkvale::TypeError(arg + ": expected a (seq, n_new) or (seq, token_ids) pair, got " +
                                 chunkvale::bind::type_label(e));
    nb::sequence pair = nb::borrow<nb::sequence>(e);
    if (nb::len(pair) != 2)
      throw chunkvale::ValueError(arg + ": expected a pair (seq, n_new), got " +
                                  std::to_string(nb::len(pair)) + " items");
    chunkvale::PlanEntry pe;
    nb::object seq = pair[0], what = pair[1];
    pe.seq = int_arg(seq, arg + ": seq", INT64_MIN, INT64_MAX);
    if (nb::isinstance<nb::list>(what) || nb::isinstance<nb::tuple>(what)) {
      pe.tokens = tokens_arg(what, arg + ": token_ids");
      if (pe.tokens.empty())
        throw chunkvale::ValueError(arg + ": token_ids: expected at least one token id, got []");
    } else {
      if (!PyIndex_Check(what.ptr()) || PyBool_Check(what.ptr()))
        throw chunkvale::TypeError(arg + ": n_new: expected an int (pending prompt tokens) or a list of token "
                                   "ids, got " + chunkvale::bind::type_label(what));
      pe.count = int_arg(what, arg + ": n_new", 1, INT32_MAX);
    }
    out.push_back(std::move(pe));
  }
  return out;
}

// chunkvale.CapacityError is a Python class (python/chunkvale/errors.py), so Python code can
// raise it too. The package hands it in when it is imported (set_capacity_error_type): the
// module never imports the package above it. Until then, a RuntimeError with the same text.
nb::object& capacity_error_type() {
  static nb::object* cls = new nb::object();  // never destroyed: the interpreter may outlive statics
  return *cls;
}

void set_capacity_error(const chunkvale::CapacityError& e) {
  nb::object& cls = capacity_error_type();
  if (!cls.is_valid()) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return;
  }
  try {
    nb::object exc = cls(e.what(), chunkvale::resource_name(e.resource), e.needed, e.available);
    PyErr_SetObject(cls.ptr(), exc.ptr());
  } catch (nb::python_error& err) {
    err.restore();  // the class refused its fields: its own error says why
  }
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "chunkvale native core";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const chunkvale::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const chunkvale::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const chunkvale::KeyError& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    } catch (const chunkvale::CapacityError& e) {
      set_capacity_error(e);
    } catch (const chunkvale::IOError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  m.def("kernel_isa", [] { return std::string(chunkvale::kernel_isa()); },
        "Instruction set of the CPU kernels chosen at run time.");
  m.def("kernel_isas", [] { return chunkvale::kernel_isas(); },
        "Every instruction set of the CPU kernels this CPU runs, best first.");
  m.def("kernel_isa_report", [] { return chunkvale::kernel_isa_report(); },
        "Every instruction set chunkvale knows, best first, with why it does not run here ('' when it does).");
  m.def("cuda_built", [] { return chunkvale::cuda_backend_built(); },
        "Whether this build contains the CUDA backend.");
  m.def("cuda_device_count", [] { return chunkvale::cuda_device_count(); },
        "CUDA devices usable at run time (0 without the CUDA backend, a driver or a GPU).");

  m.def("set_capacity_error_type", [](nb::handle cls) {
        if (!PyType_Check(cls.ptr()) || !PyType_IsSubtype((PyTypeObject*)cls.ptr(), (PyTypeObject*)PyExc_RuntimeError))
          throw chunkvale::TypeError("cls: expected a subclass of RuntimeError, got " + chunkvale::bind::type_label(cls));
        capacity_error_type() = nb::borrow(cls);
      }, "cls"_a.none(), "The class KVCache raises for CapacityError(message, resource, needed, available) "
      "(chunkvale.errors sets it when imported).");

  chunkvale::bind::bind_cache_types(m);
  chunkvale::bind::bind_step(m);
  chunkvale::bind::bind_paged_types(m);

  nb::class_<KVCache>(m, "KVCache")
      .def(nb::init<const chunkvale::CacheConfig&>(), "config"_a)
      .def_prop_ro("config", [](const KVCache& c) { return c.config(); })
      .def("add_sequence",
           [](KVCache& c, nb::handle tokens, nb::handle ns, nb::handle max_reuse) {
             std::vector<int32_t> t = tokens_arg(tokens, "token_ids");
             std::string n = str_arg(ns, "namespace");
             int64_t m = max_reuse.is_none() ? -1 : int_arg(max_reuse, "max_reuse", 0, INT64_MAX);
             nb::gil_scoped_release r;
             return c.add_sequence(t, n, m);
           },
           "token_ids"_a.none(), "namespace"_a.none(), "max_reuse"_a.none())
      .def("plan", [](KVCache& c, nb::handle entries) {
             auto parsed = parse_entries(entries);
             nb::gil_scoped_release r;
             return c.plan(parsed);
           }, "entries"_a.none(), nb::keep_alive<0, 1>())  // the Step keeps its cache alive
      .def("needs", [](KVCache& c, nb::handle entries) {
             auto parsed = parse_entries(entries);
             nb::gil_scoped_release r;
             return c.needs(parsed);
           }, "entries"_a.none())
      .def("request_needs",
           [](const KVCache& c, nb::handle prompt_tokens, nb::handle max_new_tokens, nb::handle n) {
             return c.request_needs(int_arg(prompt_tokens, "prompt_tokens", 1, INT64_MAX),
                                    int_arg(max_new_tokens, "max_new_tokens", 1, INT64_MAX),
                                    int(int_arg(n, "n", 1, INT32_MAX)));
           },
           "prompt_tokens"_a.none(), "max_new_tokens"_a.none(), "n"_a.none())
      .def("append",
           [](KVCache& c, nb::handle layer, nb::handle step, nb::handle k, nb::handle v, nb::handle stream) {
             const int l = int32_arg(layer, "layer");
             const chunkvale::Step& s = step_arg(step, "step");
             AnyArray ka = in_array(k, "k"), va = in_array(v, "v");
             const auto st = uintptr_t(int_arg(stream, "stream", 0, INT64_MAX));
             nb::gil_scoped_release r;
             c.append(l, s, view_of(ka), view_of(va), chunkvale::ExecContext{reinterpret_cast<void*>(st)});
           },
           "layer"_a.none(), "step"_a.none(), "k"_a.none(), "v"_a.none(), "stream"_a.none() = 0)
      .def("attention",
           [](KVCache& c, nb::handle layer, nb::handle step, nb::handle q, nb::handle out, nb::handle lse,
              nb::handle stream) {
             const int l = int32_arg(layer, "layer");
             const chunkvale::Step& s = step_arg(step, "step");
             AnyArray qa = in_array(q, "q");
             OutArray oa = out_array(out, "out");
             std::optional<OutArray> la;
             if (!lse.is_none()) la = out_array(lse, "lse");
             const auto st = uintptr_t(int_arg(stream, "stream", 0, INT64_MAX));
             nb::gil_scoped_release r;
             chunkvale::TensorView lv;
             if (la) lv = view_of(*la);
             c.attention(l, s, view_of(qa), view_of(oa), la ? &lv : nullptr,
                         chunkvale::ExecContext{reinterpret_cast<void*>(st)});
           },
           "layer"_a.none(), "step"_a.none(), "q"_a.none(), "out"_a.none(), "lse"_a.none(), "stream"_a.none() = 0)
      .def("cancel", [](KVCache& c, nb::handle step) {
             const chunkvale::Step& s = step_arg(step, "step");
             nb::gil_scoped_release r;
             c.cancel(s);
           }, "step"_a.none())
      .def("fork", [](KVCache& c, nb::handle seq, nb::handle n) {
             const int64_t s = int_arg(seq, "seq", INT64_MIN, INT64_MAX);
             const int k = int(int_arg(n, "n", 1, chunkvale::kMaxForkChildren));
             nb::gil_scoped_release r;
             return c.fork(s, k);
           }, "seq"_a.none(), "n"_a.none())
      .def("remove", [](KVCache& c, nb::handle seq) {
             const int64_t s = int_arg(seq, "seq", INT64_MIN, INT64_MAX);
             nb::gil_scoped_release r;
             c.remove(s);
           }, "seq"_a.none())
      .def("clear", &KVCache::clear, nb::call_guard<nb::gil_scoped_release>())
      .def("sequence_length", [](KVCache& c, nb::handle seq) {
             return c.sequence_length(int_arg(seq, "seq", INT64_MIN, INT64_MAX));
           }, "seq"_a.none())
      .def("sequence_slots", [](KVCache& c, nb::handle seq) {
             return c.sequence_slots(int_arg(seq, "seq", INT64_MIN, INT64_MAX));
           }, "seq"_a.none())
      .def("stats", &KVCache::stats, nb::call_guard<nb::gil_scoped_release>())
      .def("read_tile",
           [](const KVCache& c, nb::handle layer, nb::handle slot, nb::handle kv, nb::handle head) {
             const int l = int32_arg(layer, "layer"), s = int32_arg(slot, "slot"), k = int32_arg(kv, "kv"),
                       h = int32_arg(head, "head");
             const auto& cfg = c.config();
             size_t n = size_t(cfg.chunk_size) * cfg.head_dim;
             auto buf = std::make_unique<std::vector<float>>(n);
             c.read_tile(l, s, k, h, buf->data());
             float* data = buf->data();
             nb::capsule owner(buf.release(), [](void* v) noexcept { delete static_cast<std::vector<float>*>(v); });
             return nb::ndarray<nb::numpy, float, nb::ndim<2>>(
                 data, {size_t(cfg.chunk_size), size_t(cfg.head_dim)}, owner);
           },
           "layer"_a.none(), "slot"_a.none(), "kv"_a.none(), "head"_a.none())
      .def("chunk_residency", [](const KVCache& c, nb::handle layer, nb::handle slot) {
             return c.chunk_residency(int32_arg(layer, "layer"), int32_arg(slot, "slot"));
           }, "layer"_a.none(), "slot"_a.none())
      .def("read_digest",
           [](const KVCache& c, nb::handle layer, nb::handle slot, nb::handle head) {
             const int l = int32_arg(layer, "layer"), s = int32_arg(slot, "slot"), h = int32_arg(head, "head");
             size_t D = size_t(c.config().head_dim);
             auto buf = std::make_unique<std::vector<float>>(2 * D);
             c.read_digest(l, s, h, buf->data());
             float* data = buf->data();
             nb::capsule owner(buf.release(), [](void* v) noexcept { delete static_cast<std::vector<float>*>(v); });
             return nb::ndarray<nb::numpy, float, nb::ndim<2>>(data, {2, D}, owner);
           },
           "layer"_a.none(), "slot"_a.none(), "head"_a.none());
}
