"""The host tier of recallable eviction: a bounded number of device chunks per evicting
layer, every filled chunk backed up to host memory (or a spill file), unselected chunks
evicted and selected ones recalled.

Two oracles: the float64 reference over the chunks the documented policy selects
(test_eviction's, recomputing digests from the appended keys), and a cache with the same
selection that keeps every chunk resident — the host tier must not change a single bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_eviction import HKV, HQ, C, D, L, Run, _check_layer

BUDGET, TOPK, DENSE = 96, 3, 1
EVICTING = L - DENSE
BLOCK = 2 * HKV * C * D * 4  # one chunk of one layer (K and V, every KV head), float32


def _cfg(cv, *, device_chunks=None, host_bytes=None, spill_path=None, budget=BUDGET, topk=TOPK,
         capacity=256, eviction=True):
    ev = None
    if eviction:
        # Shared selection everywhere: the host tier's (its default), so a resident cache compares.
        ev = cv.Eviction(budget_tokens=budget, sink_chunks=1, window_chunks=2, topk_chunks=topk,
                         dense_layers=DENSE, device_chunks=device_chunks, host_bytes=host_bytes,
                         spill_path=spill_path, selection="shared")
    return cv.CacheConfig(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C,
                          capacity_chunks=capacity, eviction=ev)


_tokens = iter(range(100_000, 10**9))


def _prompt(n):
    """Tokens no other prompt has: sequences share only what a test makes them share."""
    return [next(_tokens) for _ in range(n)]


def _same_outputs(outs):
    for other in outs[1:]:
        for layer in range(L):
            np.testing.assert_array_equal(other[layer], outs[0][layer], err_msg=f"layer {layer}")


def _decode(run, seqs, rng):
    return run.step([(s, [int(rng.integers(0, 1000))]) for s in seqs], scale_q=2.0)


def _check_tiles(cache, run, seq):
    """Every full chunk of seq reads back exactly as appended, from whichever tier holds it.
    Returns the residencies seen."""
    seen = set()
    slots = cache.sequence_slots(seq)
    for layer in range(L):
        K, V = run.kv[seq][layer]
        for c in range(K.shape[0] // C):
            seen.add(cache.chunk_residency(layer, slots[c]))
            for h in range(HKV):
                np.testing.assert_array_equal(cache.read_tile(layer, slots[c], 0, h), K[c * C:(c + 1) * C, h])
                np.testing.assert_array_equal(cache.read_tile(layer, slots[c], 1, h), V[c * C:(c + 1) * C, h])
    return seen


def _check_host_accounting(cache, live):
    """Every full chunk in use has exactly one host copy per evicting layer; partial chunks none."""
    st = cache.stats()
    partial = sum(cache.sequence_length(s) % C != 0 for s in live)
    held = st["evict_host_bytes_in_use"] + st["evict_spill_bytes_in_use"]
    assert held == BLOCK * EVICTING * (st["chunks_in_use"] - partial), st
    assert st["evict_device_slots_in_use"] <= EVICTING * st["evict_device_chunks"]


def test_budget_covering_the_context_is_bit_identical_to_no_eviction(cv, seed):
    """Within budget every chunk is attended, so each decode step needs all of its
    sequence's chunks: alternating sequences evict each other and recall everything."""
    rng = np.random.default_rng(seed)
    full = cv.KVCache(_cfg(cv, eviction=False))
    host = cv.KVCache(_cfg(cv, budget=4096, device_chunks=22))
    run = Run(cv, rng, [host, full])
    a, _ = run.add(_prompt(200))  # 13 chunks
    b, _ = run.add(_prompt(150))  # 10 chunks
    for seq, n in ((a, 200), (b, 150)):
        _, _, outs = run.step([(seq, n)])
        _same_outputs(outs)
    for t in range(12):
        _, _, outs = _decode(run, [a if t % 2 else b], rng)
        _same_outputs(outs)
    st = host.stats()
    assert st["evict_dropped_chunks"] == 0
    assert st["evict_recalls"] > 0 and st["evict_evictions"] > 0
    assert st["evict_bytes_from_host"] == st["evict_recalls"] * BLOCK
    for s in (a, b):
        _check_tiles(host, run, s)


