// The live sequences: their tokens, the prefix-tree path they hold (acquired nodes) and
// their private tail chunks. The table keeps tree references right; it never frees a
// chunk itself: what a sequence gives up is handed back for the chunk store to free.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "chunkvale/prefix_tree.h"

namespace chunkvale {

struct Sequence {
  int64_t id = 0;
  TreeNode* root = nullptr;
  std::vector<TreeNode*> path;   // sealed full chunks (acquired), in token order
  std::vector<int32_t> tail;     // private chunks after the path (last may be partial)
  std::vector<int32_t> tokens;   // committed token ids
  std::vector<int32_t> pending;  // prompt tokens not yet planned
  size_t pending_head = 0;
  int64_t length() const { return int64_t(tokens.size()); }
  int64_t pending_count() const { return int64_t(pending.size() - pending_head); }
  int64_t chunks() const { return int64_t(path.size() + tail.size()); }
  int32_t chunk(size_t i) const { return i < path.size() ? path[i]->slot : tail[i - path.size()]; }
};

class SequenceTable {
 public:
  SequenceTable(PrefixTree& tree, int chunk_size) : tree_(tree), C_(chunk_size) {}

  // KeyError naming `arg` for an unknown (or removed) id.
  Sequence& get(int64_t id, const char* arg);
  const Sequence& get(int64_t id, const char* arg) const;
  const std::unordered_map<int64_t, std::unique_ptr<Sequence>>& all() const { return seqs_; }
  int64_t size() const { return int64_t(seqs_.size()); }
  int64_t open_tails() const;  // live sequences whose last chunk is partial

  // The longest head of tokens[k*C, limit) a live sequence's private tail holds right after
  // the matched path of k chunks (e.g. a system prompt that ends mid-chunk, while its first
  // request still runs): that sequence if it beats `partial_len` (updated), else null.
  const Sequence* tail_source(const TreeNode* root, const PrefixMatch& m, const std::vector<int32_t>& tokens,
                              int64_t limit, int32_t& partial_len) const;

  // A new sequence holding `path` (acquired first, so that make_tail's allocation cannot
  // reclaim it), with make_tail()'s chunk (or -1: none) as its private tail and the first
  // `cached` tokens committed; the rest pending. Returns its id.
  int64_t add(TreeNode* root, const std::vector<TreeNode*>& path, const std::function<int32_t()>& make_tail,
              const std::vector<int32_t>& tokens, int64_t cached);

  // fork in two halves: `prepare` makes every allocation (children, ids, room in the table)
  // and changes nothing; `adopt` cannot fail. A child's tail is the caller's to fill.
  struct Children {
    std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs;
    std::vector<int64_t> ids;
  };
  Children prepare_children(const Sequence& parent, int n);
  void adopt(Children& children);

  // Removes a sequence; its private chunks go to `freed`.
  void remove(int64_t id, std::vector<int32_t>& freed);
  // Full private chunks join the tree. When another sequence already holds the same chunk
  // under the same parent (identical prompts prefilled together), ours goes to `dropped`
  // (this step's attention may still read it) and theirs is shared.
  void seal_full_chunks(Sequence& s, std::vector<int32_t>& dropped);

  std::vector<int32_t> chunks_of(const Sequence& s) const;
  int64_t tokens_cached() const;
  int64_t chunks_held() const;  // path + tail of every sequence: what they would hold without sharing

 private:
  PrefixTree& tree_;
  int C_;
  std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
  int64_t next_id_ = 1;
};

}  // namespace chunkvale
