"""GPU tests of recallable eviction on the CUDA backend: digests and scoring on the device,
the host tier on a copy stream into pinned memory.

Oracles: the float64 reference over the chunks the documented policy selects (digests
recomputed from the stored keys, tests/reference.py), a CUDA cache without eviction (a budget
covering the context changes no bit), a CUDA cache with the same budget that keeps every chunk
resident (the host tier changes no bit), and the CPU backend on the same inputs. Every test
skips without a usable GPU; tests/cpp/cuda/test_digest_emulation.cpp checks the kernels without one.
"""

from __future__ import annotations

import numpy as np
import pytest

import chunkvale

from reference import attention_reference, digest_reference, kept_attention_reference, kept_chunks_reference

torch = pytest.importorskip("torch")

HAVE_GPU = chunkvale.cuda_available() and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a usable GPU")

TDTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REL_TOL = {"float16": 4e-3, "bfloat16": 1.6e-2, "float32": 1e-4}  # ||out - ref|| / ||ref||
SHAPES = [(4, 2, 64, 16), (32, 8, 128, 64), (8, 1, 128, 32)]  # q_heads, kv_heads, head_dim, chunk
LAYERS, SINK, WINDOW = 3, 1, 2


def _cfg(shape, dtype, *, device="cuda", budget=None, topk=3, digest="cuboid_max", dense_layers=1,
         device_chunks=None, host_bytes=None, spill_path=None, capacity=512, selection=None):
    hq, hkv, d, c = shape
    ev = None
    if budget is not None:
        ev = chunkvale.Eviction(budget_tokens=budget, sink_chunks=SINK, window_chunks=WINDOW, topk_chunks=topk,
                                digest=digest, dense_layers=dense_layers, device_chunks=device_chunks,
                                host_bytes=host_bytes, spill_path=spill_path, selection=selection)
    return chunkvale.CacheConfig(layers=LAYERS, q_heads=hq, kv_heads=hkv, head_dim=d, chunk_size=c, dtype=dtype,
                                 capacity_chunks=capacity, device=device, eviction=ev)


class Run:
    """Drives caches (CUDA or CPU) through the same steps with the same inputs; keeps every
    sequence's K/V as stored (rounded to the dtype), in float64."""

    def __init__(self, rng, caches, shape, dtype):
        self.rng, self.caches, self.dtype = rng, caches, dtype
        self.hq, self.hkv, self.d, self.c = shape
        self.kv = {}

    def _dev(self, cache):
        return "cuda" if cache.config.device == "cuda" else "cpu"

    def add(self, tokens, share_from=None):
        ids = [c.add_sequence(tokens) for c in self.caches]
        assert all(i == ids[0] for i in ids), ids
        seq, cached = ids[0]
        if cached:
            self.kv[seq] = [(k[:cached].copy(), v[:cached].copy()) for k, v in self.kv[share_from]]
        else:
            self.kv[seq] = [(np.zeros((0, self.hkv, self.d)),) * 2 for _ in range(LAYERS)]
        return seq, cached

    def fork(self, parent):
        kids = [c.fork(parent, 1) for c in self.caches]
        assert all(k == kids[0] for k in kids)
        self.kv[kids[0][0]] = [(k.copy(), v.copy()) for k, v in self.kv[parent]]
        return kids[0][0]

    def step(self, entries, scale_q=2.0, plant=None):
        steps = [c.plan(entries) for c in self.caches]
        st = steps[0]
        dt = TDTYPE[self.dtype]
        outs, qs = [[] for _ in self.caches], []
        for layer in range(LAYERS):
            k = torch.from_numpy(self.rng.standard_normal((st.num_tokens, self.hkv, self.d))).to(dt)
            v = torch.from_numpy(self.rng.standard_normal((st.num_tokens, self.hkv, self.d))).to(dt)
            q = torch.from_numpy(self.rng.standard_normal((st.num_tokens, self.hq, self.d)) * scale_q).to(dt)
            if plant is not None:
                q = plant(layer, q)
            qs.append(q.double().numpy())
            k64, v64 = k.double().numpy(), v.double().numpy()
            for i, seq in enumerate(st.seq_ids):
                r0, r1 = st.row_offsets[i], st.row_offsets[i + 1]
                K, V = self.kv[seq][layer]
                self.kv[seq][layer] = (np.concatenate([K, k64[r0:r1]]), np.concatenate([V, v64[r0:r1]]))
            for c, s, o in zip(self.caches, steps, outs):
                dev = self._dev(c)
                c.append(layer, s, k.to(dev), v.to(dev))
                poisoned = torch.full_like(q, float("nan"), device=dev)
                o.append(c.attention(layer, s, q.to(dev), out=poisoned).cpu())
        for s in steps:
            s.commit()
        return st, qs, outs

    def decode(self, seqs):
        return self.step([(s, [int(self.rng.integers(0, 1000))]) for s in seqs])

    def check(self, st, qs, out, kind, budget, topk, dense_layers=1, *, selection):
        """Every row against the float64 reference (selection: the cache's, resolved); returns the
        decode rows whose KV heads kept different chunks."""
        apart = 0
        for layer in range(LAYERS):
            got_all = out[layer].double().numpy()
            assert np.isfinite(got_all).all(), f"layer {layer}: unwritten (NaN) outputs"
            for i, seq in enumerate(st.seq_ids):
                r0, r1 = st.row_offsets[i], st.row_offsets[i + 1]
                K, V = self.kv[seq][layer]
                total = K.shape[0]
                q = qs[layer][r0:r1]
                if r1 - r0 != 1 or layer < dense_layers:
                    want, _ = attention_reference(q, K, V, total - (r1 - r0))
                else:
                    keep = kept_chunks_reference(K, q[0], total, kind, budget, topk, chunk=self.c, sink=SINK,
                                                 window=WINDOW, selection=selection)
                    keep = keep if selection == "per_kv_head" and topk else [keep] * self.hkv
                    apart += any(k != keep[0] for k in keep)
                    want, _ = kept_attention_reference(q, K, V, keep, self.c)
                got = got_all[r0:r1]
                rel = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert rel < REL_TOL[self.dtype], f"layer {layer} seq {seq} total {total}: relative error {rel:.3g}"
        return apart


