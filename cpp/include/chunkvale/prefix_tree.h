// Prefix tree of full chunks. A node is one chunk (C token ids and the slot holding
// its K/V); children are keyed by their tokens; each namespace has its own root.
// Nodes count the live sequences through them; an unreferenced node stays as cached
// prefix and is reclaimed leaf-first in LRU order only when slots are needed.
#pragma once
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace chunkvale {

struct TokenKeyHash {
  size_t operator()(const std::vector<int32_t>& v) const noexcept;
};

struct TreeNode {
  int32_t slot = -1;  // -1 for a namespace root
  int32_t depth = 0;  // chunk index in the sequence (root: -1)
  TreeNode* parent = nullptr;
  std::vector<int32_t> tokens;  // C ids (empty for a root)
  std::unordered_map<std::vector<int32_t>, std::unique_ptr<TreeNode>, TokenKeyHash> children;
  int32_t live = 0;        // live sequences whose path holds this node
  uint64_t last_use = 0;   // LRU clock
  bool is_root() const { return parent == nullptr; }
};

// The longest cached match of a token list.
struct PrefixMatch {
  std::vector<TreeNode*> path;   // fully matched chunks, root excluded
  TreeNode* partial = nullptr;   // chunk matched only in its first `partial_len` tokens
  int32_t partial_len = 0;
};

class PrefixTree {
 public:
  explicit PrefixTree(int chunk_size) : C_(chunk_size) {}

  TreeNode* root(const std::string& ns);          // created on first use
  TreeNode* find_root(const std::string& ns) const;

  // Longest match of tokens[0:max_tokens]; never changes the tree.
  PrefixMatch match(const TreeNode* root, const int32_t* tokens, int64_t max_tokens) const;

  // Child of `parent` with these C tokens, or nullptr.
  TreeNode* child(TreeNode* parent, const int32_t* tokens) const;
  // Adds a child holding `slot` (live = 0: the caller acquires it).
  TreeNode* insert(TreeNode* parent, const int32_t* tokens, int32_t slot);

  // Live-count bookkeeping along a path.
  void acquire(TreeNode* node);
  void release(TreeNode* node);

  // Reclaims the least recently used unreferenced leaf; returns its slot, or -1.
  int32_t reclaim_one();
  // Reclaims every unreferenced node; returns their slots.
  std::vector<int32_t> reclaim_all();

  int64_t cached_nodes() const { return cached_; }  // live == 0 (all reclaimable)
  int64_t shared_nodes() const { return shared_; }  // live >= 2
  int64_t nodes() const { return nodes_; }
  uint64_t version() const { return version_; }     // bumps on any structural change

 private:
  void touch(TreeNode* n) { n->last_use = ++clock_; }
  void update_evictable(TreeNode* n);
  void forget_evictable(TreeNode* n);

  int C_;
  std::unordered_map<std::string, std::unique_ptr<TreeNode>> roots_;
  std::set<std::pair<uint64_t, TreeNode*>> evictable_;  // unreferenced leaves by LRU
  uint64_t clock_ = 0;
  uint64_t version_ = 0;
  int64_t cached_ = 0, shared_ = 0, nodes_ = 0;
};

}  // namespace chunkvale
