#include <set>
#include <stdexcept>

#include "check.h"
#include "chunkvale/chunk_pool.h"

using chunkvale::ChunkPool;

int main() {
  ChunkPool p(4);
  CHECK(p.capacity() == 4 && p.in_use() == 0 && p.free_count() == 4);
  std::set<int32_t> got;
  for (int i = 0; i < 4; ++i) got.insert(p.alloc());
  CHECK(got == (std::set<int32_t>{0, 1, 2, 3}));  // distinct, all slots
  CHECK(p.alloc() == -1);                         // exhausted: no slot, no throw
  CHECK(p.in_use() == 4 && p.peak() == 4);
  p.free(2);
  CHECK(p.in_use() == 3 && p.free_count() == 1 && p.peak() == 4);
  CHECK(p.alloc() == 2);  // the freed slot comes back
  p.free(0);
  CHECK_THROWS(p.free(0), std::logic_error, "not in use");  // double free is caught
  CHECK_THROWS(p.free(7), std::logic_error, "not in use");
  CHECK(p.in_use() == 3);
  return finish("chunk_pool");
}
