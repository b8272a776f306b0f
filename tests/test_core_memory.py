"""Memory is what prefix sharing promises, checked through stats() and the shadow model.

Every scenario also runs attention against the float64 reference (Shadow does that on each
step), so a chunk count that is right for the wrong reason still fails.

Interpretations of stats() fields (docs/API.md names them without formulas):
  chunks_in_use   slots holding anything: tree chunks (live or cached) + private chunks
  chunks_cached   tree chunks no live sequence references (LRU, reclaimable)
  chunks_shared   tree chunks referenced by >= 2 live sequences
  tokens_saved_by_sharing  sum over tree chunks of (live references - 1) * chunk_size
  reused_prompt_tokens     sum of add_sequence's n_cached
  bytes_per_chunk          layers * 2 (K,V) * kv_heads * chunk_size * head_dim * itemsize
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from reference import Shadow

VOCAB = 50_000
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _fresh(rng, n):
    return [int(t) for t in rng.integers(0, VOCAB, size=int(n))]


def _shadow(cv, seed, **kw):
    base = dict(layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, capacity_chunks=512, seed=seed)
    base.update(kw)
    return Shadow(cv, **base)


def _saved(sh):
    return sum(max(0, nd.refs - 1) for nd in sh.nodes.values()) * sh.C


@pytest.mark.parametrize("C,ns,nu,B,dtype", [
    (16, 200, 50, 8, "float32"),
    (32, 256, 40, 6, "float16"),   # prefix a whole number of chunks
    (64, 300, 130, 5, "float32"),
    (128, 1024, 128, 4, "float16"),
])
def test_shared_prefix_is_stored_once(cv, seed, C, ns, nu, B, dtype):
    rng = np.random.default_rng(seed)
    sh = _shadow(cv, seed, chunk_size=C, dtype=dtype, q_heads=8, kv_heads=2, head_dim=64)
    prefix = _fresh(rng, ns)
    s0, n0 = sh.add(prefix + _fresh(rng, nu))
    assert n0 == 0
    sh.run_step([(s0, ns + nu)])
    ids = [s0]
    for _ in range(B - 1):
        s, n = sh.add(prefix + _fresh(rng, nu))
        assert n == ns, f"a sequence over the cached {ns}-token prefix reused {n} tokens"
        ids.append(s)
    sh.run_step([(s, nu) for s in ids[1:]] + [(s0, [1])])
    sh.run_step([(s, [2]) for s in ids])  # commits the previous step
    st = sh.check_stats("B sequences over one prefix")
    total = ns + nu + 1  # + the decode token of the last step is not committed yet
    full_shared = ns // C
    per_seq = -(-(ns + nu + 1) // C) - full_shared  # after the last plan reserved one more token
    want = full_shared + B * per_seq
    assert st["chunks_in_use"] == want, (st, want)
    assert st["chunks_in_use"] < B * math.ceil(total / C), "no sharing happened"
    assert st["chunks_shared"] == full_shared, st
    assert st["reused_prompt_tokens"] == (B - 1) * ns, st
    assert st["tokens_saved_by_sharing"] == _saved(sh) == (B - 1) * full_shared * C, st
    assert st["bytes_per_chunk"] == 2 * 2 * 2 * C * 64 * ITEMSIZE[dtype], st
    for s in ids:
        sh.remove(s)
    st = sh.check_stats("all removed")
    assert st["sequences"] == 0 and st["tokens_cached"] == 0, st
    assert st["chunks_cached"] == st["chunks_in_use"] > 0, "full chunks must stay as cached prefix"
    sh.clear()
    st = sh.check_stats("clear")
    assert st["chunks_in_use"] == 0 and st["chunks_free"] == st["capacity_chunks"], st
    assert st["peak_chunks"] >= want


def test_concurrent_identical_prompts_dedupe_at_commit(cv, seed):
    rng = np.random.default_rng(seed)
    C, L, B = 16, 3 * 16 + 5, 5
    sh = _shadow(cv, seed, chunk_size=C)
    p = _fresh(rng, L)
    ids = [sh.add(p)[0] for _ in range(B)]  # nothing cached yet: all prefill the same tokens
    st = sh.check_stats("added")
    assert st["reused_prompt_tokens"] == 0
    sh.plan([(s, L) for s in ids])
    st = sh.check_stats("planned")
    assert st["chunks_in_use"] == B * math.ceil(L / C), "plan reserves every sequence's chunks"
    for layer in range(sh.layers):
        sh.append(layer)
        sh.attend(layer)
    sh.run_step([(s, [9]) for s in ids])  # commit: identical full chunks collapse into one
    st = sh.check_stats("committed")
    assert st["chunks_in_use"] == L // C + B, st  # 3 shared + 5 private tails
    assert st["chunks_shared"] == L // C, st


def test_fork_shares_full_chunks_and_copies_the_tail(cv, seed):
    rng = np.random.default_rng(seed)
    C = 32
    sh = _shadow(cv, seed, chunk_size=C, q_heads=9, kv_heads=3)
    a, _ = sh.add(_fresh(rng, 2 * C + 7))
    sh.run_step([(a, 2 * C + 7)])
    before = sh.cache.stats()["chunks_in_use"]
    kids = sh.fork(a, 4)  # check_stats verifies the exact model; and explicitly:
    st = sh.cache.stats()
    assert st["chunks_in_use"] == before + 4, (before, st)
    assert st["chunks_shared"] == 2, st
    sh.run_step([(k, [i]) for i, k in enumerate(kids)] + [(a, [99])])


def test_cached_prefix_survives_remove_and_is_reused(cv, seed):
    rng = np.random.default_rng(seed)
    C = 16
    sh = _shadow(cv, seed, chunk_size=C)
    p = _fresh(rng, 3 * C + 5)
    a, _ = sh.add(p)
    sh.run_step([(a, len(p))])
    sh.remove(a)
    st = sh.check_stats("removed")
    assert st["chunks_cached"] == 3 and st["chunks_in_use"] == 3, st
    b, nb = sh.add(p + _fresh(rng, 4))
    assert nb == 3 * C  # the private tail of A was freed; its full chunks were kept
    st = sh.check_stats("re-added")
    assert st["chunks_cached"] == 0 and st["reused_prompt_tokens"] == 3 * C, st
    sh.run_step([(b, 9)])  # attention over the recalled prefix must match the reference
    sh.run_step([(b, [5])])


def test_cached_prefix_reclaimed_under_pressure_instead_of_raising(cv, seed):
    rng = np.random.default_rng(seed)
    C, cap = 16, 10
    sh = _shadow(cv, seed, chunk_size=C, capacity_chunks=cap, memory="bounds")
    pa = _fresh(rng, 4 * C)
    a, _ = sh.add(pa)
    sh.run_step([(a, 4 * C)])
    sh.remove(a)
    st = sh.check_stats("A cached")
    assert st["chunks_cached"] == 4
    b, _ = sh.add(_fresh(rng, 8 * C))
    sh.run_step([(b, 8 * C)])  # needs 8 slots: 6 free + 2 reclaimed from A's cached chunks
    st = sh.check_stats("B prefilled")
    assert st["chunks_in_use"] <= cap
    left = st["chunks_cached"]
    assert left == 2, st
    # what is left of A must still be reachable from the root (leaves go first): no orphans
    c, nc = sh.add(pa[:4 * C - 1])
    assert nc == left * C, f"{left} cached chunks of A left, but only {nc} tokens reusable"
    sh.remove(b)  # the pool is full of b and c: make room for the rest of c
    sh.run_step([(c, 4 * C - 1 - nc)])
    sh.run_step([(c, [3])])


def test_capacity_error_only_when_nothing_is_evictable(cv, seed):
    rng = np.random.default_rng(seed)
    C, cap = 16, 10
    sh = _shadow(cv, seed, chunk_size=C, capacity_chunks=cap, memory="bounds")
    # 1 cached chunk + 9 live slots
    x, _ = sh.add(_fresh(rng, C))
    sh.run_step([(x, C)])
    sh.remove(x)
    a, _ = sh.add(_fresh(rng, 9 * C))
    sh.run_step([(a, 9 * C)])
    b, _ = sh.add(_fresh(rng, 2 * C))
    st0 = sh.cache.stats()
    assert st0["chunks_in_use"] == cap and st0["chunks_cached"] == 1, st0
    # needs 2 slots, 1 is reclaimable: must raise, and must not have evicted the cached one
    with pytest.raises(cv.CapacityError) as ei:
        sh.cache.plan([(b, 2 * C)])
    assert isinstance(ei.value, RuntimeError)
    assert sh.cache.stats() == st0, "a failed plan changed the cache"
    # one slot is fine: taken from the cached chunk
    sh.run_step([(b, C)])
    st = sh.check_stats("reclaimed one")
    assert st["chunks_cached"] == 0 and st["chunks_in_use"] == cap
    # full, nothing evictable: the next chunk of b raises
    with pytest.raises(cv.CapacityError):
        sh.cache.plan([(b, C)])
    assert sh.cache.stats()["chunks_in_use"] == cap
    sh.remove(a)  # 9 cached chunks now
    sh.run_step([(b, C)])
    st = sh.check_stats("after remove")
    assert st["chunks_in_use"] <= cap and st["chunks_cached"] == 8, st


def test_capacity_error_on_full_pool_leaves_cache_usable(cv, seed):
    rng = np.random.default_rng(seed)
    C, cap = 16, 6
    sh = _shadow(cv, seed, chunk_size=C, capacity_chunks=cap, memory="exact")
    a, _ = sh.add(_fresh(rng, 5 * C + 3))
    sh.run_step([(a, 5 * C + 3)])  # 6 slots, all live
    b, _ = sh.add(_fresh(rng, 5))
    st0 = sh.cache.stats()
    assert st0["chunks_free"] == 0
    for call in (lambda: sh.cache.plan([(b, 5)]),
                 lambda: sh.cache.plan([(a, [1]), (b, 2)]),
                 lambda: sh.cache.fork(a, 1),  # the partial tail (3 tokens) must be copied
                 lambda: sh.cache.add_sequence(sh.seqs[a].tokens[:C + 2])):  # partial match: copy
        with pytest.raises(cv.CapacityError):
            call()
        assert sh.cache.stats() == st0
    sh.run_step([(a, [1])])  # fits in a's tail chunk
    sh.remove(a)
    sh.run_step([(b, 5)])
    sh.check_stats("after recovery")


def test_remove_everything_and_clear_returns_pool_to_empty(cv, seed):
    rng = np.random.default_rng(seed)
    sh = _shadow(cv, seed, chunk_size=16, capacity_chunks=300)
    base = _fresh(rng, 100)
    ids = []
    for i in range(6):
        s, _ = sh.add(base[:int(rng.integers(10, 100))] + _fresh(rng, int(rng.integers(1, 30))),
                      namespace=["", "x"][i % 2])
        sh.run_step([(s, sh.seqs[s].pending)])
        ids.append(s)
    ids += sh.fork(ids[0], 2)
    sh.run_step([(s, [1]) for s in ids])
    sh.run_step([(s, [2]) for s in ids])
    for s in ids:
        sh.remove(s)
    sh.clear()
    st = sh.check_stats("empty")
    assert st["chunks_in_use"] == 0 and st["chunks_cached"] == 0 and st["chunks_shared"] == 0, st
    assert st["chunks_free"] == 300 and st["tokens_cached"] == 0 and st["sequences"] == 0, st
    assert st["peak_chunks"] > 0
    # the pool is reusable from scratch, and nothing of the old prefix is found
    s, n = sh.add(base)
    assert n == 0
    sh.run_step([(s, 100)])


def test_capacity_bytes_sets_the_slot_count(cv):
    probe = cv.KVCache(cv.CacheConfig(layers=3, q_heads=8, kv_heads=2, head_dim=96, chunk_size=32,
                                      dtype="float16", capacity_chunks=4))
    bpc = probe.stats()["bytes_per_chunk"]
    assert bpc == 3 * 2 * 2 * 32 * 96 * 2
    c = cv.KVCache(cv.CacheConfig(layers=3, q_heads=8, kv_heads=2, head_dim=96, chunk_size=32,
                                  dtype="float16", capacity_chunks=None, capacity_bytes=10 * bpc + bpc // 2))
    st = c.stats()
    assert st["capacity_chunks"] == 10 and st["chunks_free"] == 10, st


def test_lazy_plan_refresh_counters(cv, seed):
    rng = np.random.default_rng(seed)
    C = 16
    sh = _shadow(cv, seed, chunk_size=C)
    ids = []
    for _ in range(3):
        s, _ = sh.add(_fresh(rng, C + 2))  # lengths 18: 13 more decode tokens fit in the chunk
        ids.append(s)
    sh.run_step([(s, C + 2) for s in ids])

    def counters():
        st = sh.cache.stats()
        return st["plan_rebuilds"], st["plan_reuses"]

    def eff_len(s):
        return sh.seqs[s].length + sh.seqs[s].reserved

    sh.run_step([(s, [1]) for s in ids])  # batch changed (prefill -> decode): rebuild
    r0, u0 = counters()
    deltas = []
    for i in range(5):  # same batch, same order, no chunk boundary crossed: reuse
        sh.run_step([(s, [i]) for s in ids])
        r, u = counters()
        assert r == r0, f"decode step {i} inside the chunks rebuilt the plan ({r0}->{r})"
        deltas.append(u - u0)
        r0, u0 = r, u
    # one reuse per step (or per layer of the step): the same positive count every time
    assert deltas[0] > 0 and len(set(deltas)) == 1, deltas
    r0, u0 = counters()
    sh.run_step([(s, [7]) for s in ids[:2]])  # batch shrank: rebuild
    r, u = counters()
    assert r > r0 and u == u0, (r0, u0, r, u)
    sh.run_step([(s, [7]) for s in ids[:2]])
    r1, u1 = counters()
    assert r1 == r and u1 > u
    sh.run_step([(s, [7]) for s in reversed(ids[:2])])  # other order: the packing changed
    r2, u2 = counters()
    assert r2 > r1 and u2 == u1
    # walk ids[0] to a chunk boundary; the step whose token opens a new chunk rebuilds
    while eff_len(ids[0]) % C != 0:
        sh.run_step([(s, [3]) for s in reversed(ids[:2])])
    r3, u3 = counters()
    sh.run_step([(s, [3]) for s in reversed(ids[:2])])  # ids[0]'s token opens a new chunk
    r4, u4 = counters()
    assert r4 > r3, f"a step that opens a new chunk reused the old plan ({r3}->{r4}, {u3}->{u4})"
    # whatever a fork / remove elsewhere in the tree does to the counters, attention stays exact
    sh.fork(ids[2], 1)
    sh.run_step([(s, [3]) for s in reversed(ids[:2])])
    sh.remove(ids[2])
    sh.run_step([(s, [3]) for s in reversed(ids[:2])])
    sh.run_step([(s, [3]) for s in reversed(ids[:2])])
