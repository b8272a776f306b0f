#include "cache_types.h"

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "chunkvale/cache_stats.h"
#include "chunkvale/config.h"
#include "chunkvale/errors.h"
#include "chunkvale/kv_cache.h"

namespace nb = nanobind;

namespace chunkvale::bind {
namespace {

// The mapping view's keys, in field order: counts as they are, times as *_seconds.
const std::vector<std::string>& stats_keys() {
  static const std::vector<std::string> keys = {
#define CHUNKVALE_KEY(name) #name,
#define CHUNKVALE_TIME_KEY(name) #name "_seconds",
      CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_KEY) CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_TIME_KEY)
#undef CHUNKVALE_KEY
#undef CHUNKVALE_TIME_KEY
  };
  return keys;
}

double seconds(int64_t ns) { return double(ns) * 1e-9; }

nb::object stats_item(const CacheStats& s, const std::string& key) {
#define CHUNKVALE_GET(name) \
  if (key == #name) return nb::int_(s.name);
#define CHUNKVALE_GET_TIME(name) \
  if (key == #name "_seconds") return nb::float_(seconds(s.name##_ns));
  CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_GET)
  CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_GET_TIME)
#undef CHUNKVALE_GET
#undef CHUNKVALE_GET_TIME
  throw nb::key_error(("CacheStats has no field '" + key + "'").c_str());
}

bool stats_equal(const CacheStats& a, const CacheStats& b) {
  bool same = true;
#define CHUNKVALE_SAME(name) same = same && a.name == b.name;
#define CHUNKVALE_SAME_TIME(name) same = same && a.name##_ns == b.name##_ns;
  CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_SAME)
  CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_SAME_TIME)
#undef CHUNKVALE_SAME
#undef CHUNKVALE_SAME_TIME
  return same;
}

