// A step's plan: built on the host once per step by the core (plan_builder), read by
// every layer's append and attention in a backend. Head-agnostic: every work unit
// runs once per KV head. Device-neutral: a unit is what the attention decides (a shared
// chunk run for all its rows, or one sequence's rows against its own chunks), not how a
// device spreads it; each backend cuts units for its own device (the CPU backend for its
// threads, thread_cuts.h; the CUDA backend into GPU items, cuda/device_plan.h), numbers
// the softmax partials of its pieces and merges them per row.
#pragma once
#include <cstdint>
#include <vector>

namespace chunkvale {

// One sequence of the batch.
struct StepSeq {
  int64_t seq_id = 0;
  int32_t row_begin = 0;    // first packed query/key row of this sequence
  int32_t n_new = 0;        // new tokens this step
  int64_t ctx_before = 0;   // tokens cached before this step
  int32_t chunk_begin = 0;  // range into StepPlan::seq_chunks: every chunk of the
  int32_t chunk_end = 0;    //   sequence, in token order, covering ctx_before + n_new
  int32_t n_shared = 0;     // leading chunks that are prefix-tree nodes
  int64_t total() const { return ctx_before + n_new; }
};

// One chunk as a work unit sees it.
struct UnitChunk {
  int32_t slot = 0;
  int32_t valid = 0;        // keys present in the slot after this step's append
  int64_t start = 0;        // position of the chunk's first token in its sequence
};

// Token rows per sequence-first unit at most (a causal prefill is cut in row blocks).
constexpr int32_t kSeqRowBlock = 32;

// A work unit: some query rows against some chunks. Any contiguous range of its chunks
// may run apart and leave one softmax partial (max, sum, unnormalised output) per
// stacked row (token row x query head of the group); a row's partials merge exactly.
struct WorkUnit {
  int32_t chunk_begin = 0, chunk_end = 0;  // range into StepPlan::unit_chunks
  int32_t row_begin = 0, row_end = 0;      // range into StepPlan::unit_rows
  bool causal = false;                     // rows see keys at positions <= their own
  bool chunk_first = false;                // a shared chunk run (no mask, many rows)
  int32_t seq = -1;                        // owning StepSeq for sequence-first units
};

struct StepPlan {
  uint64_t id = 0;          // the step it belongs to
  // Unique per content the core hands out (a step's plan, a layer's selection, a plan in
  // one layer's device slots): a backend keeping a device copy re-uploads when it changes.
  uint64_t revision = 0;
  // Unique per layout of units and rows (what a backend cuts for its device): plan_step
  // gives a new one, bump_plan (positions and valid counts only) and copies keep it. 0: none.
  uint64_t layout = 0;
  int32_t num_tokens = 0;
  std::vector<StepSeq> seqs;
  std::vector<int32_t> seq_chunks;     // slots, per StepSeq range
  std::vector<int64_t> positions;      // absolute position of each packed row
  std::vector<int32_t> row_seq;        // StepSeq index of each packed row

  std::vector<WorkUnit> units;
  std::vector<UnitChunk> unit_chunks;
  std::vector<int32_t> unit_rows;      // packed row indices, per unit range

  // Counters for stats and tests: chunk-first units (shared chunk runs) and their chunks.
  int32_t chunk_first_units = 0;
  int32_t chunk_first_chunks = 0;
  // What those chunk reads serve, summed over chunk-first units: chunks x sequences (the
  // reads a sequence-by-sequence walk would make of the same chunks) and chunks x query rows.
  int64_t chunk_first_seq_chunks = 0;
  int64_t chunk_first_row_chunks = 0;
};

// Inputs of plan_step (cpp/src/core/plan_builder.h): one batch entry and the policy knobs.
struct PlanSeqInput {
  int64_t id = 0;
  int32_t n_new = 0;
  int64_t ctx_before = 0;
  const int32_t* slots = nullptr;  // every chunk of the sequence, in token order
  int32_t n_chunks = 0;
  int32_t n_shared = 0;            // leading chunks that are tree nodes (shareable)
  const uint8_t* keep = nullptr;   // optional: attend only chunks with keep[i] != 0
};

struct PlanParams {
  int chunk_size = 32;
  int share_threshold = 2;
};

}  // namespace chunkvale
