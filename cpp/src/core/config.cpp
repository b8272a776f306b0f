#include <algorithm>
#include <cmath>

#include "chunkvale/config.h"
#include "chunkvale/errors.h"
#include "chunkvale/tensor.h"
#include "test_faults.h"

namespace chunkvale {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "?";
}

size_t dtype_size(DType d) { return d == DType::Float32 ? 4 : 2; }

DType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return DType::Float32;
  if (name == "float16" || name == "fp16" || name == "half") return DType::Float16;
  if (name == "bfloat16" || name == "bf16") return DType::BFloat16;
  throw ValueError("dtype: expected 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}

const char* digest_name(DigestKind k) {
  switch (k) {
    case DigestKind::CuboidMax: return "cuboid_max";
    case DigestKind::CuboidMean: return "cuboid_mean";
    case DigestKind::Sphere: return "sphere";
  }
  return "?";
}

DigestKind parse_digest(const std::string& name) {
  if (name == "cuboid_max") return DigestKind::CuboidMax;
  if (name == "cuboid_mean") return DigestKind::CuboidMean;
  if (name == "sphere") return DigestKind::Sphere;
  throw ValueError("digest: expected 'cuboid_max', 'cuboid_mean' or 'sphere', got '" + name + "'");
}

const char* selection_name(Selection s) {
  switch (s) {
    case Selection::Auto: return "auto";
    case Selection::Shared: return "shared";
    case Selection::PerKvHead: return "per_kv_head";
  }
  return "?";
}

Selection parse_selection(const std::string& name) {
  if (name == "auto") return Selection::Auto;
  if (name == "shared") return Selection::Shared;
  if (name == "per_kv_head") return Selection::PerKvHead;
  throw ValueError("eviction.selection: expected 'auto', 'shared' or 'per_kv_head', got '" + name + "'");
}

int EvictionConfig::resolved_topk(int chunk_size) const {
  if (topk_chunks >= 0) return topk_chunks;
  // What the budget leaves after the sinks and the window, in whole chunks (at least one:
  // validate_selection refuses a budget without room for it).
  const int64_t left = budget_tokens / chunk_size - int64_t(sink_chunks) - int64_t(window_chunks);
  return int(std::clamp<int64_t>(left, 1, int64_t(1) << 30));
}

int64_t EvictionConfig::attended_tokens(int chunk_size) const {
  return (int64_t(sink_chunks) + int64_t(window_chunks) + int64_t(resolved_topk(chunk_size))) * chunk_size;
}

namespace {
void need(bool ok, const std::string& msg) {
  if (!ok) throw ValueError(msg);
}
std::string got(const char* field, const char* expected, long long v) {
  return std::string(field) + ": expected " + expected + ", got " + std::to_string(v);
}
}  // namespace

void AttentionShape::validate() const {
  need(kv_heads >= 1, got("kv_heads", "an integer >= 1", kv_heads));
  need(q_heads >= 1, got("q_heads", "an integer >= 1", q_heads));
  need(q_heads % kv_heads == 0,
       got("q_heads", ("a multiple of kv_heads=" + std::to_string(kv_heads)).c_str(), q_heads));
  need(head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256,
       got("head_dim", "one of 64, 80, 96, 128, 256", head_dim));
  // Sizes are products of these: keep every one far from overflowing 64 bits.
  need(kv_heads <= kMaxHeads, got("kv_heads", ("at most " + std::to_string(kMaxHeads)).c_str(), kv_heads));
  need(q_heads <= kMaxHeads, got("q_heads", ("at most " + std::to_string(kMaxHeads)).c_str(), q_heads));
  need(std::isfinite(sm_scale) && sm_scale >= 0.0f,
       "sm_scale: expected a finite value > 0 (or None), got " + std::to_string(sm_scale));
}

float AttentionShape::scale() const { return sm_scale > 0.0f ? sm_scale : 1.0f / std::sqrt(float(head_dim)); }

void CacheConfig::validate() const {
  need(layers >= 1, got("layers", "an integer >= 1", layers));
  shape().validate();
  need(chunk_size >= 16 && chunk_size <= 128 && (chunk_size & (chunk_size - 1)) == 0,
       got("chunk_size", "a power of two in [16, 128]", chunk_size));
  // Sizes are products of these: keep every one far from overflowing 64 bits.
  need(layers <= kMaxLayers, got("layers", ("at most " + std::to_string(kMaxLayers)).c_str(), layers));
  need(capacity_chunks >= 0, got("capacity_chunks", "an integer >= 0", capacity_chunks));
  need(capacity_bytes >= 0, got("capacity_bytes", "an integer >= 0", capacity_bytes));
  need((capacity_chunks > 0) != (capacity_bytes > 0),
       "capacity_chunks/capacity_bytes: expected exactly one of them > 0, got capacity_chunks=" +
           std::to_string(capacity_chunks) + ", capacity_bytes=" + std::to_string(capacity_bytes));
  need(resolved_capacity() >= 1,
       got("capacity_bytes", ("at least one chunk (" + std::to_string(bytes_per_chunk()) +
                              " bytes)").c_str(), capacity_bytes));
  need(resolved_capacity() < (int64_t(1) << 31),
       got("capacity_chunks", "fewer than 2^31 chunks", resolved_capacity()));
  // The pool's bytes (capacity * bytes_per_chunk) must be a size the allocator can be asked for.
  need(double(resolved_capacity()) * double(bytes_per_chunk()) < 0x1p62,
       got(capacity_chunks > 0 ? "capacity_chunks" : "capacity_bytes",
           ("a pool below 2^62 bytes (" + std::to_string(bytes_per_chunk()) + " bytes per chunk)").c_str(),
           capacity_chunks > 0 ? capacity_chunks : capacity_bytes));
  need(threads >= 0 && threads <= 1024, got("threads", "0 (all cores) .. 1024", threads));
  need(share_threshold >= 1, got("share_threshold", "an integer >= 1", share_threshold));
  if (eviction.enabled) {
    const EvictionConfig& e = eviction;
    e.validate_selection(chunk_size);
    const int64_t selection =
        int64_t(e.sink_chunks) + int64_t(e.window_chunks) + int64_t(e.resolved_topk(chunk_size));
    need(e.device_chunks == 0 || e.device_chunks >= selection,
         got("eviction.device_chunks", ("0 (no host tier) or at least sink_chunks + window_chunks + topk_chunks = " +
                                        std::to_string(selection) + " (one sequence's selection)").c_str(),
             e.device_chunks));
    // The host tier keeps one set of chunks per sequence resident (admission counts top-k once).
    need(e.device_chunks == 0 || e.resolved_selection() == Selection::Shared,
         "eviction.selection: expected 'shared' or 'auto' with the host tier (device_chunks keeps one set of "
         "chunks per sequence on the device), got 'per_kv_head'");
    need(e.device_chunks >= 0 && e.device_chunks < (int64_t(1) << 31),
         got("eviction.device_chunks", "an integer in [0, 2^31)", e.device_chunks));
    need(e.host_bytes >= 0, got("eviction.host_bytes", "None or an integer > 0", e.host_bytes));
    need(e.device_chunks > 0 || (e.host_bytes == 0 && e.spill_path.empty()),
         "eviction.host_bytes/spill_path: expected device_chunks to be set too (the host tier backs "
         "up chunks evicted from a bounded device pool), got device_chunks=None");
    need(e.host_bytes == 0 || e.host_bytes >= int64_t(layer_chunk_bytes()),
         got("eviction.host_bytes", ("0/None (unbounded) or at least one chunk of one layer (" +
                                     std::to_string(layer_chunk_bytes()) + " bytes)").c_str(),
             e.host_bytes));
    need(e.spill_path.empty() || e.host_bytes > 0,
         "eviction.spill_path: expected host_bytes to be set too (the file takes what does not fit "
         "in host_bytes), got host_bytes=None");
  } else {
    need(eviction.device_chunks == 0 && eviction.host_bytes == 0 && eviction.spill_path.empty(),
         "eviction.device_chunks/host_bytes/spill_path: the host tier needs eviction enabled");
  }
  if (device != "cpu" && device != "cuda")
    throw ValueError("device: expected 'cpu' or 'cuda', got '" + device + "'");
  need(test_hooks.backup_delay_us >= 0 && test_hooks.backup_delay_us <= 10'000'000,
       got("test_hooks.backup_delay_us", "microseconds in [0, 10^7]", test_hooks.backup_delay_us));
  TestFaults::parse(test_hooks.faults);  // names test_hooks.faults
}

size_t CacheConfig::bytes_per_chunk() const {
  return size_t(layers) * 2 * kv_heads * chunk_size * head_dim * dtype_size(dtype);
}

int64_t CacheConfig::resolved_capacity() const {
  if (capacity_chunks > 0) return capacity_chunks;
  size_t b = bytes_per_chunk();
  return b ? int64_t(capacity_bytes / int64_t(b)) : 0;
}

int64_t CacheConfig::layer_slots(int layer) const {
  return evicts_to_host(layer) ? eviction.device_chunks : resolved_capacity();
}

float CacheConfig::resolved_scale() const {
  return shape().scale();
}

const char* device_name(TensorView::Device d) {
  switch (d) {
    case TensorView::Device::CPU: return "cpu";
    case TensorView::Device::CUDA: return "cuda";
    default: return "another device";
  }
}

void check_tensor3(const TensorView& t, const char* arg, TensorView::Device device, DType dtype,
                   int64_t rows, int64_t heads, int64_t dim) {
  if (t.device != device)
    throw TypeError(std::string(arg) + ": expected a tensor on " + device_name(device) +
                    " (the cache's device), got one on " + device_name(t.device));
  if (!t.dtype_known || t.dtype != dtype)
    throw TypeError(std::string(arg) + ": expected dtype " + dtype_name(dtype) + " (the cache's), got " +
                    (t.dtype_known ? dtype_name(t.dtype) : t.dtype_label));
  bool shape_ok = t.ndim == 3 && t.shape[0] == rows && t.shape[1] == heads && t.shape[2] == dim;
  bool contiguous = shape_ok && (rows <= 1 || t.strides[0] == heads * dim) &&
                    (heads <= 1 || t.strides[1] == dim) && (dim <= 1 || t.strides[2] == 1);
  if (!contiguous) {  // messages are built only on failure: no allocation on the hot path
    const std::string want = "[" + std::to_string(rows) + ", " + std::to_string(heads) + ", " + std::to_string(dim) + "]";
    std::string have = "[";
    for (int i = 0; i < t.ndim && i < 4; ++i) have += (i ? ", " : "") + std::to_string(t.shape[i]);
    have += "]";
    if (!shape_ok)
      throw ValueError(std::string(arg) + ": expected shape " + want + ", got " + have);
    throw ValueError(std::string(arg) + ": expected a C-contiguous tensor of shape " + want +
                     ", got strides (" + std::to_string(t.strides[0]) + ", " +
                     std::to_string(t.strides[1]) + ", " + std::to_string(t.strides[2]) + ")");
  }
  if (rows > 0 && t.data == nullptr) throw ValueError(std::string(arg) + ": expected data, got a null pointer");
}

void EvictionConfig::validate_selection(int chunk_size) const {
  const EvictionConfig& e = *this;
  need(e.sink_chunks >= 0, got("eviction.sink_chunks", "an integer >= 0", e.sink_chunks));
  need(e.window_chunks >= 1, got("eviction.window_chunks", "an integer >= 1 (the chunk being written)", e.window_chunks));
  need(e.topk_chunks >= EvictionConfig::kTopkDefault, got("eviction.topk_chunks", "an integer >= 0 (or None)", e.topk_chunks));
  need(e.dense_layers >= 0, got("eviction.dense_layers", "an integer >= 0", e.dense_layers));
  need(e.budget_tokens >= 1, got("eviction.budget_tokens", "an integer >= 1", e.budget_tokens));
  // A budgeted row attends to sinks + window + top-k whole chunks: that must fit the budget.
  // 64-bit sums: chunk counts near 2^31 must not wrap around and pass the checks below.
  const int64_t fixed = (int64_t(e.sink_chunks) + int64_t(e.window_chunks)) * chunk_size;
  if (e.topk_chunks == EvictionConfig::kTopkDefault) {
    // Default top-k: the rest of the budget, at least one chunk.
    const int64_t least = fixed + chunk_size;
    need(e.budget_tokens >= least,
         got("eviction.budget_tokens",
             ("at least (sink_chunks + window_chunks + 1) * chunk_size = " + std::to_string(least)).c_str(),
             e.budget_tokens));
    return;
  }
  const int64_t attended = fixed + int64_t(e.topk_chunks) * chunk_size;
  need(attended <= e.budget_tokens,
       "eviction.topk_chunks: expected (sink_chunks + window_chunks + topk_chunks) * chunk_size <= budget_tokens = " +
           std::to_string(e.budget_tokens) + " (the tokens a budgeted row attends), got (" +
           std::to_string(e.sink_chunks) + " + " + std::to_string(e.window_chunks) + " + " +
           std::to_string(e.topk_chunks) + ") * " + std::to_string(chunk_size) + " = " + std::to_string(attended));
}

}  // namespace chunkvale