def test_small_device_budget_matches_reference_over_random_trees(cv, seed):
    rng = np.random.default_rng(seed)
    host = cv.KVCache(_cfg(cv, device_chunks=28))
    resident = cv.KVCache(_cfg(cv))  # same selection, nothing leaves the device
    run = Run(cv, rng, [host, resident])
    prefix = [int(t) for t in rng.integers(0, 1000, 40)]
    fresh = iter(range(10_000, 10**9))  # unique suffix tokens: no accidental prefix matches
    live, first = [], None
    refused = chunk_first = 0

    def add():
        nonlocal first
        shared = first is not None and rng.random() < 0.6
        body = [next(fresh) for _ in range(int(rng.integers(30, 90)))]
        tokens = prefix + body if shared or first is None else body
        seq, cached = run.add(tokens, share_from=first)
        if first is None:
            first = seq
        assert cached <= len(prefix)
        _, _, outs = run.step([(seq, len(tokens) - cached)])
        _same_outputs(outs)
        live.append(seq)

    add()
    for _ in range(200):
        r = rng.random()
        if len(live) < 6 and r < 0.2:
            add()
        elif r < 0.28 and len(live) < 6:
            parent = live[int(rng.integers(len(live)))]
            kids = [c.fork(parent, 1) for c in run.caches]
            assert kids[0] == kids[1]
            run.kv[kids[0][0]] = [(k.copy(), v.copy()) for k, v in run.kv[parent]]
            live.append(kids[0][0])
        elif r < 0.36 and len(live) > 1:
            gone = live.pop(int(rng.integers(len(live))))
            for c in run.caches:
                c.remove(gone)  # run.kv keeps its K/V: cached prefix chunks still hold them
        else:
            batch = list(rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False))
            before = host.stats()
            try:
                st, qs, outs = _decode(run, [int(s) for s in batch], rng)
            except cv.CapacityError as e:  # the step does not fit the device budget
                assert "device_chunks" in str(e)
                assert host.stats() == before  # nothing changed
                refused += 1
                continue
            _same_outputs(outs)
            chunk_first += host.stats()["chunk_first_units"]
            for layer in range(L):
                _check_layer(run, st, qs[layer], outs[0][layer], layer, "cuboid_max", BUDGET, TOPK, DENSE, selection="shared")
        _check_host_accounting(host, live)
    for s in live:
        _check_tiles(host, run, s)
    st = host.stats()
    assert st["evict_recalls"] > 0 and st["evict_evictions"] > 0, st
    assert chunk_first > 0  # shared prefix chunks of a batch ran once for all their rows
    assert refused < 60, refused


def _planted_key_cache(cv, seed, device_chunks):
    """A random planted-key position and unit direction, and a host-tier cache of
    `device_chunks` device slots per layer (budget 96 tokens, top-2)."""
    rng = np.random.default_rng(seed)
    where = int(rng.integers(3 * C, 20 * C))
    direction = rng.standard_normal(D)
    direction /= np.linalg.norm(direction)
    cache = cv.KVCache(cv.CacheConfig(
        layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C, capacity_chunks=128,
        eviction=cv.Eviction(budget_tokens=96, topk_chunks=2, dense_layers=0, device_chunks=device_chunks)))
    return rng, where, direction, cache


