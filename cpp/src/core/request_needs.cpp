// KVCache::request_needs: what one request needs running alone in an empty cache, in the order
// the Engine's scheduler (python/chunkvale/scheduler.py) runs it: prefill the prompt once, fork
// its other n - 1 samples, then decode every sample to max_new_tokens, backing off when a step
// does not fit (every decoding sample, then the oldest half, quarter, ..., one).
//
// The pool: what the request holds until each sample has taken its first decode step (the
// full prompt chunks and one chunk per sample); later growth fails the request while running.
// The device tier (host tier on): which samples decode together decides a step's device
// slots (the others' partial chunks stay), and that depends on the back-off, so the decode
// phase is simulated on step_needs' rules. The device need reported is the peak of the least
// each step needs (one decoding sample beside the others' partial chunks), along the run
// with this cache's device_chunks: fits() exactly when the request runs alone to the end.
// A sample's needs change only where its length crosses a chunk boundary or the budget, so
// the simulation moves from one such event to the next; once every sample is past them the
// steps repeat with the chunk offsets, and whole cycles are skipped. Arithmetic is checked:
// a prompt of 2^63 - 1 tokens gives its need, never a wrapped-around one.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "admission.h"
#include "chunkvale/errors.h"
#include "selection_rule.h"

namespace chunkvale {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
// Work (sample evaluations) past which the simulation gives the safe bound instead.
constexpr int64_t kWorkLimit = int64_t(1) << 24;

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // a >= 0, b > 0
int64_t add_sat(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? kMax : r;
}

// One request's decode phase, every sample after the fork at the prompt's length.
class LoneRun {
 public:
  LoneRun(const EvictionConfig& ev, int64_t C, int64_t prompt, int64_t max_new)
      : rule_(ev, int(C)), C_(C), q_(prompt / C),
        // A sample of length F has generated max_new tokens (the first from the prefill).
        F_(add_sat(prompt, max_new - 1)) {}

  // The peak of the least each decode step needs with `device` slots, `n` samples at `prompt`
  // tokens; stops at the first step that does not fit even with one decoding sample.
  int64_t decode_peak(int64_t prompt, int n, int64_t device) const {
    std::vector<int64_t> len(size_t(n), prompt);
    std::vector<Sample> f;
    std::map<std::vector<int64_t>, std::vector<int64_t>> seen;  // saturated states -> lengths
    int64_t peak = 0, work = 0;
    for (size_t first = 0;;) {
      while (first < len.size() && len[first] >= F_) ++first;  // finished samples left (oldest first)
      if (first == len.size()) return peak;
      const size_t m = len.size() - first;
      f.resize(m);
      bool saturated = true;
      for (size_t i = 0; i < m; ++i) {
        f[i] = sample(len[first + i]);
        saturated = saturated && f[i].saturated;
      }
      const int64_t least = need(f, 1);
      peak = std::max(peak, least);
      if (least > device) return peak;
      work += int64_t(m);
      if (work > kWorkLimit) return std::max(peak, safe_bound(prompt, n));
      size_t k = m;
      while (k > 1 && need(f, k) > device) k /= 2;
      if (saturated) {  // a state seen before: skip whole cycles until a sample would finish
        std::vector<int64_t> key{int64_t(first)};
        for (size_t i = first; i < len.size(); ++i) key.push_back(len[i] % C_);
        auto [it, fresh] = seen.emplace(std::move(key), std::vector<int64_t>(len.begin() + first, len.end()));
        if (!fresh) {
          int64_t cycles = kMax;
          for (size_t i = 0; i < m; ++i)
            if (const int64_t adv = len[first + i] - it->second[i]; adv > 0)
              cycles = std::min(cycles, (F_ - 1 - len[first + i]) / adv);
          if (cycles > 0) {
            for (size_t i = 0; i < m; ++i) len[first + i] += cycles * (len[first + i] - it->second[i]);
            seen.clear();
            continue;
          }
        }
      }
      // Nothing a step needs changes until one of the decoding samples reaches an event.
      int64_t steps = kMax;
      for (size_t i = first; i < first + k; ++i) steps = std::min(steps, to_event(len[i]));
      for (size_t i = first; i < first + k; ++i) len[i] += steps;
    }
  }

  // The most one decoding sample of length [prompt, F) attends, beside n - 1 partial chunks:
  // what the request needs at most, whatever order its samples decode in.
  int64_t safe_bound(int64_t prompt, int n) const {
    int64_t most = 0;
    for (Sample one : {sample(std::min(F_ - 1, std::max(prompt, rule_.budget - 1))), sample(F_ - 1)})
      most = std::max(most, need({one}, 1));
    return add_sat(most, n - 1);
  }

