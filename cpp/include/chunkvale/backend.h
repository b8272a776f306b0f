// What a backend executes; the core (KVCache, plan_builder) decides. Policy code never
// branches on the device: it only calls these.
#pragma once
#include <cstddef>
#include <cstdint>
#include "chunkvale/config.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

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
  // Recomputes the digests of full chunks in `slots` for one layer, every KV head.
  virtual void update_digests(int layer, const int32_t* slots, size_t n, DigestKind kind);
  // Scores chunks for packed query rows: per request and chunk, the digest bound of q.k
  // summed over every query head (each against its KV head's digest).
  struct ScoreRequest {
    int32_t row = 0;               // packed query row
    const int32_t* slots = nullptr;
    size_t n = 0;
    float* scores = nullptr;       // n
  };
  virtual void score_chunks(int layer, const TensorView& q, const ScoreRequest* requests,
                            size_t count, DigestKind kind);
  // The two digest vectors of (layer, slot, head) as float32 [2][D]; tests only.
  virtual void read_digest(int layer, int32_t slot, int head, float* dst) const;
};

}  // namespace chunkvale
