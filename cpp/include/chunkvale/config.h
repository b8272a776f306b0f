// Cache configuration: model shape, chunking, storage type and capacity.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace chunkvale {

enum class DType : uint8_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

const char* dtype_name(DType d);
size_t dtype_size(DType d);
DType parse_dtype(const std::string& name);  // "float32" | "float16" | "bfloat16"

// How a chunk's keys are summarised for scoring (two float32 D-vectors per chunk and
// KV head): cuboid_max = (min, max) box, Quest's bound sum_d max(q_d max_d, q_d min_d);
// cuboid_mean = (centre, mean absolute deviation), ArkVale's q.c + |q|.e;
// sphere = (centre, radius), q.c + |q| r.
enum class DigestKind : uint8_t { CuboidMax = 0, CuboidMean = 1, Sphere = 2 };
const char* digest_name(DigestKind k);
DigestKind parse_digest(const std::string& name);

// Which chunks a selecting row keeps (docs/API.md, bench/README.md for the measurements):
// shared = one set for every head, ranked by the bound summed over every query head;
// per_kv_head = each KV head its own top-k, ranked by the largest bound among its query
// heads (the same number of chunks and tokens per head). Auto: per_kv_head, or shared with
// the host tier (it keeps one set of chunks per sequence on the device).
enum class Selection : uint8_t { Auto = 0, Shared = 1, PerKvHead = 2 };
const char* selection_name(Selection s);
Selection parse_selection(const std::string& name);

// Budgeted attention: during decode, a sequence longer than the budget attends only to
// its sink chunks, its recent window and the top-k chunks its query scores highest.
struct EvictionConfig {
  bool enabled = false;
  int64_t budget_tokens = 0;  // per sequence and layer: past it a decode row selects, and attends at most this many tokens
  int sink_chunks = 1;
  int window_chunks = 2;
  // Chunks selected by digest score. kTopkDefault: what the budget leaves after the sinks
  // and the window, budget_tokens / chunk_size - sink_chunks - window_chunks; 0: none (sink +
  // window only, StreamingLLM-style). Python: None / 0. A budgeted row attends to
  // (sink_chunks + window_chunks + topk_chunks) whole chunks, never more than budget_tokens.
  static constexpr int kTopkDefault = -1;
  int topk_chunks = kTopkDefault;
  DigestKind digest = DigestKind::CuboidMax;
  Selection selection = Selection::Auto;
  int dense_layers = 2;       // the first layers never select
  // Host tier (bounded device memory): 0 = off, every chunk stays resident in every layer.
  // Otherwise each layer from dense_layers on holds at most device_chunks chunks on the
  // device; every filled chunk is backed up to host memory and recalled when selected.
  int64_t device_chunks = 0;
  int64_t host_bytes = 0;     // host tier capacity; 0 = unbounded
  std::string spill_path;     // file for what does not fit in host_bytes; empty = none

  int resolved_topk(int chunk_size) const;
  // Tokens a budgeted row attends at most: (sinks + window + top-k) whole chunks.
  int64_t attended_tokens(int chunk_size) const;
  // The selection's fields (sinks, window, top-k, dense layers, budget) for chunks of
  // chunk_size tokens; throws ValueError naming the first bad one, and eviction.topk_chunks
  // when sinks + window + top-k whole chunks exceed budget_tokens.
  void validate_selection(int chunk_size) const;
  bool host_tier() const { return enabled && device_chunks > 0; }
  Selection resolved_selection() const {
    if (selection != Selection::Auto) return selection;
    return device_chunks > 0 ? Selection::Shared : Selection::PerKvHead;
  }
  bool per_kv_head() const { return enabled && resolved_selection() == Selection::PerKvHead; }
};

// Test-only hooks, injected by the tests that need them (never read from the environment);
// leave them at their defaults in production.
struct TestHooks {
  // Every host-tier backup is delayed by this many microseconds (CPU: in the copy worker;
  // CUDA: a host callback on the copy stream before the copy), so tests can catch a device
  // slot reused before its backup completed. 0..10^7.
  int backup_delay_us = 0;
  // Host-tier storage failures (cpp/src/core/test_faults.h): a comma-separated list of
  // OP=ERRNO@SKIP[xCOUNT], e.g. "write=EIO@3x2,alloc=ENOMEM@10"; empty: none.
  std::string faults;
};

// The shape of one layer's attention, the same for every front (KVCache's CacheConfig,
// PagedAttention's PagedConfig) and every backend: one set of rules, one validate().
struct AttentionShape {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::Float32;
  float sm_scale = 0.0f;  // 0 = 1/sqrt(head_dim)

  // Throws ValueError naming the first bad field (q_heads, kv_heads, head_dim, sm_scale).
  void validate() const;
  int group() const { return q_heads / kv_heads; }
  float scale() const;
  // Elements of one packed query / output row: every query head.
  int64_t row_elems() const { return int64_t(q_heads) * head_dim; }
};

// Bounds validate() puts on the model shape, so that every size derived from it fits 64 bits.
constexpr int kMaxLayers = 1 << 16;
constexpr int kMaxHeads = 1 << 16;

struct CacheConfig {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int chunk_size = 64;          // tokens per chunk: a power of two in [16, 128]; 64 measured best (bench/README.md)
  DType dtype = DType::Float32;
  int64_t capacity_chunks = 0;  // pool slots; or give capacity_bytes
  int64_t capacity_bytes = 0;
  int threads = 0;              // 0 = all hardware threads
  int share_threshold = 2;      // query rows needed to run a shared chunk chunk-first
  float sm_scale = 0.0f;        // 0 = 1/sqrt(head_dim) (Python: None); negative, NaN, inf: ValueError
  std::string device = "cpu";
  // CPU kernels' instruction set: "" = $CHUNKVALE_KERNEL_ISA if set, else the best this CPU
  // runs; "avx512bf16", "avx512", "avx2" or "generic" force one (tests run every path the machine has).
  // The CPU backend checks it (a CUDA cache does not use it).
  std::string kernel_isa;
  EvictionConfig eviction;
  TestHooks test_hooks;

  // Throws ValueError naming the first bad field. Sums and products of fields are computed
  // in 64 bits, so values near the int limits are refused, never wrapped around.
  void validate() const;
  AttentionShape shape() const { return {q_heads, kv_heads, head_dim, dtype, sm_scale}; }
  int group() const { return q_heads / kv_heads; }
  // Bytes one slot takes: every layer, K and V, every KV head.
  size_t bytes_per_chunk() const;
  int64_t resolved_capacity() const;
  float resolved_scale() const;
  // Device slots of one layer: resolved_capacity(), or eviction.device_chunks in the
  // layers that evict to the host tier.
  int64_t layer_slots(int layer) const;
  bool evicts_to_host(int layer) const { return eviction.host_tier() && layer >= eviction.dense_layers; }
  // Bytes of one chunk in one layer: K and V of every KV head (one host-tier block).
  size_t layer_chunk_bytes() const { return bytes_per_chunk() / size_t(layers); }
};

}  // namespace chunkvale
