// A planned step, bound to the cache that planned it (KVCache::plan). It carries the step's
// rows (which packed rows belong to which sequence) and their positions, and it is the one
// explicit way a step changes the cache (llama.cpp's rule: one explicit call mutates; reads
// never do): commit() once every layer was appended, or cancel() to drop it.
//
// A cache's next plan / add_sequence / fork / remove / clear commits a step appended in every
// layer that nobody committed, then ends it (docs/API.md: code that never calls commit()).
// A Step is a handle: copies share one state. Call commit() / cancel() while its cache lives.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace chunkvale {

class KVCache;

class Step {
 public:
  Step() = default;  // no step; plan() returns real ones

  uint64_t id() const;  // unique across caches, so a step is never taken for another cache's
  int32_t num_tokens() const;
  const std::vector<int64_t>& seq_ids() const;
  const std::vector<int32_t>& row_offsets() const;  // B + 1: rows [row_offsets[i], row_offsets[i+1]) are seq_ids[i]'s
  const std::vector<int64_t>& positions() const;    // each row's position in its sequence (RoPE)

  // Its tokens are cached and its full chunks joined the prefix tree (commit(), or the
  // cache's next call that starts new work). Attention may still run until the step ends.
  bool committed() const;
  bool cancelled() const;

  // Commits the step. Idempotent: a committed step stays committed. ValueError naming `step`
  // when a layer was not appended yet, or the step was cancelled; the cache is unchanged.
  void commit();
  // Drops a step that was not committed, giving back the chunks it reserved. Idempotent: a
  // cancelled step stays cancelled, and a committed step is left as it is (committed() says
  // so; nothing is thrown). Returns whether the step is cancelled.
  bool cancel();

 private:
  friend class KVCache;
  enum class State : uint8_t { Open, Committed, Cancelled };
  struct Shared {
    uint64_t id = 0;
    int32_t num_tokens = 0;
    std::vector<int64_t> seq_ids;
    std::vector<int32_t> row_offsets;
    std::vector<int64_t> positions;
    std::atomic<State> state{State::Open};  // changed under the cache's lock
    KVCache* cache = nullptr;               // set while the step is open; null once the cache is gone
  };
  explicit Step(std::shared_ptr<Shared> s) : s_(std::move(s)) {}
  const Shared& shared() const;  // ValueError naming `step` for an empty Step

  std::shared_ptr<Shared> s_;
};

}  // namespace chunkvale