def _same(outs):
    for other in outs[1:]:
        for layer in range(LAYERS):
            assert torch.equal(other[layer], outs[0][layer]), f"layer {layer} differs"


_fresh = iter(range(100_000, 10**9))


def _prompt(n):
    """Tokens no other prompt has: sequences share only what a test makes them share."""
    return [next(_fresh) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["cuboid_max", "cuboid_mean", "sphere"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-{}-d{}-c{}".format(*s))
def test_digests_summarise_the_stored_keys(seed, dtype, kind, shape):
    rng = np.random.default_rng(seed)
    c = shape[3]
    cache = chunkvale.KVCache(_cfg(shape, dtype, budget=4 * c, digest=kind))
    run = Run(rng, [cache], shape, dtype)
    n = 5 * c + c // 2
    a, _ = run.add(_prompt(n))
    run.step([(a, n)])
    slots = cache.sequence_slots(a)
    for layer in range(LAYERS):
        K = run.kv[a][layer][0]
        for ch in range(n // c):  # full chunks only
            for h in range(shape[1]):
                keys = K[ch * c:(ch + 1) * c, h]
                np.testing.assert_array_equal(cache.read_tile(layer, slots[ch], 0, h), keys)
                got = cache.read_digest(layer, slots[ch], h)
                d0, d1 = digest_reference(keys, kind)
                np.testing.assert_allclose(got[0], d0, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(got[1], d1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", [None, "shared"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["cuboid_max", "cuboid_mean", "sphere"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-{}-d{}-c{}".format(*s))
def test_budgeted_attention_equals_reference_over_selected_chunks(seed, dtype, kind, shape, selection):
    rng = np.random.default_rng(seed)
    c = shape[3]
    budget, topk = 6 * c, 3
    cfg = _cfg(shape, dtype, budget=budget, digest=kind, topk=topk, selection=selection)
    resolved = cfg.eviction.resolved_selection()
    cache = chunkvale.KVCache(cfg)
    run = Run(rng, [cache], shape, dtype)
    prefix = _prompt(7 * c + 5)
    a, _ = run.add(prefix + _prompt(2 * c + 3))
    run.step([(a, len(prefix) + 2 * c + 3)])
    b, cached = run.add(prefix + _prompt(c + 1), share_from=a)  # shares a's prefix
    assert cached == len(prefix)  # full chunks shared, the partial one copied
    d, _ = run.add(_prompt(3 * c))  # within budget: attends everything
    run.step([(b, len(prefix) + c + 1 - cached), (d, 3 * c)])
    apart = 0
    for _ in range(c + 4):  # across a chunk boundary; shared chunks still chunk-first
        st, qs, outs = run.decode([a, b, d])
        apart += run.check(st, qs, outs[0], kind, budget, topk, selection=resolved)
    assert (apart > 0) == (resolved == "per_kv_head" and shape[1] > 1)  # per-head choices checked
    stats = cache.stats()
    assert stats["evict_dropped_chunks"] > 0
    assert stats["evict_scored_chunks"] > stats["evict_dropped_chunks"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_budget_covering_the_context_changes_nothing(seed, dtype):
    rng = np.random.default_rng(seed)
    shape = SHAPES[1]
    full = chunkvale.KVCache(_cfg(shape, dtype))
    budgeted = chunkvale.KVCache(_cfg(shape, dtype, budget=1 << 20, topk=None))
    run = Run(rng, [full, budgeted], shape, dtype)
    a, _ = run.add(_prompt(300))
    b, _ = run.add(_prompt(70))
    _, _, outs = run.step([(a, 300), (b, 70)])
    _same(outs)
    for _ in range(5):
        _, _, outs = run.decode([a, b])
        _same(outs)
    assert budgeted.stats()["evict_dropped_chunks"] == 0


@pytest.mark.parametrize("kind", ["cuboid_max", "sphere"])
def test_cpu_and_gpu_backends_select_alike(seed, kind):
    """Same fp16 inputs, same policy: the CPU and CUDA backends attend the same chunks."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[1]
    c = shape[3]
    caches = [chunkvale.KVCache(_cfg(shape, "float16", device=dev, budget=6 * c, digest=kind)) for dev in ("cuda", "cpu")]
    run = Run(rng, caches, shape, "float16")
    seqs = []
    for n in (20 * c + 7, 12 * c, 9 * c + 30):
        s, _ = run.add(_prompt(n))
        run.step([(s, n)])
        seqs.append(s)
    for _ in range(6):
        st, qs, outs = run.decode(seqs)
        for layer in range(LAYERS):
            rel = (outs[0][layer].double() - outs[1][layer].double()).norm() / outs[1][layer].double().norm()
            assert rel < REL_TOL["float16"], f"layer {layer}: CPU and GPU differ by {rel:.3g}"
        run.check(st, qs, outs[0], kind, 6 * c, 3, selection="per_kv_head")
    gpu, cpu = (x.stats() for x in caches)
    assert gpu["evict_dropped_chunks"] == cpu["evict_dropped_chunks"] > 0


def _host_tier_workload(rng, run, live, prefix, steps, on_step=None):
    """Random adds (60% share `prefix`), forks, removals and decode batches; returns how many
    steps were refused for not fitting the device slots (the cache must then be unchanged)."""
    refused = 0
    first = live[0]
    for _ in range(steps):
        r = rng.random()
        if len(live) < 6 and r < 0.2:
            shared = rng.random() < 0.6
            tokens = (prefix if shared else []) + _prompt(int(rng.integers(2 * run.c, 6 * run.c)))
            s, cached = run.add(tokens, share_from=first)
            _, _, outs = run.step([(s, len(tokens) - cached)])
            _same(outs)
            live.append(s)
        elif r < 0.28 and len(live) < 6:
            live.append(run.fork(live[int(rng.integers(len(live)))]))
        elif r < 0.36 and len(live) > 2:
            gone = live.pop(int(rng.integers(1, len(live))))
            for c in run.caches:
                c.remove(gone)
        else:
            batch = [int(s) for s in rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False)]
            before = run.caches[0].stats()
            try:
                st, qs, outs = run.decode(batch)
            except chunkvale.CapacityError as e:
                assert "device_chunks" in str(e)
                assert run.caches[0].stats() == before
                refused += 1
                continue
            _same(outs)
            if on_step:
                on_step(st, qs, outs)
    return refused


def _check_tiles(cache, run, seq, layers):
    """Every full chunk reads back exactly as appended, from whichever tier holds it."""
    seen = set()
    slots = cache.sequence_slots(seq)
    for layer in layers:
        K, V = run.kv[seq][layer]
        for ch in range(K.shape[0] // run.c):
            seen.add(cache.chunk_residency(layer, slots[ch]))
            for h in range(run.hkv):
                np.testing.assert_array_equal(cache.read_tile(layer, slots[ch], 0, h), K[ch * run.c:(ch + 1) * run.c, h])
                np.testing.assert_array_equal(cache.read_tile(layer, slots[ch], 1, h), V[ch * run.c:(ch + 1) * run.c, h])
    return seen


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=lambda s: "h{}-{}-d{}-c{}".format(*s))
def test_host_tier_is_bit_identical_to_a_resident_cache(seed, dtype, shape, tmp_path):
    """Small device budget, pinned host memory, a spill file past host_bytes, and (every
    other seed) slow backups: nothing may differ from keeping every chunk on the device."""
    rng = np.random.default_rng(seed)
    c = shape[3]
    slow = seed % 2 == 0
    block = 2 * shape[1] * c * shape[2] * 2
    budget, topk = 6 * c, 3
    host = chunkvale.KVCache(_cfg(shape, dtype, budget=budget, topk=topk, device_chunks=20, host_bytes=40 * block,
                                  spill_path=str(tmp_path / "spill.bin")),
                             test_hooks={"backup_delay_us": 2000 if slow else 0})
    resident = chunkvale.KVCache(_cfg(shape, dtype, budget=budget, topk=topk, selection="shared"))  # the host's
    run = Run(rng, [host, resident], shape, dtype)
    prefix = _prompt(2 * c + c // 2)
    live = []
    for body in (3 * c, 8 * c + 1, 8 * c):  # 28 chunks: the later prompts push the first to the host
        s, cached = run.add(prefix + _prompt(body), share_from=live[0] if live else None)
        _, _, outs = run.step([(s, len(prefix) + body - cached)])
        _same(outs)
        live.append(s)
    assert "host" in set().union(*(_check_tiles(host, run, s, range(1, LAYERS)) for s in live))
    for t in range(6):  # alternating decode: each step needs chunks the previous one evicted
        _, _, outs = run.decode([live[t % 3], live[(t + 1) % 3]])
        _same(outs)

    def check(st, qs, outs):
        run.check(st, qs, outs[0], "cuboid_max", budget, topk, selection="shared")

    refused = _host_tier_workload(rng, run, live, prefix, 150, on_step=check)
    for s in live:
        _check_tiles(host, run, s, range(1, LAYERS))
    st = host.stats()
    assert st["evict_recalls"] > 0 and st["evict_evictions"] > 0, st
    assert st["evict_bytes_from_host"] == st["evict_recalls"] * block
    assert st["evict_spill_bytes_in_use"] > 0 or st["evict_host_bytes_in_use"] < 40 * block, st
    assert refused < 50, refused
    if slow:  # freeing chunks whose (delayed) backups are still queued must wait for them
        s, _ = host.add_sequence(_prompt(4 * c))
        step = host.plan([(s, 4 * c)])
        dev = "cuda" if host.config.device == "cuda" else "cpu"
        x = torch.randn((4 * c, shape[1], shape[2]), dtype=TDTYPE[dtype]).to(dev)
        for layer in range(LAYERS):
            host.append(layer, step, x, x)
        host.remove(s)
        host.clear()
        assert host.stats()["evict_backup_waits"] > st["evict_backup_waits"], host.stats()


def test_planted_key_is_recalled_from_the_host_tier(seed):
    """A key far along the query's direction, evicted to the host by a second prompt, is
    recalled bit for bit and decides every head's output."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[1]
    hq, hkv, d, c = shape
    n = 25 * c
    where = int(rng.integers(3 * c, 20 * c))
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    cache = chunkvale.KVCache(_cfg(shape, "float16", budget=8 * c, topk=2, dense_layers=0, device_chunks=28))

    def h16(x):
        return torch.tensor(x, dtype=torch.float16, device="cuda")

    planted = {}
    s1, _ = cache.add_sequence(list(range(n)))
    st = cache.plan([(s1, n)])
    for layer in range(LAYERS):
        k = 0.1 * rng.standard_normal((n, hkv, d))
        v = rng.standard_normal((n, hkv, d))
        k[where] = 12 * direction
        v[where] = 7.0
        kt = h16(k)
        planted[layer] = kt[where // c * c:(where // c + 1) * c].float().cpu().numpy()
        cache.append(layer, st, kt, h16(v))
        cache.attention(layer, st, h16(np.zeros((n, hq, d))))
    # A second prompt takes the device slots; zero queries score every chunk alike (ties go
    # to later chunks), so the planted chunk is among the first evicted.
    s2, _ = cache.add_sequence(list(range(10_000, 10_000 + n)))
    st = cache.plan([(s2, n)])
    for layer in range(LAYERS):
        x = h16(0.1 * rng.standard_normal((n, hkv, d)))
        cache.append(layer, st, x, x)
        cache.attention(layer, st, h16(np.zeros((n, hq, d))))
    chunk = cache.sequence_slots(s1)[where // c]
    assert all(cache.chunk_residency(layer, chunk) == "host" for layer in range(LAYERS))
    recalls = cache.stats()["evict_recalls"]
    st = cache.plan([(s1, [1])])
    for layer in range(LAYERS):
        zero = h16(np.zeros((1, hkv, d)))
        cache.append(layer, st, zero, zero)
        out = cache.attention(layer, st, h16(np.tile(8.0 * direction, (1, hq, 1))))
        assert bool((out > 6.0).all()), (layer, where, float(out.min()))
        assert cache.chunk_residency(layer, chunk) == "device+host"
        for h in range(hkv):  # the recalled tile is the one that was backed up
            np.testing.assert_array_equal(cache.read_tile(layer, chunk, 0, h), planted[layer][:, h])
    assert cache.stats()["evict_recalls"] > recalls


def test_graph_capture_with_eviction_is_refused_clearly(seed):
    shape = SHAPES[1]
    c = shape[3]
    cache = chunkvale.KVCache(_cfg(shape, "float16", budget=4 * c))
    s, _ = cache.add_sequence(_prompt(8 * c))
    st = cache.plan([(s, 8 * c)])
    x = torch.randn((8 * c, shape[1], shape[2]), dtype=torch.float16, device="cuda")
    q = torch.randn((8 * c, shape[0], shape[2]), dtype=torch.float16, device="cuda")
    for layer in range(LAYERS):
        cache.append(layer, st, x, x)
        cache.attention(layer, st, q)
    st = cache.plan([(s, [1])])
    one = x[:1].clone()
    cache.append(0, st, one, one)
    before = cache.stats()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="graph capture"):
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            cache.attention(0, st, q[:1].clone())
    assert cache.stats() == before


def test_engine_with_eviction_and_host_tier_on_the_gpu():
    """End to end on the GPU: a tiny random Llama in fp16 served by the Engine. One request at
    a time, so every engine runs the same steps: a budget covering every context gives the dense
    engine's tokens, and the host tier (chunks evicted to pinned memory and recalled) gives the
    tokens of the same budget with every chunk resident."""
    transformers = pytest.importorskip("transformers")
    from chunkvale.engine import Engine, Request

    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.2,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    gen = torch.Generator().manual_seed(3)

    def tokens(n):
        return torch.randint(0, 256, (n,), generator=gen).tolist()

    head = tokens(40)  # shared by three requests: later ones reuse (and recall) its chunks
    reqs = [Request(token_ids=head + tokens(n), max_new_tokens=40, ignore_eos=True) for n in (110, 75, 9)]
    reqs.append(Request(token_ids=tokens(150), max_new_tokens=40, ignore_eos=True))

    def serve(ev):
        eng = Engine(model, chunk_size=16, capacity_tokens=4096, max_batch_size=1, eviction=ev)
        assert eng.cache.config.device == "cuda"
        return [r.samples[0].token_ids for r in eng.generate(reqs, progress=False)], eng.cache.stats()

    dense, _ = serve(None)
    covered, st = serve(chunkvale.Eviction(budget_tokens=4096, dense_layers=1))
    assert covered == dense
    assert st["evict_dropped_chunks"] == 0
    # Shared: the host tier's selection, so the resident and tiered runs attend the same chunks.
    budget = dict(budget_tokens=64, sink_chunks=1, window_chunks=2, topk_chunks=2, dense_layers=1, selection="shared")
    resident, st = serve(chunkvale.Eviction(**budget))
    assert st["evict_dropped_chunks"] > 0
    tiered, st = serve(chunkvale.Eviction(**budget, device_chunks=14))
    assert tiered == resident
    assert st["evict_recalls"] > 0 and st["evict_evictions"] > 0, st
    assert st["evict_device_slots_in_use"] <= 14 * 2