def test_planted_key_is_recalled_after_eviction(cv, seed):
    rng, where, direction, cache = _planted_key_cache(cv, seed, device_chunks=28)
    planted = {}
    s1, _ = cache.add_sequence(list(range(400)))
    st = cache.plan([(s1, 400)])
    for layer in range(L):
        K = (0.1 * rng.standard_normal((400, HKV, D))).astype(np.float32)
        V = rng.standard_normal((400, HKV, D)).astype(np.float32)
        K[where] = 12 * direction
        V[where] = 7.0
        planted[layer] = K[where // C * C:(where // C + 1) * C]
        cache.append(layer, st, K, V)
        cache.attention(layer, st, np.zeros((400, HQ, D), np.float32))
    # A second long prompt takes the device slots. The zero prefill queries score every chunk
    # alike (ties go to later chunks), so the planted one is among the first evicted.
    s2, _ = cache.add_sequence(list(range(1000, 1400)))
    st = cache.plan([(s2, 400)])
    for layer in range(L):
        x = (0.1 * rng.standard_normal((400, HKV, D))).astype(np.float32)
        cache.append(layer, st, x, x)
        cache.attention(layer, st, np.zeros((400, HQ, D), np.float32))
    chunk = cache.sequence_slots(s1)[where // C]
    for layer in range(L):
        assert cache.chunk_residency(layer, chunk) == "host"
    recalls = cache.stats()["evict_recalls"]
    st = cache.plan([(s1, [1])])
    for layer in range(L):
        q = np.tile(8.0 * direction, (1, HQ, 1)).astype(np.float32)
        k = np.zeros((1, HKV, D), np.float32)
        cache.append(layer, st, k, k)
        out = cache.attention(layer, st, q)
        assert np.all(out > 6.0), (layer, where, out.min())
        assert cache.chunk_residency(layer, chunk) == "device+host"
        for h in range(HKV):  # the recalled tile is the one that was backed up
            np.testing.assert_array_equal(cache.read_tile(layer, chunk, 0, h), planted[layer][:, h])
    assert cache.stats()["evict_recalls"] > recalls


def _alternating_workload(cv, rng, host, n_steps=10):
    """Long prompts prefilled back to back, then decode steps alternating between them:
    each step needs chunks the previous one evicted."""
    resident = cv.KVCache(_cfg(cv))
    run = Run(cv, rng, [host, resident])
    seqs = []
    for n in (150, 120, 90):
        s, _ = run.add(_prompt(n))
        _, _, outs = run.step([(s, n)])
        _same_outputs(outs)
        seqs.append(s)
    for t in range(n_steps):
        st, qs, outs = _decode(run, [seqs[t % 3], seqs[(t + 1) % 3]], rng)
        _same_outputs(outs)
        for layer in range(L):
            _check_layer(run, st, qs[layer], outs[0][layer], layer, "cuboid_max", BUDGET, TOPK, DENSE, selection="shared")
    return run, seqs


def test_slow_backups_never_let_a_slot_be_reused_early(cv, seed):
    """With every backup delayed (test-only hook), slots filled a moment ago are evicted or
    freed while their backups are still queued: the cache must wait, or a recall would bring
    back the slot's next contents and the outputs would differ."""
    rng = np.random.default_rng(seed)
    host = cv.KVCache(_cfg(cv, device_chunks=14), test_hooks={"backup_delay_us": 2000})
    run, seqs = _alternating_workload(cv, rng, host, n_steps=6)
    for s in seqs:
        _check_tiles(host, run, s)
    # Freeing chunks whose backups are queued must wait too.
    s, _ = run.add(_prompt(64))
    run.step([(s, 64)])
    for c in run.caches:
        c.remove(s)
    host.clear()
    st = host.stats()
    assert st["evict_backup_waits"] > 0, st
    assert st["evict_recalls"] > 0
    _check_host_accounting(host, seqs)


def test_spill_file_takes_what_host_memory_cannot(cv, seed, tmp_path):
    rng = np.random.default_rng(seed)
    path = tmp_path / "spill.bin"
    host = cv.KVCache(_cfg(cv, device_chunks=14, host_bytes=6 * BLOCK, spill_path=path))  # os.PathLike works
    assert path.exists()
    run, seqs = _alternating_workload(cv, rng, host)
    st = host.stats()
    assert st["evict_host_bytes_in_use"] == 6 * BLOCK
    assert st["evict_spill_bytes_in_use"] > 0 and st["evict_recalls"] > 0
    seen = set()
    for s in seqs:  # host copies, in memory and in the file, read back exactly
        seen |= _check_tiles(host, run, s)
    assert "host" in seen
    assert path.stat().st_size > 0
    _check_host_accounting(host, seqs)
    for s in seqs:
        host.remove(s)
    host.clear()
    st = host.stats()
    assert st["evict_host_bytes_in_use"] == 0 and st["evict_spill_bytes_in_use"] == 0
    assert st["evict_device_slots_in_use"] == 0
    run.caches.clear()
    del host
    import gc
    gc.collect()
    assert not path.exists()  # scratch space of that cache only


def test_bad_spill_path_names_the_argument(cv, tmp_path):
    with pytest.raises(ValueError, match=r"eviction\.spill_path: expected a file .*missing"):
        cv.KVCache(_cfg(cv, device_chunks=14, host_bytes=4 * BLOCK, spill_path=str(tmp_path / "missing" / "f")))
    with pytest.raises(ValueError, match=r"eviction\.spill_path: expected host_bytes"):
        cv.KVCache(_cfg(cv, device_chunks=14, spill_path=str(tmp_path / "f")))
    with pytest.raises(TypeError, match=r"eviction\.spill_path"):
        cv.KVCache(_cfg(cv, device_chunks=14, host_bytes=4 * BLOCK, spill_path=3))


def test_full_host_tier_without_spill_raises_and_leaves_the_cache_unchanged(cv, seed):
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, device_chunks=14, host_bytes=10 * BLOCK))
    run = Run(cv, rng, [cache])
    a, _ = run.add(_prompt(64))
    run.step([(a, 64)])  # 4 chunks x 2 evicting layers = 8 blocks
    b, _ = run.add(_prompt(48))
    before = cache.stats()
    with pytest.raises(cv.CapacityError, match=r"eviction\.host_bytes=.*room for 2"):
        cache.plan([(b, 48)])  # 3 more chunks: 6 blocks
    assert cache.stats() == before
    assert cache.sequence_length(b) == 0
    run.step([(b, 16)])  # what fits still works
    for c in run.caches:
        c.remove(a)  # a's chunks become cached prefix, reclaimed for host space
    run.step([(b, 32)])
    _check_tiles(cache, run, b)
    _check_host_accounting(cache, [b])


