// Stateless two-phase attention over a caller's paged KV pool, in the spirit of FlashInfer's
// plan/run split: plan once per step from the caller's page tables (per sequence: its block
// ids, its length, its new query rows), then run once per layer on that layer's pool, read in
// place through a PoolView (strides and block size), never copied.
//
// The plan finds blocks that several sequences of the batch use (at any depth: a system
// prompt, a few-shot block under it, forks below that) and runs each such run of blocks
// chunk-first, once for all its query rows; every other block runs sequence-first, causal;
// a row's partials merge exactly. It is the planner (plan_builder.h) and the CPU kernels that
// KVCache uses, without KVCache's state: the caller owns residency, allocation and appends.
//
// Budgeted attention (with an eviction config): the caller keeps one digest tensor per layer
// beside its pool (PagedDigests), which write_kv refreshes as blocks fill; run() given it
// lets each decode row over budget attend to its sink blocks, its recent window and the
// top-k blocks by digest score, as KVCache's selection (chunk_selection.h) does. Memory stays
// the caller's: every block remains resident, only the attention reads fewer.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "chunkvale/config.h"
#include "chunkvale/detail/pool_view.h"
#include "chunkvale/step_plan.h"
#include "chunkvale/tensor.h"

namespace chunkvale {

class ChunkSelector;
class CpuExecutor;
struct LayerPool;

struct PagedConfig {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;             // 64, 80, 96, 128 or 256
  int block_size = 0;           // tokens per block: a multiple of 16 in [16, 512]
  DType dtype = DType::Float32;
  float sm_scale = 0.0f;        // 0 = 1/sqrt(head_dim)
  int threads = 0;              // 0 = all hardware threads
  // CPUs for the worker threads: worker i (1 .. threads - 1) pinned to cpus[i % size]; the
  // caller's thread runs part 0 where it is. Empty: they inherit the caller's affinity (a
  // caller pinned to one CPU, as vLLM's CPU worker is, then gets one CPU for all of them).
  std::vector<int> cpus;
  int share_threshold = 2;      // query rows a shared block needs to run chunk-first
  std::string kernel_isa;       // as CacheConfig::kernel_isa
  // Budgeted attention (enabled: run() selects where given digests); chunks are blocks.
  // No host tier (device_chunks, host_bytes, spill_path): the caller owns residency;
  // dense_layers is the caller's too (it passes no digests for those layers).
  EvictionConfig eviction;
  // Throws ValueError naming the first bad field; the shape by CacheConfig's rules.
  void validate() const;
  AttentionShape shape() const { return {q_heads, kv_heads, head_dim, dtype, sm_scale}; }
};

// One step's batch as the caller's page tables give it. Nothing is kept after plan().
struct PagedBatch {
  int32_t num_seqs = 0;
  const int32_t* block_table = nullptr;    // [num_seqs][table_width], rows row_stride apart
  int64_t table_width = 0;                 // entries per row (a sequence uses the first ceil(len / block_size))
  int64_t row_stride = 0;                  // elements between rows (>= table_width)
  const int32_t* seq_lens = nullptr;       // [num_seqs]: tokens in the pool after this step's append
  const int32_t* query_start_loc = nullptr;  // [num_seqs + 1]: packed query rows per sequence
  int64_t num_blocks = 0;                  // blocks in the caller's pool: ids must be below it
};

// What plan() made of a batch. Immutable; run() takes it for every layer of the step.
struct PagedPlan {
  StepPlan plan;
  std::vector<uint8_t> decodes;  // per plan.seqs: a decode row (one new row), which budgeted runs select for
  int block_size = 0;
  int64_t num_blocks = 0;
  int num_seqs() const { return int(plan.seqs.size()); }
  int num_tokens() const { return plan.num_tokens; }
  int chunk_first_units() const { return plan.chunk_first_units; }
  int chunk_first_blocks() const { return plan.chunk_first_chunks; }
  // Block reads, per layer and KV head: a sequence-by-sequence walk reads every block of
  // every sequence (seq_blocks); of those, chunk_first_seq_blocks are served by the
  // chunk_first_blocks reads (so their difference is what chunk-first saved), which serve
  // chunk_first_row_blocks query rows x blocks.
  int64_t seq_blocks() const { return int64_t(plan.seq_chunks.size()); }
  int64_t chunk_first_seq_blocks() const { return plan.chunk_first_seq_chunks; }
  int64_t chunk_first_row_blocks() const { return plan.chunk_first_row_chunks; }
};

// Checks the whole batch, then plans it (what PagedAttention::plan does with its config's
// block_size and share_threshold; the plan depends on nothing else). ValueError naming the
// argument (block_table, seq_lens, query_start_loc, num_blocks, block_size, share_threshold).
std::shared_ptr<const PagedPlan> plan_paged(const PagedBatch& batch, int block_size, int share_threshold = 2);

// One layer of the caller's pool: K tile and V tile of block_size rows x head_dim elements
// per (block, KV head), where the view's strides say.
struct PagedKV {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  PoolView view;
  int64_t num_blocks = 0;
  int kv_heads = 0;
  // vLLM's CPU cache of one layer, [num_blocks, kv_heads, block_size, 2 * head_dim] (each
  // (block, head) holds block_size K rows then block_size V rows); strides are the tensor's,
  // so a view into a larger allocation works. Throws ValueError / TypeError naming `arg`.
  static PagedKV vllm_cpu(const TensorView& kv_cache, const char* arg = "kv_cache");
};

// One layer's block digests, float32 [num_blocks][kv_heads][2][head_dim] contiguous: the two
// vectors of each (block, KV head) as DigestKind says (docs/API.md). The caller allocates it
// beside the layer's pool; write_kv keeps it current.
struct PagedDigests {
  float* data = nullptr;
  int64_t num_blocks = 0;
  int kv_heads = 0, head_dim = 0;
};

// Blocks scored and dropped by budgeted runs so far (selection counters).
struct PagedSelectionCounts {
  int64_t scored_blocks = 0, dropped_blocks = 0;
};

class PagedAttention {
 public:
  explicit PagedAttention(const PagedConfig& cfg);  // validates cfg
  ~PagedAttention();
  PagedAttention(const PagedAttention&) = delete;
  PagedAttention& operator=(const PagedAttention&) = delete;