 private:
  // What a decoding sample of length L needs: its share of the prompt's full chunks (shared
  // by every sample, counted once per step) and its own chunks.
  struct Sample {
    bool selects = false;  // over budget, choosing top-k among [lo, hi)
    int64_t hi = 0;
    int64_t own = 0;       // chunks from the prompt's last full one on, and the top-k
    bool partial = false;  // when not decoding: its partial chunk stays on the device
    bool saturated = false;  // past every event but the chunk offset
  };

  Sample sample(int64_t L) const {
    const int64_t total = L + 1, nch = ceil_div(total, C_);  // L < F <= 2^63 - 1
    const SelectionRule::Range r = rule_.of(true, total, nch);
    Sample s;
    s.selects = r.selects;
    s.hi = r.hi;
    s.own = nch - q_;  // nch > q: the sample holds at least the prompt's full chunks
    if (r.selects) s.own = s.own - std::max<int64_t>(0, r.hi - std::max(r.lo, q_)) + rule_.topk;
    s.partial = L % C_ != 0;
    s.saturated = r.selects && r.hi >= q_;  // shares nothing but the sinks from here on
    return s;
  }

  // A step in which the oldest k samples decode (step_needs' count): the prompt's full chunks
  // they attend, once; their own chunks; the partial chunks of the others.
  int64_t need(const std::vector<Sample>& f, size_t k) const {
    int64_t shared = 0, hi = kMax, n = 0;
    bool all = false;
    for (size_t i = 0; i < k; ++i) {
      all = all || !f[i].selects;
      hi = std::min(hi, f[i].hi);
      n = add_sat(n, f[i].own);
    }
    const int64_t sinks = std::min(rule_.sink, q_);
    shared = all ? q_ : sinks + std::max<int64_t>(0, q_ - std::max(hi, sinks));
    for (size_t j = k; j < f.size(); ++j) n = add_sat(n, f[j].partial);
    return add_sat(n, shared);
  }

  // Steps until a sample of length L reaches a length where what it needs may change: a
  // chunk boundary (a new chunk; not partial) or just past it (partial again), the budget,
  // or the end of its generation.
  int64_t to_event(int64_t L) const {
    int64_t d = L % C_ == 0 ? 1 : C_ - L % C_;
    if (rule_.budget > L) d = std::min(d, rule_.budget - L);
    return std::min(d, F_ - L);
  }

  SelectionRule rule_;
  int64_t C_, q_, F_;
};

}  // namespace

StepNeeds request_needs(const CacheConfig& cfg, int64_t capacity, int64_t prompt_tokens, int64_t max_new_tokens,
                        int n) {
  if (prompt_tokens < 1)
    throw ValueError("prompt_tokens: expected an integer >= 1, got " + std::to_string(prompt_tokens));
  if (max_new_tokens < 1)
    throw ValueError("max_new_tokens: expected an integer >= 1, got " + std::to_string(max_new_tokens));
  if (n < 1 || n > kMaxForkChildren + 1)
    throw ValueError("n: expected an integer in 1.." + std::to_string(kMaxForkChildren + 1) +
                     " (the other n - 1 samples are forked at once, at most " + std::to_string(kMaxForkChildren) +
                     "), got " + std::to_string(n));
  const int64_t C = cfg.chunk_size, full = prompt_tokens / C;
  const bool partial = prompt_tokens % C != 0;
  StepNeeds out;
  // The prompt's full chunks and each sample's own: its copy of the partial chunk (the fork),
  // or the chunk its first decode step opens. Without a decode step nor a partial chunk, none.
  out.pool_chunks = full + (partial || max_new_tokens > 1 ? n : 0);
  out.pool_available = capacity;
  const EvictionConfig& ev = cfg.eviction;
  if (!ev.host_tier() || ev.dense_layers >= cfg.layers) return out;
  out.device_available = ev.device_chunks;
  // Prefill attends every chunk of the prompt; the fork holds the parent's partial chunk, a
  // copy per other sample and the copy's source.
  out.device_chunks = full + partial;
  if (n > 1 && partial) out.device_chunks = std::max<int64_t>(out.device_chunks, int64_t(n) + 1);
  if (out.device_chunks > out.device_available || max_new_tokens == 1) return out;
  const LoneRun run(ev, C, prompt_tokens, max_new_tokens);
  out.device_chunks = std::max(out.device_chunks, run.decode_peak(prompt_tokens, n, out.device_available));
  return out;
}

}  // namespace chunkvale
