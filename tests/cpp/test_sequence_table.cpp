// The sequence table alone: tree references follow adds, seals, forks and removes, and
// what a sequence gives up comes back to the caller instead of being freed.
#include <vector>

#include "check.h"
#include "chunkvale/errors.h"
#include "sequence_table.h"

using namespace chunkvale;

namespace {
constexpr int C = 16;

std::vector<int32_t> iota(int n, int32_t first) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[size_t(i)] = first + i;
  return v;
}

void add_seal_remove() {
  PrefixTree tree(C);
  SequenceTable seqs(tree, C);
  TreeNode* root = tree.root("");
  int32_t next_chunk = 0;
  const std::vector<int32_t> toks = iota(40, 0);
  const int64_t a = seqs.add(root, {}, [] { return -1; }, toks, 0);
  CHECK(seqs.size() == 1 && seqs.get(a, "seq").pending_count() == 40 && seqs.get(a, "seq").length() == 0);
  CHECK_THROWS(seqs.get(a + 1, "seq"), KeyError, "seq: unknown sequence id 2");
  // Commit its 40 tokens in three private chunks, then seal: two join the tree.
  Sequence& s = seqs.get(a, "seq");
  for (int i = 0; i < 3; ++i) s.tail.push_back(next_chunk++);
  s.tokens = toks;
  s.pending.clear();
  std::vector<int32_t> dropped;
  seqs.seal_full_chunks(s, dropped);
  CHECK(dropped.empty() && s.path.size() == 2 && s.tail.size() == 1 && s.tail[0] == 2);
  CHECK(tree.nodes() == 2 && tree.cached_nodes() == 0);
  CHECK(seqs.open_tails() == 1 && seqs.chunks_of(s) == std::vector<int32_t>({0, 1, 2}));
  // A second sequence prefilled with the same tokens seals its duplicate chunks: they are
  // dropped and the first's shared.
  const int64_t b = seqs.add(root, {}, [] { return -1; }, toks, 0);
  Sequence& t = seqs.get(b, "seq");
  for (int i = 0; i < 3; ++i) t.tail.push_back(next_chunk++);
  t.tokens = toks;
  seqs.seal_full_chunks(t, dropped);
  CHECK(dropped == std::vector<int32_t>({3, 4}) && t.path == s.path && tree.shared_nodes() == 2);
  CHECK(seqs.chunks_held() == 6 && seqs.tokens_cached() == 80);
  // Removing gives its private chunk back and releases its path (still held by a).
  std::vector<int32_t> freed;
  seqs.remove(b, freed);
  CHECK(freed == std::vector<int32_t>({5}) && tree.shared_nodes() == 0 && tree.cached_nodes() == 0);
  seqs.remove(a, freed);
  CHECK(freed.back() == 2 && tree.cached_nodes() == 2 && seqs.size() == 0);  // the path stays cached
}

void add_acquires_before_the_tail() {
  PrefixTree tree(C);
  SequenceTable seqs(tree, C);
  TreeNode* root = tree.root("");
  TreeNode* n0 = tree.insert(root, iota(C, 0).data(), 7);
  CHECK(tree.cached_nodes() == 1);
  bool pinned = false;
  const int64_t id = seqs.add(root, {n0}, [&] {
    pinned = tree.cached_nodes() == 0;  // make_tail runs with the path acquired: not reclaimable
    return 9;
  }, iota(C + 5, 0), C + 3);
  const Sequence& s = seqs.get(id, "seq");
  CHECK(pinned && s.tail == std::vector<int32_t>({9}) && s.length() == C + 3 && s.pending_count() == 2);
  CHECK(s.chunk(0) == 7 && s.chunk(1) == 9);
}

void fork_and_tail_source() {
  PrefixTree tree(C);
  SequenceTable seqs(tree, C);
  TreeNode* root = tree.root("");
  TreeNode* n0 = tree.insert(root, iota(C, 0).data(), 0);
  const std::vector<int32_t> toks = iota(C + 6, 0);
  const int64_t a = seqs.add(root, {n0}, [] { return 1; }, toks, C + 6);
  // A prompt continuing a's private tail for 4 tokens finds a as its copy source.
  std::vector<int32_t> other = iota(C + 4, 0);
  other.push_back(999);
  PrefixMatch m = tree.match(root, other.data(), int64_t(other.size()));
  CHECK(m.path.size() == 1 && m.partial_len == 0);
  const Sequence* src = seqs.tail_source(root, m, other, int64_t(other.size()), m.partial_len);
  CHECK(src && src->id == a && m.partial_len == 4);
  // Nothing changes until adopt; children share the path and copy tokens and pending.
  SequenceTable::Children kids = seqs.prepare_children(seqs.get(a, "seq"), 3);
  CHECK(seqs.size() == 1 && n0->live == 1 && kids.ids == std::vector<int64_t>({2, 3, 4}));
  for (int64_t id : kids.ids) kids.seqs.at(id)->tail.push_back(int32_t(10 + id));
  seqs.adopt(kids);
  CHECK(seqs.size() == 4 && n0->live == 4 && seqs.open_tails() == 4);
  CHECK(seqs.get(3, "seq").tokens == toks && seqs.get(3, "seq").tail == std::vector<int32_t>({13}));
  const int64_t next = seqs.add(root, {}, [] { return -1; }, toks, 0);
  CHECK(next == 5);  // ids continue after the children
}
}  // namespace

int main() {
  add_seal_remove();
  add_acquires_before_the_tail();
  fork_and_tail_source();
  return finish("sequence_table");
}
