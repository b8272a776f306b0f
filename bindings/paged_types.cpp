#include "paged_types.h"

#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>
#include <vector>

#include "arg_checks.h"
#include "chunkvale/errors.h"
#include "chunkvale/paged_attention.h"
#include "tensor_args.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace chunkvale::bind {
namespace {

// An int32 CPU array of `ndim` dimensions whose last one is contiguous (page-table inputs).
struct IntArray {
  AnyArray a;
  const int32_t* data() const { return static_cast<const int32_t*>(a.data()); }
  int64_t shape(size_t i) const { return int64_t(a.shape(i)); }
};
IntArray int32_array(nb::handle h, const char* name, size_t ndim) {
  IntArray r{in_array(h, name)};
  const nb::dlpack::dtype d = r.a.dtype();
  if (!(d.code == uint8_t(nb::dlpack::dtype_code::Int) && d.bits == 32 && d.lanes == 1))
    throw TypeError(std::string(name) + ": expected an int32 array, got " + type_label(h) + " of another dtype (" +
                    text_of(h.attr("dtype")) + ")");
  if (r.a.device_type() != nb::device::cpu::value)
    throw TypeError(std::string(name) + ": expected an array on cpu (page tables are read on the host), got one on "
                    "another device");
  if (r.a.ndim() != ndim)
    throw ValueError(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                     std::to_string(r.a.ndim()));
  if (r.a.size() > 0 && r.a.shape(ndim - 1) > 1 && r.a.stride(ndim - 1) != 1)
    throw ValueError(std::string(name) + ": expected a contiguous last dimension, got stride " +
                     std::to_string(r.a.stride(ndim - 1)));
  return r;
}

// None, or a list / tuple of CPU numbers.
std::vector<int> cpus_arg(nb::handle h) {
  std::vector<int> out;
  if (h.is_none()) return out;
  if (!nb::isinstance<nb::list>(h) && !nb::isinstance<nb::tuple>(h))
    throw TypeError("cpus: expected a list of CPU numbers or None, got " + type_label(h));
  for (nb::handle x : h) out.push_back(int(int_arg(x, "cpus", 0, 1023)));
  return out;
}

// chunkvale.Eviction (its to_native() checks every field, naming it, and gives the native
// EvictionConfig) or None. Known by what it gives, so the module never imports the package.
EvictionConfig eviction_arg(nb::handle h) {
  if (h.is_none()) return EvictionConfig{};
  const auto refuse = [&] { return TypeError("eviction: expected a chunkvale.Eviction or None, got " + type_label(h)); };
  if (PyType_Check(h.ptr()) || !nb::hasattr(h, "to_native")) throw refuse();
  EvictionConfig e;
  if (!nb::try_cast<EvictionConfig>(h.attr("to_native")(), e)) throw refuse();
  return e;
}

// What messages say an array is: its shape, its strides, its device.
template <class Array>
std::string dims_of(const Array& a, bool strides) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i)
    s += (i ? ", " : "") + std::to_string(strides ? int64_t(a.stride(i)) : int64_t(a.shape(i)));
  return s + (a.ndim() == 1 ? ",)" : ")");
}
template <class Array>
const char* device_of(const Array& a) {
  return device_name(view_of(AnyArray(a)).device);
}

// One layer's digests: float32 [num_blocks, kv_heads, 2, head_dim], C-contiguous, on cpu.
template <class Array>
PagedDigests digests_arg(nb::handle h, const Array& a) {
  const nb::dlpack::dtype d = a.dtype();
  if (!(d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32 && d.lanes == 1))
    throw TypeError("digests: expected a float32 array, got " + type_label(h) + " of dtype " + text_of(h.attr("dtype")));
  if (a.device_type() != nb::device::cpu::value)
    throw TypeError(std::string("digests: expected an array on cpu, got one on ") + device_of(a));
  if (a.ndim() != 4 || a.shape(2) != 2)
    throw ValueError("digests: expected shape [num_blocks, kv_heads, 2, head_dim] (PagedAttention.digest_shape), "
                     "got shape " + dims_of(a, false));
  int64_t want = 1;
  for (int i = 3; i >= 0; --i) {
    if (a.shape(size_t(i)) > 1 && a.stride(size_t(i)) != want)
      throw ValueError("digests: expected a C-contiguous array, got strides " + dims_of(a, true) + " for shape " +
                       dims_of(a, false));
    want *= int64_t(a.shape(size_t(i)));
  }
  PagedDigests g;
  g.data = static_cast<float*>(const_cast<void*>(static_cast<const void*>(a.data())));  // run() only reads
  g.num_blocks = int64_t(a.shape(0));
  g.kv_heads = int(a.shape(1));
  g.head_dim = int(a.shape(3));
  return g;
}

