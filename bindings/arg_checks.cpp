#include "arg_checks.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <limits>

#include "chunkvale/errors.h"

namespace nb = nanobind;

namespace chunkvale::bind {

std::string text_of(nb::handle h) {
  nb::object s = nb::steal(PyObject_Str(h.ptr()));
  if (!s.is_valid()) throw nb::python_error();
  return nb::cast<std::string>(s);
}

float sm_scale_arg(nb::handle h) {
  if (PyBool_Check(h.ptr()) || (!PyFloat_Check(h.ptr()) && !PyLong_Check(h.ptr())))
    throw TypeError("sm_scale: expected a float or None, got " + type_label(h) + " (" + text_of(h) + ")");
  const double v = PyFloat_AsDouble(h.ptr());  // an int beyond a double's range: OverflowError
  if (v == -1.0 && PyErr_Occurred()) PyErr_Clear();
  else if (std::isfinite(v) && v > 0.0 && v <= double(std::numeric_limits<float>::max()) &&
           float(v) > 0.0f)
    return float(v);
  std::string given = text_of(h);
  if (given.size() > 40) given = given.substr(0, 37) + "...";
  throw ValueError("sm_scale: expected a finite value > 0 within float32's range (or None), got " + given);
}

std::string type_label(nb::handle h) {
  if (h.is_none()) return "None";
  nb::handle t = h.type();
  std::string mod;
  if (nb::hasattr(t, "__module__")) {
    nb::object m = t.attr("__module__");
    if (nb::isinstance<nb::str>(m)) mod = nb::cast<std::string>(m);
  }
  std::string name = nb::type_name(t).c_str();
  if (mod.empty() || mod == "builtins" || name.find('.') != std::string::npos) return name;
  return mod + "." + name;
}

namespace {
bool is_bool(nb::handle h) {
  if (PyBool_Check(h.ptr())) return true;
  const std::string n = nb::type_name(h.type()).c_str();
  return n == "numpy.bool" || n == "numpy.bool_" || n == "bool" || n == "bool_";
}

std::string value_text(nb::handle h) {
  std::string s = nb::cast<std::string>(nb::str(h));
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

std::string range_text(int64_t lo, int64_t hi) {
  auto bound = [](int64_t v) {
    if (v == INT64_MAX) return std::string("2^63-1");
    if (v == INT64_MIN) return std::string("-2^63");
    if (v == INT32_MAX) return std::string("2^31-1");
    if (v == INT32_MIN) return std::string("-2^31");
    return std::to_string(v);
  };
  return "[" + bound(lo) + ", " + bound(hi) + "]";
}
}  // namespace

int64_t int_arg(nb::handle h, const std::string& name, int64_t lo, int64_t hi) {
  PyObject* o = h.ptr();
  if (is_bool(h)) throw TypeError(name + ": expected an int, got bool (" + value_text(h) + ")");
  if (!PyLong_Check(o) && (PyFloat_Check(o) || !PyIndex_Check(o)))
    throw TypeError(name + ": expected an int, got " + type_label(h) +
                    (h.is_none() ? std::string() : " (" + value_text(h) + ")"));
  nb::object idx = nb::steal(PyNumber_Index(o));
  if (!idx.is_valid()) {
    PyErr_Clear();
    throw TypeError(name + ": expected an int, got " + type_label(h));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw TypeError(name + ": expected an int, got " + type_label(h));
  }
  if (overflow || v < lo || v > hi)
    throw ValueError(name + ": expected an integer in " + range_text(lo, hi) + ", got " + value_text(idx));
  return v;
}

std::string str_arg(nb::handle h, const std::string& name) {
  if (!PyUnicode_Check(h.ptr())) throw TypeError(name + ": expected a str, got " + type_label(h));
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
  if (!p) {
    PyErr_Clear();
    throw ValueError(name + ": expected a str of valid Unicode text (UTF-8 encodable), got one with a lone "
                     "surrogate or other unencodable code point");
  }
  return std::string(p, size_t(n));
}

std::vector<int32_t> tokens_arg(nb::handle h, const std::string& name) {
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h))
    throw TypeError(name + ": expected a list of int token ids, got " + type_label(h));
  nb::sequence seq = nb::borrow<nb::sequence>(h);
  const size_t n = nb::len(seq);
  std::vector<int32_t> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    nb::object t = seq[i];
    PyObject* o = t.ptr();
    int overflow = 0;
    long long v = 0;
    if (PyLong_CheckExact(o) && (v = PyLong_AsLongLongAndOverflow(o, &overflow), !overflow) && v >= INT32_MIN &&
        v <= INT32_MAX) {
      out.push_back(int32_t(v));  // the common case, without building a name
      continue;
    }
    PyErr_Clear();
    out.push_back(int32_t(int_arg(t, name + "[" + std::to_string(i) + "]", INT32_MIN, INT32_MAX)));
  }
  return out;
}

