// chunkvale._native: the core's API for Python. Tensors cross as DLPack (no libtorch);
// python/chunkvale wraps this with allocation of outputs and friendlier types.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>

#include "../cuda/cuda_api.h"
#include "chunkvale/kv_cache.h"
#include "tensor_args.h"

namespace nb = nanobind;
using namespace nb::literals;
using chunkvale::bind::AnyArray;
using chunkvale::bind::OutArray;
using chunkvale::bind::view_of;

namespace chunkvale {
const char* kernel_isa();
std::vector<std::string> kernel_isas();
bool cuda_backend_built();
}

namespace {

using chunkvale::KVCache;

std::vector<chunkvale::PlanEntry> parse_entries(nb::handle entries) {
  if (!nb::isinstance<nb::list>(entries) && !nb::isinstance<nb::tuple>(entries))
    throw chunkvale::TypeError("entries: expected a list of (seq, n_new) or (seq, token_ids) pairs");
  std::vector<chunkvale::PlanEntry> out;
  size_t i = 0;
  for (nb::handle e : entries) {
    std::string arg = "entries[" + std::to_string(i++) + "]";
    if (!nb::isinstance<nb::tuple>(e) && !nb::isinstance<nb::list>(e))
      throw chunkvale::TypeError(arg + ": expected a (seq, n_new) or (seq, token_ids) pair, got " +
                                 std::string(nb::type_name(e.type()).c_str()));
    nb::sequence pair = nb::borrow<nb::sequence>(e);
    if (nb::len(pair) != 2)
      throw chunkvale::ValueError(arg + ": expected a pair (seq, n_new), got " +
                                  std::to_string(nb::len(pair)) + " items");
    chunkvale::PlanEntry pe;
    nb::handle seq = pair[0], what = pair[1];
    if (!nb::isinstance<nb::int_>(seq))
      throw chunkvale::TypeError(arg + ": sequence id: expected an int, got " +
                                 std::string(nb::type_name(seq.type()).c_str()));
    pe.seq = nb::cast<int64_t>(seq);
    if (nb::isinstance<nb::int_>(what)) {
      pe.count = nb::cast<int64_t>(what);
      if (pe.count < 1)
        throw chunkvale::ValueError(arg + ": n_new: expected an integer >= 1, got " + std::to_string(pe.count));
    } else {
      try {
        pe.tokens = nb::cast<std::vector<int32_t>>(what);
      } catch (const nb::cast_error&) {
        throw chunkvale::TypeError(arg + ": expected n_new (int) or a list of int32 token ids, got " +
                                   std::string(nb::type_name(what.type()).c_str()));
      }
      if (pe.tokens.empty())
        throw chunkvale::ValueError(arg + ": token_ids: expected at least one token id, got []");
    }
    out.push_back(std::move(pe));
  }
  return out;
}

nb::dict stats_dict(const chunkvale::CacheStats& s) {
  nb::dict d;
  d["capacity_chunks"] = s.capacity_chunks;
  d["chunks_in_use"] = s.chunks_in_use;
  d["chunks_free"] = s.chunks_free;
  d["chunks_shared"] = s.chunks_shared;
  d["chunks_cached"] = s.chunks_cached;
  d["peak_chunks"] = s.peak_chunks;
  d["sequences"] = s.sequences;
  d["tokens_cached"] = s.tokens_cached;
  d["tokens_saved_by_sharing"] = s.tokens_saved_by_sharing;
  d["reused_prompt_tokens"] = s.reused_prompt_tokens;
  d["bytes_per_chunk"] = s.bytes_per_chunk;
  d["plan_rebuilds"] = s.plan_rebuilds;
  d["plan_reuses"] = s.plan_reuses;
  d["chunk_first_units"] = s.chunk_first_units;
  d["chunk_first_chunks"] = s.chunk_first_chunks;
  d["evict_scored_chunks"] = s.evict_scored_chunks;
  d["evict_dropped_chunks"] = s.evict_dropped_chunks;
  d["evict_select_seconds"] = double(s.evict_select_ns) * 1e-9;
  d["evict_score_seconds"] = double(s.evict_score_ns) * 1e-9;
  d["evict_device_chunks"] = s.evict_device_chunks;
  d["evict_device_slots_in_use"] = s.evict_device_slots_in_use;
  d["evict_backups"] = s.evict_backups;
  d["evict_recalls"] = s.evict_recalls;
  d["evict_evictions"] = s.evict_evictions;
  d["evict_backup_waits"] = s.evict_backup_waits;
  d["evict_bytes_to_host"] = s.evict_bytes_to_host;
  d["evict_bytes_from_host"] = s.evict_bytes_from_host;
  d["evict_host_bytes_in_use"] = s.evict_host_bytes_in_use;
  d["evict_spill_bytes_in_use"] = s.evict_spill_bytes_in_use;
  d["evict_residency_seconds"] = double(s.evict_residency_ns) * 1e-9;
  return d;
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "chunkvale native core";
  static nb::exception<chunkvale::CapacityError> capacity_error(m, "CapacityError", PyExc_RuntimeError);
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
      PyErr_SetString(capacity_error.ptr(), e.what());
    }
  });

  m.def("kernel_isa", [] { return std::string(chunkvale::kernel_isa()); },
        "Instruction set of the CPU kernels chosen at run time.");
  m.def("kernel_isas", [] { return chunkvale::kernel_isas(); },
        "Every instruction set of the CPU kernels this CPU runs, best first.");
  m.def("cuda_built", [] { return chunkvale::cuda_backend_built(); },
        "Whether this build contains the CUDA backend.");
  m.def("cuda_device_count", [] { return chunkvale::cuda_api::device_count(); },
        "CUDA devices usable at run time (0 without the CUDA backend, a driver or a GPU).");

  nb::class_<KVCache>(m, "KVCache")
      .def("__init__",
           [](KVCache* self, int layers, int q_heads, int kv_heads, int head_dim, int chunk_size,
              const std::string& dtype, int64_t capacity_chunks, int64_t capacity_bytes,
              int threads, int share_threshold, float sm_scale, const std::string& device,
              int64_t budget_tokens, int sink_chunks, int window_chunks, int topk_chunks,
              const std::string& digest, int dense_layers, int64_t device_chunks,
              int64_t host_bytes, const std::string& spill_path, const std::string& kernel_isa) {
             chunkvale::CacheConfig c;
             c.layers = layers;
             c.q_heads = q_heads;
             c.kv_heads = kv_heads;
             c.head_dim = head_dim;
             c.chunk_size = chunk_size;
             c.dtype = chunkvale::parse_dtype(dtype);
             c.capacity_chunks = capacity_chunks;
             c.capacity_bytes = capacity_bytes;
             c.threads = threads;
             c.share_threshold = share_threshold;
             c.sm_scale = sm_scale;
             c.device = device;
             c.eviction.enabled = budget_tokens > 0;
             c.eviction.budget_tokens = budget_tokens;
             c.eviction.sink_chunks = sink_chunks;
             c.eviction.window_chunks = window_chunks;
             c.eviction.topk_chunks = topk_chunks;
             c.eviction.digest = chunkvale::parse_digest(digest);
             c.eviction.dense_layers = dense_layers;
             c.eviction.device_chunks = device_chunks;
             c.eviction.host_bytes = host_bytes;
             c.eviction.spill_path = spill_path;
             c.kernel_isa = kernel_isa;
             new (self) KVCache(c);
           },
           "layers"_a, "q_heads"_a, "kv_heads"_a, "head_dim"_a, "chunk_size"_a, "dtype"_a,
           "capacity_chunks"_a, "capacity_bytes"_a, "threads"_a, "share_threshold"_a,
           "sm_scale"_a, "device"_a, "budget_tokens"_a = 0, "sink_chunks"_a = 1,
           "window_chunks"_a = 2, "topk_chunks"_a = 0, "digest"_a = "cuboid_max",
           "dense_layers"_a = 2, "device_chunks"_a = 0, "host_bytes"_a = 0, "spill_path"_a = "",
           "kernel_isa"_a = "")
      .def("add_sequence",
           [](KVCache& c, const std::vector<int32_t>& tokens, const std::string& ns, int64_t max_reuse) {
             return c.add_sequence(tokens, ns, max_reuse);
           },
           "token_ids"_a, "namespace"_a, "max_reuse"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("plan", [](KVCache& c, nb::handle entries) {
             auto parsed = parse_entries(entries);
             nb::gil_scoped_release r;
             return c.plan(parsed);
           }, "entries"_a)
      .def("step_info",
           [](KVCache& c, uint64_t step) {
             chunkvale::StepInfo p = c.step_info(step);
             nb::dict d;
             d["num_tokens"] = p.num_tokens;
             d["seq_ids"] = p.seq_ids;
             d["row_offsets"] = p.row_offsets;
             auto* pos = new std::vector<int64_t>(std::move(p.positions));
             nb::capsule owner(pos, [](void* v) noexcept { delete static_cast<std::vector<int64_t>*>(v); });
             d["positions"] = nb::ndarray<nb::numpy, int64_t, nb::ndim<1>>(pos->data(), {pos->size()}, owner);
             return d;
           },
           "step"_a)
      .def("append",
           [](KVCache& c, int layer, uint64_t step, const AnyArray& k, const AnyArray& v, uintptr_t stream) {
             chunkvale::cuda_api::StreamScope on(stream);
             c.append(layer, step, view_of(k), view_of(v));
           },
           "layer"_a, "step"_a, "k"_a, "v"_a, "stream"_a = 0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("attention",
           [](KVCache& c, int layer, uint64_t step, const AnyArray& q, const OutArray& out,
              std::optional<OutArray> lse, uintptr_t stream) {
             chunkvale::cuda_api::StreamScope on(stream);
             chunkvale::TensorView lv;
             if (lse) lv = view_of(*lse);
             c.attention(layer, step, view_of(q), view_of(out), lse ? &lv : nullptr);
           },
           "layer"_a, "step"_a, "q"_a, "out"_a, "lse"_a.none(), "stream"_a = 0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("cancel", &KVCache::cancel, "step"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("fork", &KVCache::fork, "seq"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("remove", &KVCache::remove, "seq"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("clear", &KVCache::clear, nb::call_guard<nb::gil_scoped_release>())
      .def("sequence_length", &KVCache::sequence_length, "seq"_a)
      .def("sequence_slots", &KVCache::sequence_slots, "seq"_a)
      .def("stats", [](KVCache& c) { return stats_dict(c.stats()); })
      .def("read_tile",
           [](const KVCache& c, int layer, int32_t slot, int kv, int head) {
             const auto& cfg = c.config();
             size_t n = size_t(cfg.chunk_size) * cfg.head_dim;
             auto* buf = new std::vector<float>(n);
             c.read_tile(layer, slot, kv, head, buf->data());
             nb::capsule owner(buf, [](void* v) noexcept { delete static_cast<std::vector<float>*>(v); });
             return nb::ndarray<nb::numpy, float, nb::ndim<2>>(
                 buf->data(), {size_t(cfg.chunk_size), size_t(cfg.head_dim)}, owner);
           },
           "layer"_a, "slot"_a, "kv"_a, "head"_a)
      .def("chunk_residency", &KVCache::chunk_residency, "layer"_a, "slot"_a)
      .def("read_digest",
           [](const KVCache& c, int layer, int32_t slot, int head) {
             size_t D = size_t(c.config().head_dim);
             auto* buf = new std::vector<float>(2 * D);
             c.read_digest(layer, slot, head, buf->data());
             nb::capsule owner(buf, [](void* v) noexcept { delete static_cast<std::vector<float>*>(v); });
             return nb::ndarray<nb::numpy, float, nb::ndim<2>>(buf->data(), {2, D}, owner);
           },
           "layer"_a, "slot"_a, "head"_a);
}
