"""Budgeted attention (the compute half of recallable eviction) against a float64 reference.

The reference recomputes each chunk's digest from the keys it appended, scores the chunks
for the decode query exactly as documented (shared: bound per query head against its KV head's
digest, summed; per_kv_head, the default: each KV head its own top-k by the largest bound among
its query heads), keeps sinks + window + top-k, and attends densely to the kept tokens (per KV
head, each head's own).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import attention_reference, digest_reference, kept_attention_reference, kept_chunks_reference

L, HQ, HKV, D, C = 3, 4, 2, 64, 16


def _cfg(cv, *, budget=None, digest="cuboid_max", topk=3, dense_layers=1, share_threshold=2, selection=None):
    ev = None
    if budget is not None:
        ev = cv.Eviction(budget_tokens=budget, sink_chunks=1, window_chunks=2, topk_chunks=topk,
                         digest=digest, dense_layers=dense_layers, selection=selection)
    return cv.CacheConfig(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C,
                          capacity_chunks=256, eviction=ev, share_threshold=share_threshold)


def _digest(keys, kind):
    return digest_reference(keys, kind)


def _kept_chunks(K, q, total, kind, budget, topk, selection):
    """Chunk indices the documented policy attends for one decode row (q: [HQ, D]): one list
    per KV head (shared: the same list for each)."""
    kept = kept_chunks_reference(K, q, total, kind, budget, topk, chunk=C, sink=1, window=2, selection=selection)
    return kept if selection == "per_kv_head" and topk > 0 else [kept] * HKV


class Run:
    """Drives one or two caches through the same steps, keeping every sequence's K/V."""

    def __init__(self, cv, rng, caches):
        self.cv, self.rng, self.caches = cv, rng, caches
        self.kv = {}  # seq -> (K [L][n, HKV, D], V) as float32 arrays per layer

    def add(self, tokens, share_from=None):
        ids = [c.add_sequence(tokens) for c in self.caches]
        seq, cached = ids[0]
        assert all(i == ids[0] for i in ids)
        if cached:
            src = self.kv[share_from]
            self.kv[seq] = [(k[:cached].copy(), v[:cached].copy()) for k, v in src]
        else:
            self.kv[seq] = [(np.zeros((0, HKV, D), np.float32),) * 2 for _ in range(L)]
        return seq, cached

    def step(self, entries, scale_q=1.0, plant=None):
        steps = [c.plan(entries) for c in self.caches]
        st = steps[0]
        outs = [[] for _ in self.caches]
        qs = []
        for layer in range(L):
            k = self.rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
            v = self.rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
            q = (self.rng.standard_normal((st.num_tokens, HQ, D)) * scale_q).astype(np.float32)
            if plant is not None:
                q = plant(layer, q)
            qs.append(q)
            for i, seq in enumerate(st.seq_ids):
                r0, r1 = st.row_offsets[i], st.row_offsets[i + 1]
                K, V = self.kv[seq][layer]
                self.kv[seq][layer] = (np.concatenate([K, k[r0:r1]]), np.concatenate([V, v[r0:r1]]))
            for c, s, o in zip(self.caches, steps, outs):
                c.append(layer, s, k, v)
                poisoned = np.full_like(q, np.nan)
                o.append(c.attention(layer, s, q, out=poisoned))
        for s in steps:
            s.commit()
        return st, qs, outs


def _check_layer(run, st, q, out, layer, kind, budget, topk, dense_layers, *, selection):
    """Checks one layer's outputs against the reference; returns the decode rows whose KV heads
    kept different chunks (per_kv_head: the heads really chose apart)."""
    apart = 0
    for i, seq in enumerate(st.seq_ids):
        r0, r1 = st.row_offsets[i], st.row_offsets[i + 1]
        K, V = (x.astype(np.float64) for x in run.kv[seq][layer])
        total = K.shape[0]
        if r1 - r0 != 1 or layer < dense_layers:
            want, _ = attention_reference(q[r0:r1].astype(np.float64), K, V, total - (r1 - r0))
        else:
            keep = _kept_chunks(K, q[r0].astype(np.float64), total, kind, budget, topk, selection)
            apart += any(k != keep[0] for k in keep)
            want, _ = kept_attention_reference(q[r0:r1].astype(np.float64), K, V, keep, C)
        np.testing.assert_allclose(out[r0:r1], want, atol=2e-5, rtol=1e-4,
                                   err_msg=f"layer {layer} seq {seq} total {total}")
    return apart


