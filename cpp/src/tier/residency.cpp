#include "residency.h"

#include <stdexcept>
#include <string>

namespace chunkvale {

namespace {
[[noreturn]] void broken(const char* what, int layer, int32_t chunk) {
  // An internal invariant: a wrong transition would hand one slot to two chunks.
  throw std::logic_error(std::string("chunkvale internal error: residency ") + what + " (layer " +
                         std::to_string(layer) + ", chunk " + std::to_string(chunk) + ")");
}
}  // namespace

Residency::Residency(int first_layer, int layers, int64_t chunks, int64_t slots) : first_(first_layer) {
  for (int l = first_layer; l < layers; ++l) {
    Layer L;
    L.slot_of.assign(size_t(chunks), -1);
    L.host.assign(size_t(chunks), -1);
    L.ticket.assign(size_t(chunks), 0);
    L.owner.assign(size_t(slots), -1);
    L.last_use.assign(size_t(slots), 0);
    for (int64_t s = slots - 1; s >= 0; --s) L.free.push_back(int32_t(s));  // low slots first
    layers_.push_back(std::move(L));
  }
}

void Residency::relist(Layer& L, int32_t s) {
  const int32_t c = L.owner[size_t(s)];
  // Without a host copy (a partial chunk) eviction would lose data.
  if (c >= 0 && L.host[size_t(c)] >= 0) L.lru.insert({L.last_use[size_t(s)], s});
}

void Residency::set_host(int layer, int32_t chunk, int64_t block, uint64_t ticket) {
  Layer& L = at(layer);
  if (L.host[size_t(chunk)] >= 0) broken("second host copy", layer, chunk);
  L.host[size_t(chunk)] = block;
  L.ticket[size_t(chunk)] = ticket;
  const int32_t s = L.slot_of[size_t(chunk)];
  if (s >= 0) relist(L, s);
}

void Residency::clear_host(int layer, int32_t chunk) {
  Layer& L = at(layer);
  const int32_t s = L.slot_of[size_t(chunk)];
  if (s >= 0) unlist(L, s);
  L.host[size_t(chunk)] = -1;
  L.ticket[size_t(chunk)] = 0;
}

int32_t Residency::take_free(int layer) {
  Layer& L = at(layer);
  if (L.free.empty()) return -1;
  int32_t s = L.free.back();
  L.free.pop_back();
  return s;
}

void Residency::place(int layer, int32_t chunk, int32_t slot) {
  Layer& L = at(layer);
  if (L.slot_of[size_t(chunk)] >= 0 || L.owner[size_t(slot)] >= 0) broken("double placement", layer, chunk);
  L.slot_of[size_t(chunk)] = slot;
  L.owner[size_t(slot)] = chunk;
  relist(L, slot);
}

void Residency::evict(int layer, int32_t chunk) {
  Layer& L = at(layer);
  int32_t s = L.slot_of[size_t(chunk)];
  if (s < 0) broken("eviction of a chunk that is not resident", layer, chunk);
  unlist(L, s);
  L.slot_of[size_t(chunk)] = -1;
  L.owner[size_t(s)] = -1;
  L.last_use[size_t(s)] = 0;
  L.free.push_back(s);
}

void Residency::touch(int layer, int32_t chunk, uint64_t stamp) {
  Layer& L = at(layer);
  const int32_t s = L.slot_of[size_t(chunk)];
  unlist(L, s);
  L.last_use[size_t(s)] = stamp;
  relist(L, s);
}

void Residency::demote(int layer, int32_t chunk) {
  Layer& L = at(layer);
  const int32_t s = L.slot_of[size_t(chunk)];
  unlist(L, s);
  L.last_use[size_t(s)] = 0;
  relist(L, s);
}

int32_t Residency::victim(int layer, uint64_t stamp) const {
  const Layer& L = at(layer);
  // The least recently used evictable slot (ties: the lowest slot), unless even it was
  // used by this operation.
  if (L.lru.empty() || L.lru.begin()->first >= stamp) return -1;
  return L.owner[size_t(L.lru.begin()->second)];
}

int64_t Residency::slots_in_use() const {
  int64_t n = 0;
  for (const Layer& L : layers_) n += int64_t(L.owner.size() - L.free.size());
  return n;
}

}  // namespace chunkvale