// Query rows a shared block needs to run chunk-first: an int in [1, 2^31-1].
int share_threshold_arg(nb::handle h) { return int(int_arg(h, "share_threshold", 1, INT32_MAX)); }

DType dtype_arg(nb::handle h) {
  // "float32", torch.float32, numpy.dtype('float32'): their names, without a "torch." prefix.
  std::string s = nb::isinstance<nb::str>(h) ? str_arg(h, "dtype") : text_of(h);
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  return parse_dtype(s);
}

// One step's batch from the caller's arrays, planned by plan_paged (PagedAttention.plan and
// the free chunkvale.plan_paged share it).
std::shared_ptr<const PagedPlan> plan_arrays(nb::handle block_table, nb::handle seq_lens, nb::handle query_start_loc,
                                             nb::handle num_blocks, int block_size, int share_threshold) {
  const IntArray bt = int32_array(block_table, "block_table", 2);
  const IntArray sl = int32_array(seq_lens, "seq_lens", 1);
  const IntArray qs = int32_array(query_start_loc, "query_start_loc", 1);
  const int64_t n = sl.shape(0);
  if (bt.shape(0) != n)
    throw ValueError("block_table: expected one row per sequence (" + std::to_string(n) + "), got " +
                     std::to_string(bt.shape(0)));
  if (qs.shape(0) != n + 1)
    throw ValueError("query_start_loc: expected num_seqs + 1 = " + std::to_string(n + 1) +
                     " offsets, got " + std::to_string(qs.shape(0)));
  if (n >= INT32_MAX) throw ValueError("seq_lens: expected fewer than 2^31 sequences");
  PagedBatch b;
  b.num_seqs = int32_t(n);
  b.block_table = bt.data();
  b.table_width = bt.shape(1);
  b.row_stride = n > 1 ? int64_t(bt.a.stride(0)) : bt.shape(1);
  b.seq_lens = sl.data();
  b.query_start_loc = qs.data();
  b.num_blocks = int_arg(num_blocks, "num_blocks", 0, INT32_MAX);
  nb::gil_scoped_release r;
  return plan_paged(b, block_size, share_threshold);
}

}  // namespace