@pytest.mark.parametrize("selection", [None, "shared"])
@pytest.mark.parametrize("kind", ["cuboid_max", "cuboid_mean", "sphere"])
def test_budgeted_attention_equals_reference_over_selected_chunks(cv, seed, kind, selection):
    rng = np.random.default_rng(seed)
    budget, topk = 96, 3
    cfg = _cfg(cv, budget=budget, digest=kind, topk=topk, selection=selection)
    resolved = cfg.eviction.resolved_selection()
    assert resolved == (selection or "per_kv_head")  # the default without a host tier
    cache = cv.KVCache(cfg)
    run = Run(cv, rng, [cache])
    prefix = list(rng.integers(0, 1000, 120))
    a, _ = run.add(prefix + [1] * 37)
    run.step([(a, 157)])
    b, cached = run.add(prefix + [2] * 20, share_from=a)  # shares a's first chunks
    assert cached == 120
    c, _ = run.add(list(rng.integers(1000, 2000, 60)))       # under budget: attends everything
    run.step([(b, 20), (c, 60), (a, [5])])
    apart = 0
    for t in range(20):  # decode across chunk boundaries; shared chunks still chunk-first
        st, qs, outs = run.step([(s, [int(rng.integers(0, 1000))]) for s in (a, b, c)], scale_q=2.0)
        for layer in range(L):
            apart += _check_layer(run, st, qs[layer], outs[0][layer], layer, kind, budget, topk, dense_layers=1,
                                  selection=resolved)
    assert (apart > 0) == (resolved == "per_kv_head")  # the heads' own choices were checked
    stats = cache.stats()
    assert stats["evict_dropped_chunks"] > 0
    assert stats["evict_scored_chunks"] > stats["evict_dropped_chunks"]


def test_prompt_tokens_planned_one_at_a_time_attend_to_everything(cv, seed):
    """Only decode rows (one explicit new token) select: a prompt prefilled one token per step
    is prefill, every row attends to the whole context even though the sequence is over budget."""
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, budget=96, topk=3))
    run = Run(cv, rng, [cache])
    a, _ = run.add(list(rng.integers(0, 1000, 200)))
    run.step([(a, 190)])
    for _ in range(10):  # the last 10 prompt tokens, one per step
        st, qs, outs = run.step([(a, 1)], scale_q=2.0)
        for layer in range(L):
            K, V = (x.astype(np.float64) for x in run.kv[a][layer])
            want, _ = attention_reference(qs[layer].astype(np.float64), K, V, K.shape[0] - 1)
            np.testing.assert_allclose(outs[0][layer], want, atol=2e-5, rtol=1e-4, err_msg=f"layer {layer}")
    assert cache.stats()["evict_dropped_chunks"] == 0
    st, qs, outs = run.step([(a, [5])], scale_q=2.0)  # the first decode step does select
    for layer in range(L):
        _check_layer(run, st, qs[layer], outs[0][layer], layer, "cuboid_max", 96, 3, dense_layers=1,
                     selection="per_kv_head")
    assert cache.stats()["evict_dropped_chunks"] > 0


def test_sink_and_window_only(cv, seed):
    """topk_chunks=0: the StreamingLLM-style baseline attends to sinks and the window alone."""
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, budget=96, topk=0))
    run = Run(cv, rng, [cache])
    a, _ = run.add(list(rng.integers(0, 1000, 150)))
    run.step([(a, 150)])
    for _ in range(3):
        st, qs, outs = run.step([(a, [7])])
        for layer in range(L):
            _check_layer(run, st, qs[layer], outs[0][layer], layer, "cuboid_max", 96, 0, dense_layers=1,
                         selection="per_kv_head")


def test_budget_covering_the_context_changes_nothing(cv, seed):
    rng = np.random.default_rng(seed)
    full = cv.KVCache(_cfg(cv))
    budgeted = cv.KVCache(_cfg(cv, budget=4096, topk=None))
    run = Run(cv, rng, [full, budgeted])
    a, _ = run.add(list(rng.integers(0, 1000, 300)))
    b, _ = run.add(list(rng.integers(1000, 2000, 70)))
    run.step([(a, 300), (b, 70)])
    for _ in range(5):
        _, _, outs = run.step([(a, [3]), (b, [4])])
        for layer in range(L):
            np.testing.assert_array_equal(outs[0][layer], outs[1][layer])
    assert budgeted.stats()["evict_dropped_chunks"] == 0


