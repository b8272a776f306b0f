// What a backend executes; the core (KVCache, plan_builder) decides. Policy code never
// branches on the device: it only calls these.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include "chunkvale/config.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

// Where the host tier's memory comes from: the backend's copy engine may need its own kind
// (CUDA: pinned, so copies run asynchronously). `release` must not need the backend alive:
// the host tier outlives it.
struct HostMemory {
  std::function<void*(size_t)> alloc;  // null when out of memory
  std::function<void(void*)> release;
};
HostMemory plain_host_memory();  // 64-byte aligned malloc

// The execution context of one backend call: the caller's CUDA stream (null: CUDA's
// legacy default stream). The CPU backend runs synchronously and ignores it.
struct ExecContext {
  void* stream = nullptr;
};

// Optional ability: chunk digests (key bounding boxes) and ranking chunks by them, for
// budgeted attention. The digest kind is the config's, fixed when the backend is made.
class Digests {
 public:
  virtual ~Digests() = default;
  // Recomputes the digests of full chunks for one layer, every KV head: digests are kept
  // per logical chunk `chunks[i]` (resident or not), its keys are read from device slot
  // `slots[i]` (the same numbers unless the layer evicts to the host tier).
  virtual void update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                              const ExecContext& ctx) = 0;
  struct ScoreRequest {
    int32_t row = 0;               // packed query row
    const int32_t* slots = nullptr;
    size_t n = 0;
    int32_t* top = nullptr;        // min(k, n) indices into slots; per_kv_head: kv_heads lists of them
  };
  // Per request, the indices (into its slots) of its k best candidates, best first, ties to
  // the later candidate (top_k.h). The config's selection says by what: shared, the digest
  // bound of q.k summed over every query head (each against its KV head's digest);
  // per_kv_head, for each KV head h its own k at top + h * k, by the largest bound among
  // h's query heads against h's digest.
  virtual void top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count, int k,
                          const ExecContext& ctx) = 0;
};

// Optional ability: the host tier's asynchronous copy engine (CPU: a worker thread; CUDA:
// a copy stream). One block is one (layer, slot): K and V of every KV head, in the device
// layout (CacheConfig::layer_chunk_bytes()); in layers that evict, slots number the layer's
// own CacheConfig::layer_slots(layer) device slots.
class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  virtual HostMemory host_memory() const { return plain_host_memory(); }
  // Queues a copy of (layer, slot) to `host_dst`, after the work queued on ctx so far;
  // returns its ticket (1, 2, ...). Backups complete in ticket order; the slot must not be
  // written or reused, and host_dst must stay valid, until wait_backup(ticket) returned or
  // backups_done() >= ticket.
  virtual uint64_t backup(int layer, int32_t slot, void* host_dst, const ExecContext& ctx) = 0;
  virtual uint64_t backups_done() const = 0;  // every ticket <= this has completed
  virtual void wait_backup(uint64_t ticket) = 0;
  // Copies a block from host memory into (layer, slot); host_src may be reused when it returns.
  virtual void recall(int layer, int32_t slot, const void* host_src, const ExecContext& ctx) = 0;
};

// Test and debugging readers, never on a hot path.
class Inspect {
 public:
  virtual ~Inspect() = default;
  // K (kv=0) or V (kv=1) of one (layer, slot, head) tile as float32 [C][D].
  virtual void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const = 0;
  // The two digest vectors of (layer, slot, head) as float32 [2][D]; a backend with Digests.
  virtual void read_digest(int layer, int32_t slot, int head, float* dst) const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Writes the step's new K/V rows for one layer into their chunk slots.
  virtual void append(int layer, const StepPlan& plan, const TensorView& k, const TensorView& v,
                      const ExecContext& ctx) = 0;
  // Two-phase attention of one layer. `lse` may be null (no LSE wanted).
  virtual void attention(int layer, const StepPlan& plan, const TensorView& q, const TensorView& out,
                         const TensorView* lse, const ExecContext& ctx) = 0;
  // The same with one plan per KV head (per-KV-head selection): KV head h and its query
  // heads attend as plans[h] says (kv_heads plans over the same rows and sequences).
  virtual void attention_per_head(int layer, const StepPlan* plans, const TensorView& q, const TensorView& out,
                                  const TensorView* lse, const ExecContext& ctx) = 0;
  // Copies the first n_tokens tokens of slot src into slot dst, every head, in `layer`, or
  // in every layer (kAllLayers: the same slot numbers in each).
  static constexpr int kAllLayers = -1;
  virtual void copy_chunk(int layer, int32_t src, int32_t dst, int32_t n_tokens, const ExecContext& ctx) = 0;

  // Optional abilities: null when this backend lacks them. The cache asks once, when it is
  // made, and refuses a config that needs one that is absent.
  virtual Digests* digests() { return nullptr; }
  virtual CopyEngine* copy_engine() { return nullptr; }
  virtual const Inspect& inspect() const = 0;
};

// CUDA devices this process can use: 0 when the CUDA backend was not built, no driver is
// installed or no GPU is visible. Never throws.
int cuda_device_count();

// One stored C x D tile (the backend's dtype) as float32, for read_tile.
void tile_to_float(const void* src, DType dtype, size_t n, float* dst);

}  // namespace chunkvale