namespace {
// What makes an object not an array the core can read, before nanobind's generic refusal.
void diagnose(nb::handle h, const std::string& name, bool writable) {
  if (h.is_none() || !nb::hasattr(h, "__dlpack__"))
    throw TypeError(name + ": expected a numpy array or a torch tensor, got " + type_label(h));
  if (nb::hasattr(h, "dtype")) {
    nb::object dt = h.attr("dtype");
    if (nb::hasattr(dt, "isnative") && !nb::cast<bool>(dt.attr("isnative")))
      throw TypeError(name + ": expected an array in the machine's byte order (little-endian), got dtype " +
                      nb::cast<std::string>(nb::str(dt)) + " (byte order '" +
                      nb::cast<std::string>(nb::str(dt.attr("byteorder"))) + "'); use .astype(dtype.newbyteorder('='))");
  }
  if (nb::hasattr(h, "device") && nb::hasattr(h, "requires_grad")) {  // a torch tensor
    nb::object dev = h.attr("device");
    if (nb::hasattr(dev, "type")) {
      const std::string t = nb::cast<std::string>(nb::str(dev.attr("type")));
      if (t != "cpu" && t != "cuda")
        throw TypeError(name + ": expected a tensor on cpu or cuda, got one on " + t +
                        (t == "meta" ? " (a meta tensor has no data)" : ""));
    }
    if (writable && nb::cast<bool>(h.attr("requires_grad")))
      throw TypeError(name + ": expected an output tensor that does not require grad, got one with "
                      "requires_grad=True");
  }
  if (writable && nb::hasattr(h, "flags")) {
    nb::object flags = h.attr("flags");
    if (nb::hasattr(flags, "writeable") && !nb::cast<bool>(flags.attr("writeable")))
      throw ValueError(name + ": expected a writable array, got a read-only one (e.g. backed by bytes, or "
                       "a broadcast view); pass a fresh array such as numpy.empty_like(q)");
  }
}

// The cast first (the hot path: a few calls per layer and step); only an array nanobind
// refuses (big-endian, read-only for an output, a meta or grad tensor, not an array at all)
// is looked at closely, to name what is wrong with it.
template <typename Array>
Array as_array(nb::handle h, const std::string& name, bool writable) {
  Array a;
  if (nb::try_cast<Array>(h, a, /*convert=*/false)) {
    // Reading a tensor that requires grad is harmless; writing into one would bypass autograd.
    if (writable && nb::hasattr(h, "requires_grad") && nb::cast<bool>(h.attr("requires_grad")))
      throw TypeError(name + ": expected an output tensor that does not require grad, got one with "
                      "requires_grad=True");
    return a;
  }
  diagnose(h, name, writable);
  throw TypeError(name + ": expected a numpy array or a torch tensor that DLPack can export" +
                  std::string(writable ? " (writable)" : "") + ", got a " + type_label(h) + " that it cannot");
}
}  // namespace

AnyArray in_array(nb::handle h, const std::string& name) { return as_array<AnyArray>(h, name, false); }
OutArray out_array(nb::handle h, const std::string& name) { return as_array<OutArray>(h, name, true); }

}  // namespace chunkvale::bind
