#include "chunkvale/prefix_tree.h"

#include <algorithm>

namespace chunkvale {

size_t TokenKeyHash::operator()(const std::vector<int32_t>& v) const noexcept {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over 32-bit words, then a mix
  for (int32_t t : v) {
    h ^= uint32_t(t);
    h *= 1099511628211ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return size_t(h);
}

TreeNode* PrefixTree::root(const std::string& ns) {
  auto it = roots_.find(ns);
  if (it != roots_.end()) return it->second.get();
  auto r = std::make_unique<TreeNode>();
  r->depth = -1;
  TreeNode* p = r.get();
  roots_.emplace(ns, std::move(r));
  return p;
}

TreeNode* PrefixTree::find_root(const std::string& ns) const {
  auto it = roots_.find(ns);
  return it == roots_.end() ? nullptr : it->second.get();
}

TreeNode* PrefixTree::child(TreeNode* parent, const int32_t* tokens) const {
  std::vector<int32_t> key(tokens, tokens + C_);
  auto it = parent->children.find(key);
  return it == parent->children.end() ? nullptr : it->second.get();
}

PrefixMatch PrefixTree::match(const TreeNode* root, const int32_t* tokens,
                              int64_t max_tokens) const {
  PrefixMatch m;
  if (!root) return m;
  const TreeNode* cur = root;
  int64_t pos = 0;
  std::vector<int32_t> key;
  key.reserve(size_t(C_));
  while (pos + C_ <= max_tokens) {
    key.assign(tokens + pos, tokens + pos + C_);
    auto it = cur->children.find(key);
    if (it == cur->children.end()) break;
    cur = it->second.get();
    m.path.push_back(const_cast<TreeNode*>(cur));
    pos += C_;
  }
  // Copy-on-diverge candidate: the child sharing the longest run of leading tokens.
  int64_t rest = std::min<int64_t>(max_tokens - pos, C_);
  if (rest > 0) {
    for (const auto& kv : cur->children) {
      const auto& t = kv.second->tokens;
      int32_t n = 0;
      while (n < rest && t[size_t(n)] == tokens[pos + n]) ++n;
      if (n > m.partial_len) {
        m.partial_len = n;
        m.partial = kv.second.get();
      }
    }
  }
  return m;
}

TreeNode* PrefixTree::insert(TreeNode* parent, const int32_t* tokens, int32_t slot) {
  auto n = std::make_unique<TreeNode>();
  n->slot = slot;
  n->parent = parent;
  n->depth = parent->depth + 1;
  n->tokens.assign(tokens, tokens + C_);
  touch(n.get());
  TreeNode* p = n.get();
  forget_evictable(parent);  // no longer a leaf
  parent->children.emplace(p->tokens, std::move(n));
  ++nodes_;
  ++cached_;  // live == 0 until acquired
  update_evictable(p);
  ++version_;
  return p;
}

void PrefixTree::acquire(TreeNode* n) {
  if (n->live == 0) {
    --cached_;
    forget_evictable(n);
  }
  if (++n->live == 2) ++shared_;
  touch(n);
  ++version_;
}

void PrefixTree::release(TreeNode* n) {
  if (n->live-- == 2) --shared_;
  touch(n);
  if (n->live == 0) {
    ++cached_;
    update_evictable(n);
  }
  ++version_;
}

void PrefixTree::update_evictable(TreeNode* n) {
  if (!n->is_root() && n->live == 0 && n->children.empty())
    evictable_.emplace(n->last_use, n);
}

void PrefixTree::forget_evictable(TreeNode* n) { evictable_.erase({n->last_use, n}); }

int32_t PrefixTree::reclaim_one() {
  if (evictable_.empty()) return -1;
  TreeNode* n = evictable_.begin()->second;
  evictable_.erase(evictable_.begin());
  int32_t slot = n->slot;
  TreeNode* parent = n->parent;
  parent->children.erase(n->tokens);  // destroys n
  --nodes_;
  --cached_;
  update_evictable(parent);
  ++version_;
  return slot;
}

std::vector<int32_t> PrefixTree::reclaim_all() {
  std::vector<int32_t> slots;
  for (int32_t s; (s = reclaim_one()) >= 0;) slots.push_back(s);
  return slots;
}

}  // namespace chunkvale
