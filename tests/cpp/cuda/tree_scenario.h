// Random prefix-tree scenarios for the CUDA host tests (test_device_plan.cpp,
// test_kernel_emulation.cpp): sequences on random cuts of a few shared prefixes, each
// prefilled in one or two steps (the second an extend), then decode steps of every live
// sequence. The test supplies `step`, which runs one planned step and checks it.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <vector>

#include "chunkvale/kv_cache.h"

namespace chunkvale {
namespace test {

struct TreeScenario {
  KVCache& cache;
  std::mt19937& rng;
  std::function<void(const std::vector<PlanEntry>&)> step;
  std::map<int64_t, std::vector<int32_t>> toks;  // every token of each sequence so far
  std::vector<int64_t> live;

  std::vector<int32_t> random_tokens(size_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = int32_t(rng() % 1000);
    return t;
  }

  // Adds a sequence and prefills what the tree did not cache: in one step, or (split) in
  // two at a random cut.
  void prefill(const std::vector<int32_t>& tk, bool split) {
    auto [id, cached] = cache.add_sequence(tk);
    toks[id] = tk;
    const int64_t pend = int64_t(tk.size()) - cached;
    const int64_t first = pend < 2 || !split ? pend : 1 + int64_t(rng() % uint32_t(pend - 1));
    step({PlanEntry{id, first, {}}});
    if (pend > first) step({PlanEntry{id, pend - first, {}}});
    live.push_back(id);
  }

  // n_prefixes prefixes of 1 .. 3 C + 5 tokens; n_seqs sequences, each a random cut of one
  // of them plus 1 .. max_own tokens of its own, split-prefilled at random.
  void random_tree(int C, int n_prefixes, int n_seqs, int max_own) {
    std::vector<std::vector<int32_t>> prefixes;
    for (int p = 0; p < n_prefixes; ++p) prefixes.push_back(random_tokens(size_t(1 + rng() % (3 * C + 5))));
    for (int s = 0; s < n_seqs; ++s) {
      const auto& pre = prefixes[rng() % prefixes.size()];
      std::vector<int32_t> tk(pre.begin(), pre.begin() + long(1 + rng() % pre.size()));
      const auto own = random_tokens(size_t(1 + rng() % uint32_t(max_own)));
      tk.insert(tk.end(), own.begin(), own.end());
      prefill(tk, rng() % 2);
    }
  }

  // `steps` decode steps of every live sequence, one random token each.
  void decode_all(int steps) {
    for (int d = 0; d < steps; ++d) {
      std::vector<PlanEntry> es;
      for (int64_t id : live) {
        const int32_t tok = int32_t(rng() % 1000);
        toks[id].push_back(tok);
        es.push_back(PlanEntry{id, 0, {tok}});
      }
      step(es);
    }
  }
};

}  // namespace test
}  // namespace chunkvale
