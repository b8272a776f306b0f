// chunkvale::Step, the caller's handle of a planned step. Its state (open, committed,
// cancelled) changes under its cache's lock; a committed or cancelled step answers alone.
#include "chunkvale/kv_cache.h"

namespace chunkvale {

const Step::Shared& Step::shared() const {
  if (!s_) throw ValueError("step: expected a Step returned by plan(), got an empty one");
  return *s_;
}

uint64_t Step::id() const { return s_ ? s_->id : 0; }
int32_t Step::num_tokens() const { return shared().num_tokens; }
const std::vector<int64_t>& Step::seq_ids() const { return shared().seq_ids; }
const std::vector<int32_t>& Step::row_offsets() const { return shared().row_offsets; }
const std::vector<int64_t>& Step::positions() const { return shared().positions; }
bool Step::committed() const { return s_ && s_->state.load() == State::Committed; }
bool Step::cancelled() const { return s_ && s_->state.load() == State::Cancelled; }

void Step::commit() {
  const Shared& s = shared();
  if (s.state.load() == State::Committed) return;
  if (s.state.load() == State::Cancelled || !s.cache)
    throw ValueError("step: step " + std::to_string(s.id) + " was cancelled; it cannot be committed");
  s.cache->commit(*this);
}

bool Step::cancel() {
  const Shared& s = shared();
  switch (s.state.load()) {
    case State::Committed: return false;
    case State::Cancelled: return true;
    default: return s.cache ? s.cache->cancel_if_open(*this) : true;
  }
}

}  // namespace chunkvale