void bind_paged_types(nb::module_& m) {
  m.def("plan_paged",
        [](nb::handle block_table, nb::handle seq_lens, nb::handle query_start_loc, nb::handle num_blocks,
           nb::handle block_size, nb::handle share_threshold) {
          return plan_arrays(block_table, seq_lens, query_start_loc, num_blocks,
                             int(int_arg(block_size, "block_size", 16, 512)), share_threshold_arg(share_threshold));
        },
        "block_table"_a.none(), "seq_lens"_a.none(), "query_start_loc"_a.none(), "num_blocks"_a.none(), nb::kw_only(),
        "block_size"_a.none(), "share_threshold"_a.none() = nb::int_(2),
        "PagedAttention.plan without a PagedAttention: the plan depends only on block_size and share_threshold.");
  m.def("check_paged_options",
        [](nb::handle share_threshold, nb::handle eviction, nb::handle block_size) {
          PagedConfig c;  // a shape every check accepts: only these options are in question
          c.q_heads = c.kv_heads = 1;
          c.head_dim = 64;
          c.block_size = int32_arg(block_size, "block_size");
          c.share_threshold = share_threshold_arg(share_threshold);
          c.eviction = eviction_arg(eviction);
          c.validate();
        },
        "share_threshold"_a.none(), "eviction"_a.none(), "block_size"_a.none(),
        "Checks PagedAttention's share_threshold and eviction (a chunkvale.Eviction or None) for blocks of "
        "block_size tokens by the rules PagedAttention(...) applies, without making one (the vLLM options, when "
        "they are read). TypeError / ValueError naming the field.");
  m.def("sm_scale_arg", [](nb::handle sm_scale) { return sm_scale_arg(sm_scale); }, "sm_scale"_a.none(),
        "sm_scale as the core takes it (float32 > 0); the one check for every front. TypeError / ValueError "
        "naming sm_scale.");

  nb::class_<PagedPlan>(m, "PagedPlan",
                        "One step's plan (PagedAttention.plan): immutable, run for every layer of the step.")
      .def_prop_ro("num_seqs", &PagedPlan::num_seqs)
      .def_prop_ro("num_tokens", &PagedPlan::num_tokens)
      .def_prop_ro("num_blocks", [](const PagedPlan& p) { return p.num_blocks; })
      .def_prop_ro("block_size", [](const PagedPlan& p) { return p.block_size; })
      .def_prop_ro("chunk_first_units", &PagedPlan::chunk_first_units,
                   "Runs of blocks that several sequences share, each attended once for all their rows.")
      .def_prop_ro("chunk_first_blocks", &PagedPlan::chunk_first_blocks)
      .def_prop_ro("seq_blocks", &PagedPlan::seq_blocks,
                   "Every sequence's blocks, summed: the block reads of a sequence-by-sequence walk (per layer and "
                   "KV head).")
      .def_prop_ro("chunk_first_seq_blocks", &PagedPlan::chunk_first_seq_blocks,
                   "Of seq_blocks, those the chunk-first runs serve (minus chunk_first_blocks: the reads they saved).")
      .def_prop_ro("chunk_first_row_blocks", &PagedPlan::chunk_first_row_blocks,
                   "Query rows x blocks of the chunk-first runs.")
      .def("__repr__", [](const PagedPlan& p) {
        return "PagedPlan(num_seqs=" + std::to_string(p.num_seqs()) + ", num_tokens=" + std::to_string(p.num_tokens()) +
               ", chunk_first_units=" + std::to_string(p.chunk_first_units()) +
               ", chunk_first_blocks=" + std::to_string(p.chunk_first_blocks()) + ")";
      });

  nb::class_<PagedAttention>(
      m, "PagedAttention",
      "Stateless two-phase attention over a caller's paged KV pool (docs/API.md): plan once per step from the "
      "page tables, run once per layer on that layer's pool, in place.")
      .def("__init__",
           [](PagedAttention* self, nb::handle q_heads, nb::handle kv_heads, nb::handle head_dim, nb::handle block_size,
              nb::handle dtype, nb::handle sm_scale, nb::handle threads, nb::handle share_threshold,
              nb::handle kernel_isa, nb::handle eviction, nb::handle cpus) {
             PagedConfig c;
             c.q_heads = int32_arg(q_heads, "q_heads");
             c.kv_heads = int32_arg(kv_heads, "kv_heads");
             c.head_dim = int32_arg(head_dim, "head_dim");
             c.block_size = int32_arg(block_size, "block_size");
             c.dtype = dtype_arg(dtype);
             if (!sm_scale.is_none()) c.sm_scale = sm_scale_arg(sm_scale);
             c.threads = int32_arg(threads, "threads");
             c.share_threshold = share_threshold_arg(share_threshold);
             c.kernel_isa = str_arg(kernel_isa, "kernel_isa");
             c.eviction = eviction_arg(eviction);
             c.cpus = cpus_arg(cpus);
             new (self) PagedAttention(c);
           },
           "q_heads"_a.none(), "kv_heads"_a.none(), "head_dim"_a.none(), "block_size"_a.none(),
           "dtype"_a.none() = "float32", "sm_scale"_a.none() = nb::none(), "threads"_a.none() = 0,
           "share_threshold"_a.none() = 2, "kernel_isa"_a.none() = "", "eviction"_a.none() = nb::none(),
           "cpus"_a.none() = nb::none())
      .def_prop_ro("q_heads", [](const PagedAttention& p) { return p.config().q_heads; })
      .def_prop_ro("kv_heads", [](const PagedAttention& p) { return p.config().kv_heads; })
      .def_prop_ro("head_dim", [](const PagedAttention& p) { return p.config().head_dim; })
      .def_prop_ro("block_size", [](const PagedAttention& p) { return p.config().block_size; })
      .def_prop_ro("dtype", [](const PagedAttention& p) { return std::string(dtype_name(p.config().dtype)); })
      .def_prop_ro("kernel_isa", [](const PagedAttention& p) { return p.config().kernel_isa; })
      .def_prop_ro("cpus",
                   [](const PagedAttention& p) {
                     nb::list l;
                     for (int c : p.config().cpus) l.append(c);
                     return l;
                   },
                   "CPUs the worker threads are pinned to (empty: the calling thread's affinity).")
      .def_prop_ro("budgeted", [](const PagedAttention& p) { return p.config().eviction.enabled; },
                   "Whether this was made with an eviction config (run() selects where given digests).")
      .def("digest_shape",
           [](const PagedAttention& p, nb::handle num_blocks) {
             const int64_t n = int_arg(num_blocks, "num_blocks", 0, INT32_MAX);
             return nb::make_tuple(n, p.config().kv_heads, 2, p.config().head_dim);
           },
           "num_blocks"_a.none(),
           "The shape of one layer's digest tensor (float32): [num_blocks, kv_heads, 2, head_dim].")
      .def_prop_ro("selection_counts",
                   [](const PagedAttention& p) {
                     const PagedSelectionCounts c = p.selection_counts();
                     nb::dict d;
                     d["scored_blocks"] = c.scored_blocks;
                     d["dropped_blocks"] = c.dropped_blocks;
                     return d;
                   },
                   "Blocks budgeted runs scored and dropped so far.")
      .def("plan",
           [](const PagedAttention& pa, nb::handle block_table, nb::handle seq_lens, nb::handle query_start_loc,
              nb::handle num_blocks) {
             return plan_arrays(block_table, seq_lens, query_start_loc, num_blocks, pa.config().block_size,
                                pa.config().share_threshold);
           },
           "block_table"_a.none(), "seq_lens"_a.none(), "query_start_loc"_a.none(), "num_blocks"_a.none(),
           "Checks the whole batch, then plans it: block_table int32 [num_seqs, max_blocks], seq_lens int32 "
           "[num_seqs] (tokens after this step's append), query_start_loc int32 [num_seqs + 1].")
      .def("write_kv",
           [](PagedAttention& pa, nb::handle kv_cache, nb::handle k, nb::handle v, nb::handle slot_mapping,
              nb::handle digests) {
             OutArray ka = out_array(kv_cache, "kv_cache");
             AnyArray kk = in_array(k, "k"), vv = in_array(v, "v"), sm = in_array(slot_mapping, "slot_mapping");
             const nb::dlpack::dtype d = sm.dtype();
             if (!(d.code == uint8_t(nb::dlpack::dtype_code::Int) && d.bits == 64 && d.lanes == 1))
               throw TypeError("slot_mapping: expected an int64 array, got " + type_label(slot_mapping) +
                               " of dtype " + text_of(slot_mapping.attr("dtype")));
             if (sm.device_type() != nb::device::cpu::value)
               throw TypeError(std::string("slot_mapping: expected an array on cpu (slots are read on the host), "
                                           "got one on ") + device_of(sm));
             if (sm.ndim() != 1)
               throw ValueError("slot_mapping: expected a 1-dimensional array, got shape " + dims_of(sm, false));
             if (sm.shape(0) > 1 && sm.stride(0) != 1)
               throw ValueError("slot_mapping: expected a contiguous array, got stride " +
                                std::to_string(sm.stride(0)));
             const PagedKV kv = PagedKV::vllm_cpu(view_of(AnyArray(ka)), "kv_cache");
             const TensorView kview = view_of(kk), vview = view_of(vv);
             const auto* slots = static_cast<const int64_t*>(sm.data());
             const int64_t n = int64_t(sm.shape(0));
             std::optional<OutArray> da;
             PagedDigests dg;
             if (!digests.is_none()) {
               da = out_array(digests, "digests");
               dg = digests_arg(digests, *da);
             }
             nb::gil_scoped_release r;
             pa.write_kv(kv, kview, vview, slots, n, da ? &dg : nullptr);
           },
           "kv_cache"_a.none(), "k"_a.none(), "v"_a.none(), "slot_mapping"_a.none(), "digests"_a.none() = nb::none(),
           "Writes a step's K/V rows [n, kv_heads, head_dim] into kv_cache (vLLM's CPU layout) at slot_mapping "
           "int64 [n] (block * block_size + offset; negative: padding, skipped); every slot is checked first. "
           "With digests (budgeted only), the blocks whose last slot this write fills get their digests.")
      .def("run",
           [](PagedAttention& pa, nb::handle plan, nb::handle q, nb::handle kv_cache, nb::handle out, nb::handle lse,
              nb::handle digests) {
             if (!nb::isinstance<PagedPlan>(plan))
               throw TypeError("plan: expected a PagedPlan (PagedAttention.plan), got " + type_label(plan));
             const PagedPlan& p = nb::cast<const PagedPlan&>(plan);
             AnyArray qa = in_array(q, "q"), ka = in_array(kv_cache, "kv_cache");
             OutArray oa = out_array(out, "out");
             std::optional<OutArray> la;
             if (!lse.is_none()) la = out_array(lse, "lse");
             const PagedKV kv = PagedKV::vllm_cpu(view_of(ka), "kv_cache");
             const TensorView qv = view_of(qa), ov = view_of(oa);
             TensorView lv;
             if (la) lv = view_of(*la);
             std::optional<AnyArray> da;
             PagedDigests dg;
             if (!digests.is_none()) {
               da = in_array(digests, "digests");
               dg = digests_arg(digests, *da);
             }
             nb::gil_scoped_release r;
             pa.run(p, kv, qv, ov, la ? &lv : nullptr, da ? &dg : nullptr);
           },
           "plan"_a.none(), "q"_a.none(), "kv_cache"_a.none(), "out"_a.none(), "lse"_a.none() = nb::none(),
           "digests"_a.none() = nb::none(),
           "One layer: q [num_tokens, q_heads, head_dim] (rows may be strided), kv_cache vLLM's CPU layout "
           "[num_blocks, kv_heads, block_size, 2 * head_dim], out like q (written), lse float32 "
           "[num_tokens, q_heads] or None. With digests (budgeted only), decode rows over budget attend to "
           "their sinks, window and top-k blocks.");
}

}  // namespace chunkvale::bind
