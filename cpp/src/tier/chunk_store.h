// Where chunks' K/V live, between the core and the backend. The core names chunks by id
// (ChunkPool slots, what tree nodes and sequences hold); the store runs each layer's append,
// attention and copies on the backend in device slots. ChunkStore itself keeps every chunk
// resident in every layer (id = slot); TieredStore (tiered_store.h) derives from it for the
// host tier, and make_chunk_store (chunk_store_factory.h) picks one. The front calls the same
// methods either way and never branches on which.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "chunkvale/backend.h"
#include "chunkvale/cache_stats.h"
#include "chunkvale/chunk_pool.h"
#include "chunkvale/prefix_tree.h"
#include "step.h"

namespace chunkvale {

class ChunkStore {
 public:
  ChunkStore(const CacheConfig& cfg, Backend& backend, ChunkPool& pool, PrefixTree& tree);
  virtual ~ChunkStore() = default;

  // A free chunk id, reclaiming the least recently used cached prefix chunk if need be;
  // admission made sure there is one (std::logic_error otherwise).
  int32_t take_chunk();
  virtual void free_chunk(int32_t chunk);

  // One layer of a step. `plan` is the step's or its layer's selection (chunk ids).
  virtual void append(int layer, const PlannedStep& step, const TensorView& k, const TensorView& v, const ExecContext& ctx);
  virtual void attention(int layer, const PlannedStep& step, const StepPlan& plan, const TensorView& q,
                         const TensorView& out, const TensorView* lse, const ExecContext& ctx);
  // Per-KV-head selection: plans[h] for KV head h. The host tier keeps one set of chunks per
  // sequence and refuses per-KV-head selection (CacheConfig::validate).
  virtual void attention_per_head(int layer, const PlannedStep& step, const StepPlan* plans, const TensorView& q,
                                  const TensorView& out, const TensorView* lse, const ExecContext& ctx);
  // The first n_tokens tokens of chunk src into chunk dst, every layer (on the default stream).
  virtual void copy_chunk(int32_t src, int32_t dst, int32_t n_tokens);

  // The host tier's hooks; nothing to do without it.
  virtual void cancelled(const PlannedStep&) {}         // its filled chunks' copies are stale
  virtual void check() {}                        // a failed spill-file write since the last call
  virtual void check_copies(int32_t) {}          // a copy source's host copies can be read
  virtual int evict_from() const { return cfg_.layers; }  // first layer that evicts
  virtual int64_t host_free() const { return 0; }
  virtual void reserve_host(int64_t) {}

  virtual void read_tile(int layer, int32_t chunk, int kv, int head, float* dst);
  virtual std::string residency(int layer, int32_t chunk) const;
  virtual CacheStats counts() const { return {}; }  // the host tier's (part_counts.h)

 protected:
  const CacheConfig& cfg_;
  Backend& backend_;
  Digests* digests_;  // null without eviction
  ChunkPool& pool_;
  PrefixTree& tree_;
};

}  // namespace chunkvale
