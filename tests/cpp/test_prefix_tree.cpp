#include <vector>

#include "check.h"
#include "chunkvale/prefix_tree.h"

using namespace chunkvale;

int main() {
  const int C = 4;
  PrefixTree t(C);
  TreeNode* root = t.root("");
  CHECK(t.root("") == root && t.root("tenant-b") != root);  // namespaces are separate roots
  std::vector<int32_t> a{1, 2, 3, 4, 5, 6, 7, 8}, b{1, 2, 3, 4, 5, 6, 9, 9};
  TreeNode* n1 = t.insert(root, a.data(), 10);
  TreeNode* n2 = t.insert(n1, a.data() + 4, 11);
  t.acquire(n1);
  t.acquire(n2);
  CHECK(t.nodes() == 2 && t.cached_nodes() == 0);

  PrefixMatch m = t.match(root, b.data(), 8);
  CHECK(m.path.size() == 1 && m.path[0] == n1);        // first chunk matches fully
  CHECK(m.partial == n2 && m.partial_len == 2);         // second matches 5,6 then diverges
  PrefixMatch capped = t.match(root, a.data(), 7);      // max_tokens stops before chunk 2 ends
  CHECK(capped.path.size() == 1 && capped.partial_len == 3);
  CHECK(t.match(t.root("tenant-b"), a.data(), 8).path.empty());  // no cross-namespace match

  t.acquire(n1);
  CHECK(t.shared_nodes() == 1);
  t.release(n1);
  CHECK(t.shared_nodes() == 0);

  // A referenced node is never reclaimed; unreferenced leaves go first, LRU order.
  CHECK(t.reclaim_one() == -1);
  t.release(n2);
  CHECK(t.cached_nodes() == 1);
  t.release(n1);
  CHECK(t.cached_nodes() == 2);
  CHECK(t.reclaim_one() == 11);  // the leaf, although its parent was released later
  CHECK(t.reclaim_one() == 10);
  CHECK(t.reclaim_one() == -1 && t.nodes() == 0 && t.cached_nodes() == 0);

  // LRU among leaves: the older one goes first.
  TreeNode* x = t.insert(root, a.data(), 1);
  TreeNode* y = t.insert(root, b.data() + 4, 2);
  t.acquire(y);
  t.release(y);
  t.acquire(x);
  t.release(x);  // x used last
  CHECK(t.reclaim_one() == 2 && t.reclaim_one() == 1);
  return finish("prefix_tree");
}
