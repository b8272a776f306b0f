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

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // Writes the step's new K/V rows for one layer into their chunk slots.
  virtual void append(int layer, const StepPlan& plan, const TensorView& k,
                      const TensorView& v) = 0;
  // Copies the first n_tokens tokens of chunk `src` into `dst`, every layer and head.
  virtual void copy_chunk(int32_t src, int32_t dst, int32_t n_tokens) = 0;
  // Two-phase attention of one layer. `lse` may be null (no LSE wanted).
  virtual void attention(int layer, const StepPlan& plan, const TensorView& q,
                         const TensorView& out, const TensorView* lse) = 0;
  // Reads K (kv=0) or V (kv=1) of one (layer, slot, head) tile as float32 [C][D];
  // for tests and debugging, never on a hot path.
  virtual void read_tile(int layer, int32_t slot, int kv, int head, float* dst) const = 0;

  // --- budgeted attention (eviction); backends without it say so ---
  // Recomputes the digests of full chunks for one layer, every KV head: digests are kept
  // per logical chunk `chunks[i]` (resident or not), its keys are read from device slot
  // `slots[i]` (the same numbers unless the layer evicts to the host tier).
  virtual void update_digests(int layer, const int32_t* chunks, const int32_t* slots, size_t n,
                              DigestKind kind);
  // Scores chunks for packed query rows: per request and chunk, the digest bound of q.k
  // summed over every query head (each against its KV head's digest).
  struct ScoreRequest {
    int32_t row = 0;               // packed query row
    const int32_t* slots = nullptr;
    size_t n = 0;
    float* scores = nullptr;       // n (score_chunks)
    int32_t* top = nullptr;        // min(k, n) (top_chunks)
  };
  virtual void score_chunks(int layer, const TensorView& q, const ScoreRequest* requests,
                            size_t count, DigestKind kind);
  // Per request, the indices (into its slots) of its k best candidates by score, best
  // first, ties to the later candidate (top_k.h). Default: score_chunks, ranked on the host;
  // a device backend ranks where the scores are and returns only the indices.
  virtual void top_chunks(int layer, const TensorView& q, const ScoreRequest* requests, size_t count,
                          DigestKind kind, int k);
  // The two digest vectors of (layer, slot, head) as float32 [2][D]; tests only.
  virtual void read_digest(int layer, int32_t slot, int head, float* dst) const;

  // --- host tier (eviction to host memory); backends without it say so ---
  // One host-tier block is one (layer, slot): K and V of every KV head, in the device
  // layout (CacheConfig::layer_chunk_bytes()). In layers that evict, slots number the
  // layer's own CacheConfig::layer_slots(layer) device slots.
  // Prepares the asynchronous copy engine (CPU: a worker thread; CUDA: a copy stream).
  virtual void open_host_tier();
  virtual HostMemory host_memory() const { return plain_host_memory(); }
  // Queues a copy of (layer, slot) to `host_dst` and returns its ticket (1, 2, ...).
  // Backups complete in ticket order; the slot must not be written or reused, and
  // host_dst must stay valid, until wait_backup(ticket) returned or backups_done() >= ticket.
  virtual uint64_t backup(int layer, int32_t slot, void* host_dst);
  virtual uint64_t backups_done() const;  // every ticket <= this has completed
  virtual void wait_backup(uint64_t ticket);
  // Copies a block from host memory into (layer, slot); done when it returns.
  virtual void recall(int layer, int32_t slot, const void* host_src);
  // copy_chunk for one layer: the first n_tokens tokens of slot src into slot dst.
  virtual void copy_chunk_layer(int layer, int32_t src, int32_t dst, int32_t n_tokens);
};

// One stored C x D tile (the backend's dtype) as float32, for read_tile.
void tile_to_float(const void* src, DType dtype, size_t n, float* dst);

}  // namespace chunkvale