@pytest.mark.parametrize("kind", ["cuboid_max", "cuboid_mean", "sphere"])
def test_digests_summarise_the_stored_keys(cv, seed, kind):
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, budget=96, digest=kind))
    run = Run(cv, rng, [cache])
    a, _ = run.add(list(rng.integers(0, 1000, 70)))
    run.step([(a, 70)])
    slots = cache.sequence_slots(a)
    for layer in range(L):
        K = run.kv[a][layer][0].astype(np.float64)
        for c in range(70 // C):  # full chunks only
            for h in range(HKV):
                got = cache.read_digest(layer, slots[c], h)
                np.testing.assert_array_equal(cache.read_tile(layer, slots[c], 0, h), K[c * C:(c + 1) * C, h])
                d0, d1 = _digest(K[c * C:(c + 1) * C, h], kind)
                np.testing.assert_allclose(got[0], d0, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(got[1], d1, rtol=1e-5, atol=1e-5)


def test_planted_key_is_found_among_many_chunks(cv, seed):
    """A key far out along the query's direction, in the middle of a long context, decides
    the output even though most chunks are left out."""
    rng = np.random.default_rng(seed)
    where = int(rng.integers(3 * C, 20 * C))
    direction = rng.standard_normal(D)
    direction /= np.linalg.norm(direction)
    cache2 = cv.KVCache(_cfg(cv, budget=96, topk=2, dense_layers=0))
    s2, _ = cache2.add_sequence(list(range(400)))
    st = cache2.plan([(s2, 400)])
    for layer in range(L):  # small random keys, one planted far along `direction`
        K = (0.1 * rng.standard_normal((400, HKV, D))).astype(np.float32)
        V = rng.standard_normal((400, HKV, D)).astype(np.float32)
        K[where] = 12 * direction
        V[where] = 7.0
        cache2.append(layer, st, K, V)
        cache2.attention(layer, st, np.zeros((400, HQ, D), np.float32))
    st = cache2.plan([(s2, [1])])
    for layer in range(L):
        q = np.tile(8.0 * direction, (1, HQ, 1)).astype(np.float32)
        k = np.zeros((1, HKV, D), np.float32)
        cache2.append(layer, st, k, k)
        out = cache2.attention(layer, st, q)
        # Softmax mass sits on the planted key: its value (7) dominates every head's output.
        assert np.all(out > 6.0), (layer, where, out.min())
    assert cache2.stats()["evict_dropped_chunks"] > 0


def test_bad_eviction_config_is_rejected(cv):
    with pytest.raises(ValueError, match="eviction.budget_tokens"):
        cv.KVCache(_cfg(cv, budget=40, topk=None))  # below (sink + window + 1) chunks
    # Sinks + window + top-k whole chunks must fit the budget: (1 + 2 + 3) * 16 = 96 > 95.
    with pytest.raises(ValueError, match=r"eviction.topk_chunks: .*<= budget_tokens = 95.* = 96"):
        cv.KVCache(_cfg(cv, budget=95, topk=3))
    with pytest.raises(ValueError, match="eviction.topk_chunks"):
        cv.KVCache(_cfg(cv, budget=256, topk=2**31 - 1))
    with pytest.raises(ValueError, match="digest"):
        cv.KVCache(_cfg(cv, budget=96, digest="octahedron"))
    with pytest.raises(ValueError, match="host_bytes"):
        cv.KVCache(cv.CacheConfig(layers=1, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16,
                                  capacity_chunks=8, eviction=cv.Eviction(budget_tokens=96, host_bytes=1 << 20)))
    with pytest.raises(ValueError, match="eviction.topk_chunks"):
        cv.KVCache(_cfg(cv, budget=96, topk=-2))
    with pytest.raises(ValueError, match="digests are off|eviction"):
        cv.KVCache(_cfg(cv)).read_digest(0, 0, 0)
    with pytest.raises(ValueError, match="eviction.selection: expected 'per_kv_head', 'shared' or None, got 'row'"):
        cv.KVCache(_cfg(cv, budget=96, selection="row"))


def test_host_tier_selects_one_set_per_sequence(cv):
    """The host tier keeps one set of chunks per sequence on the device: the default resolves to
    shared there, and per_kv_head is refused naming the field (the cache is not made)."""
    def cfg(selection):
        return cv.CacheConfig(layers=1, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, capacity_chunks=32,
                              eviction=cv.Eviction(budget_tokens=96, device_chunks=16, selection=selection))
    assert cfg(None).eviction.resolved_selection() == "shared"
    cv.KVCache(cfg(None))
    cv.KVCache(cfg("shared"))
    with pytest.raises(ValueError, match=r"eviction.selection: expected 'shared' or 'auto' with the host tier"):
        cv.KVCache(cfg("per_kv_head"))