void bind_stats(nb::module_& m) {
  nb::class_<CacheStats> cls(m, "CacheStats",
                             "What a cache reports of itself (KVCache.stats()): read-only fields, and a "
                             "read-only mapping of the same names (times in *_seconds).");
#define CHUNKVALE_RO(name) cls.def_ro(#name, &CacheStats::name);
#define CHUNKVALE_RO_TIME(name) \
  cls.def_prop_ro(#name "_seconds", [](const CacheStats& s) { return seconds(s.name##_ns); });
  CHUNKVALE_CACHE_STATS_COUNTS(CHUNKVALE_RO)
  CHUNKVALE_CACHE_STATS_TIMES(CHUNKVALE_RO_TIME)
#undef CHUNKVALE_RO
#undef CHUNKVALE_RO_TIME
  cls.def("keys", [](const CacheStats&) { return stats_keys(); })
      .def("values",
           [](const CacheStats& s) {
             nb::list out;
             for (const std::string& k : stats_keys()) out.append(stats_item(s, k));
             return out;
           })
      .def("items",
           [](const CacheStats& s) {
             nb::list out;
             for (const std::string& k : stats_keys()) out.append(nb::make_tuple(k, stats_item(s, k)));
             return out;
           })
      .def("__getitem__", &stats_item)
      .def(
          "get",
          [](const CacheStats& s, const std::string& key, nb::object fallback) {
            for (const std::string& name : stats_keys())
              if (name == key) return stats_item(s, key);
            return fallback;
          },
          nb::arg("key"), nb::arg("default") = nb::none())
      .def("__contains__",
           [](const CacheStats&, nb::handle key) {
             if (!nb::isinstance<nb::str>(key)) return false;
             const std::string k = nb::cast<std::string>(key);
             for (const std::string& name : stats_keys())
               if (name == k) return true;
             return false;
           })
      .def("__iter__", [](const CacheStats&) { return nb::iter(nb::cast(stats_keys())); })
      .def("__len__", [](const CacheStats&) { return stats_keys().size(); })
      .def("__eq__", [](const CacheStats& a, const CacheStats& b) { return stats_equal(a, b); })
      .def("__eq__", [](const CacheStats&, nb::handle) { return false; })
      .def("__repr__", [](const CacheStats& s) {
        std::string r = "CacheStats(";
        for (const std::string& k : stats_keys()) {
          if (r.size() > 11) r += ", ";
          r += k + "=" + nb::cast<std::string>(nb::repr(stats_item(s, k)));
        }
        return r + ")";
      });
  cls.attr("__hash__") = nb::none();  // equal by value, and a snapshot: not a dict key
}

void bind_config(nb::module_& m) {
  // Plain value types: KVCache copies the config when it is made. Their fields are checked
  // twice: python/chunkvale/config.py names a bad type or range, CacheConfig::validate() the
  // rest when the cache is made.
  nb::class_<EvictionConfig> evict(m, "EvictionConfig");
  evict.attr("TOPK_DEFAULT") = EvictionConfig::kTopkDefault;
  evict.def(nb::init<>())
      .def_rw("enabled", &EvictionConfig::enabled)
      .def_rw("budget_tokens", &EvictionConfig::budget_tokens)
      .def_rw("sink_chunks", &EvictionConfig::sink_chunks)
      .def_rw("window_chunks", &EvictionConfig::window_chunks)
      .def_rw("topk_chunks", &EvictionConfig::topk_chunks)
      .def_prop_rw(
          "digest", [](const EvictionConfig& e) { return std::string(digest_name(e.digest)); },
          [](EvictionConfig& e, const std::string& name) { e.digest = parse_digest(name); })
      .def_prop_rw(
          "selection", [](const EvictionConfig& e) { return std::string(selection_name(e.selection)); },
          [](EvictionConfig& e, const std::string& name) { e.selection = parse_selection(name); })
      .def_prop_ro("resolved_selection",
                   [](const EvictionConfig& e) { return std::string(selection_name(e.resolved_selection())); })
      .def_rw("dense_layers", &EvictionConfig::dense_layers)
      .def_rw("device_chunks", &EvictionConfig::device_chunks)
      .def_rw("host_bytes", &EvictionConfig::host_bytes)
      .def_rw("spill_path", &EvictionConfig::spill_path)
      // The selection checked for chunks of chunk_size tokens (ValueError naming the field),
      // then the tokens a budgeted row attends at most.
      .def("attended_tokens", [](const EvictionConfig& e, int chunk_size) {
        e.validate_selection(chunk_size);
        return e.attended_tokens(chunk_size);
      }, nb::arg("chunk_size"));
  nb::class_<TestHooks>(m, "TestHooks", "Test-only hooks of a cache (KVCache(config, test_hooks=...)).")
      .def(nb::init<>())
      .def_rw("backup_delay_us", &TestHooks::backup_delay_us)
      .def_rw("faults", &TestHooks::faults);

  nb::class_<CacheConfig>(m, "CacheConfig")
      .def(nb::init<>())
      .def_rw("layers", &CacheConfig::layers)
      .def_rw("q_heads", &CacheConfig::q_heads)
      .def_rw("kv_heads", &CacheConfig::kv_heads)
      .def_rw("head_dim", &CacheConfig::head_dim)
      .def_rw("chunk_size", &CacheConfig::chunk_size)
      .def_prop_rw(
          "dtype", [](const CacheConfig& c) { return std::string(dtype_name(c.dtype)); },
          [](CacheConfig& c, const std::string& name) { c.dtype = parse_dtype(name); })
      .def_rw("capacity_chunks", &CacheConfig::capacity_chunks)
      .def_rw("capacity_bytes", &CacheConfig::capacity_bytes)
      .def_rw("threads", &CacheConfig::threads)
      .def_rw("share_threshold", &CacheConfig::share_threshold)
      .def_rw("sm_scale", &CacheConfig::sm_scale)
      .def_rw("device", &CacheConfig::device)
      .def_rw("kernel_isa", &CacheConfig::kernel_isa)
      .def_rw("eviction", &CacheConfig::eviction)
      .def_rw("test_hooks", &CacheConfig::test_hooks);
}

void bind_step_needs(nb::module_& m) {
  nb::class_<StepNeeds>(m, "StepNeeds",
                        "What a step (KVCache.needs) or a request alone (KVCache.request_needs) needs of each "
                        "resource, against what it can have; units as CapacityError's.")
      .def_ro("pool_chunks", &StepNeeds::pool_chunks)
      .def_ro("pool_available", &StepNeeds::pool_available)
      .def_ro("device_chunks", &StepNeeds::device_chunks)
      .def_ro("device_available", &StepNeeds::device_available)
      .def_ro("host_blocks", &StepNeeds::host_blocks)
      .def_ro("host_available", &StepNeeds::host_available)
      .def_prop_ro("fits", &StepNeeds::fits)
      .def("__repr__", [](const StepNeeds& n) {
        auto f = [](int64_t v) { return std::to_string(v); };
        return "StepNeeds(pool_chunks=" + f(n.pool_chunks) + ", pool_available=" + f(n.pool_available) +
               ", device_chunks=" + f(n.device_chunks) + ", device_available=" + f(n.device_available) +
               ", host_blocks=" + f(n.host_blocks) + ", host_available=" + f(n.host_available) +
               ", fits=" + (n.fits() ? "True" : "False") + ")";
      });
}

}  // namespace

void bind_cache_types(nb::module_& m) {
  bind_stats(m);
  bind_config(m);
  bind_step_needs(m);
}

}  // namespace chunkvale::bind