  const PagedConfig& config() const { return cfg_; }

  // Checks the whole batch, then plans it. ValueError naming the argument (block_table,
  // seq_lens, query_start_loc, num_blocks) on bad input. Thread-safe.
  std::shared_ptr<const PagedPlan> plan(const PagedBatch& batch) const;

  // Writes a step's new K/V rows into one layer of the pool: row t of k and v ([n, kv_heads,
  // head_dim], rows may be strided) to slot slot_mapping[t] = block * block_size + offset; a
  // negative slot is padding and skipped. Tiles are K and V [block_size][head_dim] row-major,
  // what run() reads (vLLM's own CPU kernels pack K otherwise: a pool is read by its writer).
  // Every slot is checked before anything is written. Calls are serialised with run().
  // With `digests` (eviction configs only), each block whose last slot (offset
  // block_size - 1) this call writes gets its digest recomputed from the pool: rows are
  // written in order, a block's last row last, as a decoder fills its cache.
  void write_kv(const PagedKV& kv, const TensorView& k, const TensorView& v, const int64_t* slot_mapping,
                int64_t n, const PagedDigests* digests = nullptr);

  // One layer: q [num_tokens, q_heads, head_dim] (rows may be strided, heads and dims
  // contiguous), out the same shape (written), lse optional float32 [num_tokens, q_heads].
  // Checks every argument first (TypeError / ValueError naming it). Calls are serialised.
  // With `digests` (eviction configs only), decode rows (one new row) of sequences over
  // budget attend to their selected blocks only; every other row to its whole context.
  void run(const PagedPlan& plan, const PagedKV& kv, const TensorView& q, const TensorView& out,
           const TensorView* lse = nullptr, const PagedDigests* digests = nullptr);

  PagedSelectionCounts selection_counts() const;

 private:
  class Scorer;
  void check_digests(const PagedDigests& d, const PagedKV& kv) const;
  void refresh_digests(const PagedKV& kv, const PagedDigests& d, const int64_t* slot_mapping, int64_t n);
  LayerPool layer_pool(const PagedKV& kv) const;

  PagedConfig cfg_;
  std::unique_ptr<CpuExecutor> exec_;
  PlanParams params_;
  std::unique_ptr<ChunkSelector> selector_;  // eviction only
  std::vector<int32_t> filled_;             // write_kv: blocks whose last slot it wrote
  mutable std::mutex run_mu_;
};

}  // namespace chunkvale