def test_step_beyond_the_device_budget_raises_and_leaves_the_cache_unchanged(cv, seed):
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, device_chunks=8))
    run = Run(cv, rng, [cache])
    a, _ = run.add(_prompt(200))
    before = cache.stats()
    with pytest.raises(cv.CapacityError, match=r"needs up to 13 chunks .*eviction\.device_chunks=8"):
        cache.plan([(a, 200)])  # prefill attends to all 13 chunks at once
    assert cache.stats() == before
    run.step([(a, 100)])  # 7 chunks fit
    assert cache.sequence_length(a) == 100


def test_bad_host_tier_config_is_rejected(cv):
    with pytest.raises(ValueError, match=r"eviction\.device_chunks: expected .*at least .* = 6 .*got 5"):
        cv.KVCache(_cfg(cv, device_chunks=5))  # below sinks + window + top-k
    with pytest.raises(ValueError, match=r"eviction\.device_chunks: expected None or an integer >= 1, got 0"):
        cv.KVCache(_cfg(cv, device_chunks=0))
    with pytest.raises(TypeError, match=r"eviction\.device_chunks: expected an int or None, got str"):
        cv.KVCache(_cfg(cv, device_chunks="8"))
    with pytest.raises(ValueError, match=r"eviction\.host_bytes: expected .*at least one chunk .*got 100"):
        cv.KVCache(_cfg(cv, device_chunks=8, host_bytes=100))
    with pytest.raises(ValueError, match=r"host_bytes/spill_path: expected device_chunks"):
        cv.KVCache(_cfg(cv, host_bytes=1 << 20))


def test_shared_chunks_keep_their_host_copies_until_freed(cv, seed):
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, device_chunks=16))
    run = Run(cv, rng, [cache])
    prompt = _prompt(64)
    a, _ = run.add(prompt + [1] * 8)
    run.step([(a, 72)])
    b, cached = run.add(prompt + [2] * 8, share_from=a)
    assert cached == 64
    run.step([(b, 8)])
    held = cache.stats()["evict_host_bytes_in_use"]
    assert held == 4 * EVICTING * BLOCK  # the 4 shared chunks, backed up once
    for c in run.caches:
        c.remove(a)
    assert cache.stats()["evict_host_bytes_in_use"] == held  # b still uses them
    for c in run.caches:
        c.remove(b)
    assert cache.stats()["evict_host_bytes_in_use"] == held  # cached prefix keeps them (LRU)
    c2, cached = run.add(prompt, share_from=a)
    assert cached == 64
    cache.remove(c2)
    cache.clear()
    st = cache.stats()
    assert st["evict_host_bytes_in_use"] == 0 and st["evict_device_slots_in_use"] == 0


def test_partial_chunks_that_cannot_leave_the_device_are_counted(cv, seed):
    """A partial chunk has no host copy, so every live sequence's partial chunk holds a device
    slot in each evicting layer: plan and fork refuse beyond device_chunks, cache unchanged."""
    rng = np.random.default_rng(seed)
    cache = cv.KVCache(_cfg(cv, device_chunks=6))
    run = Run(cv, rng, [cache])
    seqs = []
    for _ in range(6):
        s, _ = run.add(_prompt(8))
        run.step([(s, 8)])
        seqs.append(s)
    s7, _ = run.add(_prompt(8))
    before = cache.stats()
    with pytest.raises(cv.CapacityError, match=r"needs up to 7 chunks .*device_chunks=6"):
        cache.plan([(s7, 8)])
    with pytest.raises(cv.CapacityError, match=r"fork: needs 8 device chunks .*device_chunks=6"):
        cache.fork(seqs[0], 1)
    assert cache.stats() == before
    cache.remove(seqs[0])
    run.step([(s7, 8)])  # room again
    for s in seqs[1:] + [s7]:
        _check_tiles(cache, run, s)


