// Per-layer residency for the host tier. Chunk ids are logical (ChunkPool slots: what
// tree nodes and sequences hold); each layer that evicts has its own small set of device
// slots and a table chunk -> {device slot | host block | both}. Bookkeeping only: the
// core decides what moves and the backend moves it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace chunkvale {

class Residency {
 public:
  // Layers [first_layer, layers) evict; each holds `slots` device slots for `chunks`
  // logical chunks.
  Residency(int first_layer, int layers, int64_t chunks, int64_t slots);

  int first_layer() const { return first_; }
  int32_t slot(int layer, int32_t chunk) const { return at(layer).slot_of[size_t(chunk)]; }
  int64_t host_block(int layer, int32_t chunk) const { return at(layer).host[size_t(chunk)]; }
  uint64_t ticket(int layer, int32_t chunk) const { return at(layer).ticket[size_t(chunk)]; }

  void set_host(int layer, int32_t chunk, int64_t block, uint64_t ticket);
  void clear_host(int layer, int32_t chunk);

  // A free device slot of the layer, or -1.
  int32_t take_free(int layer);
  void place(int layer, int32_t chunk, int32_t slot);  // slot from take_free
  void evict(int layer, int32_t chunk);                 // its slot becomes free
  // Marks a resident chunk used by the operation `stamp` (stamps only grow): LRU order,
  // and protection from victim().
  void touch(int layer, int32_t chunk, uint64_t stamp);
  // Makes a resident chunk the next victim candidate (as if never used).
  void demote(int layer, int32_t chunk);
  // The least recently used resident chunk that has a host copy and was not touched by
  // the operation `stamp`, or -1.
  int32_t victim(int layer, uint64_t stamp) const;

  int64_t slots_in_use() const;  // over every evicting layer

 private:
  struct Layer {
    std::vector<int32_t> slot_of;   // chunk -> device slot or -1
    std::vector<int64_t> host;      // chunk -> host block or -1
    std::vector<uint64_t> ticket;   // chunk -> its backup's ticket (0: none)
    std::vector<int32_t> owner;     // slot -> chunk or -1
    std::vector<uint64_t> last_use; // slot -> stamp of its last use
    std::vector<int32_t> free;      // free slots (stack)
    // Evictable slots (resident, with a host copy) by (last use, slot): victim() takes the
    // first, so finding one does not scan every device slot.
    std::set<std::pair<uint64_t, int32_t>> lru;
  };
  // Re-files slot s in L.lru after its chunk, host copy or last use changed.
  static void unlist(Layer& L, int32_t s) { L.lru.erase({L.last_use[size_t(s)], s}); }
  static void relist(Layer& L, int32_t s);
  Layer& at(int layer) { return layers_[size_t(layer - first_)]; }
  const Layer& at(int layer) const { return layers_[size_t(layer - first_)]; }

  int first_;
  std::vector<Layer> layers_;
};

}  // namespace chunkvale
