#include "sequence_table.h"

#include <algorithm>
#include <string>

#include "chunkvale/errors.h"

namespace chunkvale {

Sequence& SequenceTable::get(int64_t id, const char* arg) {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    throw KeyError(std::string(arg) + ": unknown sequence id " + std::to_string(id) + " (never added, or removed)");
  return *it->second;
}

const Sequence& SequenceTable::get(int64_t id, const char* arg) const {
  return const_cast<SequenceTable*>(this)->get(id, arg);
}

int64_t SequenceTable::open_tails() const {
  int64_t n = 0;
  for (const auto& kv : seqs_) n += kv.second->length() % C_ != 0;
  return n;
}

const Sequence* SequenceTable::tail_source(const TreeNode* root, const PrefixMatch& m,
                                           const std::vector<int32_t>& tokens, int64_t limit,
                                           int32_t& partial_len) const {
  const Sequence* best = nullptr;
  const int64_t k = int64_t(m.path.size());
  const TreeNode* at = k ? m.path.back() : root;
  const int64_t rest = std::min<int64_t>(limit - k * C_, C_);
  for (const auto& kv : seqs_) {
    const Sequence& o = *kv.second;
    if (o.tail.empty() || int64_t(o.path.size()) != k || (k ? o.path.back() : o.root) != at) continue;
    const int64_t avail = std::min<int64_t>(o.length() - k * C_, rest);
    int32_t n = 0;
    while (n < avail && o.tokens[size_t(k * C_ + n)] == tokens[size_t(k * C_ + n)]) ++n;
    if (n > partial_len) {
      partial_len = n;
      best = &o;
    }
  }
  return best;
}

int64_t SequenceTable::add(TreeNode* root, const std::vector<TreeNode*>& path,
                           const std::function<int32_t()>& make_tail, const std::vector<int32_t>& tokens,
                           int64_t cached) {
  auto s = std::make_unique<Sequence>();
  s->id = next_id_;
  s->root = root;
  s->path = path;
  s->tail.reserve(1);
  s->tokens.assign(tokens.begin(), tokens.begin() + cached);
  s->pending.assign(tokens.begin() + cached, tokens.end());
  for (TreeNode* n : path) tree_.acquire(n);
  const int32_t tail = make_tail();
  if (tail >= 0) s->tail.push_back(tail);
  seqs_.emplace(next_id_, std::move(s));
  return next_id_++;
}

SequenceTable::Children SequenceTable::prepare_children(const Sequence& s, int n) {
  Children out;
  out.seqs.reserve(size_t(n));
  out.ids.reserve(size_t(n));
  for (int i = 0; i < n; ++i) {
    auto c = std::make_unique<Sequence>();
    c->id = next_id_ + i;
    c->root = s.root;
    c->path = s.path;
    c->tail.reserve(1);
    c->tokens = s.tokens;
    c->pending.assign(s.pending.begin() + long(s.pending_head), s.pending.end());
    out.ids.push_back(c->id);
    out.seqs.emplace(c->id, std::move(c));
  }
  seqs_.reserve(seqs_.size() + size_t(n));
  return out;
}

void SequenceTable::adopt(Children& children) {
  for (auto& kv : children.seqs)
    for (TreeNode* node : kv.second->path) tree_.acquire(node);
  next_id_ += int64_t(children.ids.size());
  seqs_.merge(children.seqs);  // moves the nodes: no allocation (room reserved by prepare)
}

void SequenceTable::remove(int64_t id, std::vector<int32_t>& freed) {
  Sequence& s = *seqs_.at(id);
  for (TreeNode* n : s.path) tree_.release(n);
  freed.insert(freed.end(), s.tail.begin(), s.tail.end());
  seqs_.erase(id);
}

void SequenceTable::seal_full_chunks(Sequence& s, std::vector<int32_t>& dropped) {
  size_t sealed = 0;
  while (sealed < s.tail.size() && int64_t(s.path.size() + 1) * C_ <= s.length()) {
    TreeNode* parent = s.path.empty() ? s.root : s.path.back();
    const int32_t* key = s.tokens.data() + s.path.size() * size_t(C_);
    int32_t slot = s.tail[sealed++];
    TreeNode* node = tree_.child(parent, key);
    if (node)
      dropped.push_back(slot);
    else
      node = tree_.insert(parent, key, slot);
    tree_.acquire(node);
    s.path.push_back(node);
  }
  s.tail.erase(s.tail.begin(), s.tail.begin() + long(sealed));
}

std::vector<int32_t> SequenceTable::chunks_of(const Sequence& s) const {
  std::vector<int32_t> out;
  out.reserve(size_t(s.chunks()));
  for (size_t i = 0; i < size_t(s.chunks()); ++i) out.push_back(s.chunk(i));
  return out;
}

int64_t SequenceTable::tokens_cached() const {
  int64_t n = 0;
  for (const auto& kv : seqs_) n += kv.second->length();
  return n;
}

int64_t SequenceTable::chunks_held() const {
  int64_t n = 0;
  for (const auto& kv : seqs_) n += kv.second->chunks();
  return n;
}

}  // namespace chunkvale