def test_chunk_residency_names_bad_arguments(cv):
    cache = cv.KVCache(_cfg(cv, device_chunks=8))
    s, _ = cache.add_sequence(_prompt(16))
    st = cache.plan([(s, 16)])
    for layer in range(L):
        x = np.ones((16, HKV, D), np.float32)
        cache.append(layer, st, x, x)
    chunk = cache.sequence_slots(s)[0]
    assert cache.chunk_residency(0, chunk) == "device"  # a dense layer: always resident
    assert cache.chunk_residency(1, chunk) == "device+host"
    assert cache.chunk_residency(1, chunk + 1) == "none"
    with pytest.raises(ValueError, match=r"^layer: expected a layer in 0\.\.2, got 3$"):
        cache.chunk_residency(3, 0)
    with pytest.raises(ValueError, match=r"^slot: expected a chunk id in 0\.\.255, got 256$"):
        cache.chunk_residency(0, 256)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_recalls_are_bit_identical(cv, seed, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    tdt = getattr(torch, dtype)

    def cfg(device_chunks):
        return cv.CacheConfig(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C, dtype=dtype,
                              capacity_chunks=64, eviction=cv.Eviction(
                                  budget_tokens=BUDGET, topk_chunks=TOPK, dense_layers=DENSE,
                                  device_chunks=device_chunks, selection="shared"))  # the host tier's

    caches = [cv.KVCache(cfg(8)), cv.KVCache(cfg(None))]
    seqs = [[c.add_sequence(_p)[0] for c in caches] for _p in (_prompt(100), _prompt(90))]
    assert all(a == b for a, b in seqs)
    seqs = [a for a, _ in seqs]
    for s, n in zip(seqs, (100, 90)):
        steps = [c.plan([(s, n)]) for c in caches]
        for layer in range(L):
            k, v = (torch.from_numpy(rng.standard_normal((n, HKV, D))).to(tdt) for _ in range(2))
            for c, st in zip(caches, steps):
                c.append(layer, st, k, v)
    for t in range(40):  # alternate: each step recalls what the other evicted
        s = seqs[t % 2]
        steps = [c.plan([(s, [7])]) for c in caches]
        for layer in range(L):
            k, v = (torch.from_numpy(rng.standard_normal((1, HKV, D))).to(tdt) for _ in range(2))
            q = torch.from_numpy(2 * rng.standard_normal((1, HQ, D))).to(tdt)
            outs = []
            for c, st in zip(caches, steps):
                c.append(layer, st, k, v)
                outs.append(c.attention(layer, st, q))
            assert torch.equal(outs[0], outs[1]), (t, layer)
    assert caches[0].stats()["evict_recalls"] > 0
    assert caches[0].stats()["evict_bytes_to_host"] % (2 * HKV * C * D * 2) == 0  # 2-byte blocks


def test_after_prefill_the_chunks_the_last_prompt_token_scores_highest_stay(cv, seed):
    """Prefill attends to everything; when its slots are needed afterwards, an over-budget
    sequence gives up first the chunks its last prompt token does not select."""
    rng, where, direction, cache = _planted_key_cache(cv, seed, device_chunks=30)
    s1, _ = cache.add_sequence(_prompt(400))  # 25 full chunks: 1 sink + 2 window + 22 candidates
    st = cache.plan([(s1, 400)])
    for layer in range(L):
        K = (0.1 * rng.standard_normal((400, HKV, D))).astype(np.float32)
        K[where] = 12 * direction
        cache.append(layer, st, K, K)
        q = np.zeros((400, HQ, D), np.float32)
        q[-1] = 8.0 * direction  # the last prompt token looks for the planted key
        cache.attention(layer, st, q)
    # 25 more chunks need the device: 5 slots are free, 20 must be evicted.
    s2, _ = cache.add_sequence(_prompt(400))
    st = cache.plan([(s2, 400)])
    for layer in range(L):
        x = (0.1 * rng.standard_normal((400, HKV, D))).astype(np.float32)
        cache.append(layer, st, x, x)
    slots = cache.sequence_slots(s1)
    for layer in range(L):
        kept = [c for c in range(25) if cache.chunk_residency(layer, slots[c]) == "device+host"]
        assert len(kept) == 5, (layer, kept)
        assert kept[:1] == [0] and kept[-2:] == [23, 24]  # sink and window
        assert where // C in kept, (layer, where // C, kept)  # the planted key's chunk
    assert cache.stats()["evict_evictions"] == 20 * L
