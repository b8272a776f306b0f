"""GPU tests of the CUDA backend: random prefix trees, dtypes and head configurations against
a dense float64 reference, CPU-vs-GPU agreement on the same plan, lazy plan refresh over
many decode steps, non-default streams and CUDA-graph capture of a layer's attention.

Everything that needs a GPU skips where ``chunkvale.cuda_available()`` is False; the few
tests at the end run anywhere and check how a build without a usable GPU behaves.
"""
from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest

import chunkvale

torch = pytest.importorskip("torch")

HAVE_GPU = chunkvale.cuda_available() and torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a usable GPU")

TDTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# ||out - ref|| / ||ref|| bounds: output rounding plus P rounded to the storage type.
REL_TOL = {"float16": 4e-3, "bfloat16": 1.6e-2, "float32": 1e-4}
LSE_TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-4}


# ----------------------------------------------------------------------------------------
# a small driver: K/V are a function of (token prefix, layer), so K/V the cache reused from
# an earlier sequence are known to the test without having been stored by it
# ----------------------------------------------------------------------------------------


def _h(prev: int, tok: int) -> int:
    d = hashlib.blake2b(f"{prev}:{tok}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little")


class Driver:
    def __init__(self, cfg: chunkvale.CacheConfig, seed: int, device: str):
        self.cfg = cfg
        self.cache = chunkvale.KVCache(cfg)
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.hashes = {}   # seq -> prefix hashes of every token planned so far
        self.pending = {}  # seq -> pending prompt tokens
        self.kv = {}       # (hash, layer) -> float32 [2, kv_heads, D]

    def kv_of(self, h: int, layer: int) -> np.ndarray:
        key = (h, layer)
        if key not in self.kv:
            r = np.random.default_rng((h ^ (layer * 0x9E3779B97F4A7C15)) & (2**63 - 1))
            self.kv[key] = r.standard_normal((2, self.cfg.kv_heads, self.cfg.head_dim)).astype(np.float32)
        return self.kv[key]

    def add(self, tokens):
        seq, n_cached = self.cache.add_sequence(tokens)
        hs, h = [], 0
        for t in tokens:
            h = _h(h, t)
            hs.append(h)
        self.hashes[seq] = hs[:n_cached]
        self.pending[seq] = (tokens, n_cached, hs)
        return seq, n_cached

    def step(self, entries, check=True, q_scale=1.0):
        """entries: [(seq, n_new)] for prompt tokens or [(seq, [token])] for decode."""
        plan_entries = []
        for seq, what in entries:
            if isinstance(what, int):
                tokens, done, hs = self.pending[seq]
                self.hashes[seq] = self.hashes[seq] + hs[done:done + what]
                self.pending[seq] = (tokens, done + what, hs)
                plan_entries.append((seq, what))
            else:
                h = self.hashes[seq][-1] if self.hashes[seq] else 0
                self.hashes[seq] = self.hashes[seq] + [_h(h, what[0])]
                plan_entries.append((seq, list(what)))
        step = self.cache.plan(plan_entries)
        cfg, dt = self.cfg, TDTYPE[self.cfg.dtype]
        results = []
        for layer in range(cfg.layers):
            k = np.zeros((step.num_tokens, cfg.kv_heads, cfg.head_dim), np.float32)
            v = np.zeros_like(k)
            for i, seq in enumerate(step.seq_ids):
                r0, r1 = step.row_offsets[i], step.row_offsets[i + 1]
                hs = self.hashes[seq][len(self.hashes[seq]) - (r1 - r0):]
                for j, h in enumerate(hs):
                    kv = self.kv_of(h, layer)
                    k[r0 + j], v[r0 + j] = kv[0], kv[1]
            q = (self.rng.standard_normal((step.num_tokens, cfg.q_heads, cfg.head_dim)) * q_scale).astype(np.float32)
            kt = torch.from_numpy(k).to(dt).to(self.device)
            vt = torch.from_numpy(v).to(dt).to(self.device)
            qt = torch.from_numpy(q).to(dt).to(self.device)
            self.cache.append(layer, step, kt, vt)
            out = torch.full_like(qt, float("nan"))  # poisoned: every element must be written
            out, lse = self.cache.attention(layer, step, qt, out=out, return_lse=True)
            results.append((qt, out, lse))
            if check:
                self.check(step, layer, qt, out, lse)
        return step, results

    def check(self, step, layer, qt, out, lse):
        cfg = self.cfg
        out = out.float().cpu().double()
        lse = lse.float().cpu().double()
        assert torch.isfinite(out).all(), "attention left unwritten (NaN) or non-finite outputs"
        assert torch.isfinite(lse).all(), "non-finite lse"
        q = qt.float().cpu().double()
        g = cfg.q_heads // cfg.kv_heads
        scale = cfg.sm_scale or 1.0 / math.sqrt(cfg.head_dim)
        for i, seq in enumerate(step.seq_ids):
            r0, r1 = step.row_offsets[i], step.row_offsets[i + 1]
            hs = self.hashes[seq]
            kv = np.stack([self.kv_of(h, layer) for h in hs])  # [L, 2, Hkv, D]
            kv = torch.from_numpy(kv).to(TDTYPE[cfg.dtype]).double()  # the stored rounding
            K = kv[:, 0].repeat_interleave(g, dim=1)  # [L, Hq, D]
            V = kv[:, 1].repeat_interleave(g, dim=1)
            n, L = r1 - r0, len(hs)
            s = torch.einsum("nhd,lhd->hnl", q[r0:r1], K) * scale
            pos = torch.tensor(step.positions[r0:r1], dtype=torch.long)
            mask = torch.arange(L)[None, :] > pos[:, None]
            s = s.masked_fill(mask[None], float("-inf"))
            ref_lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
            ref = torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), V)
            got = out[r0:r1]
            rel = (got - ref).norm() / ref.norm()
            assert rel < REL_TOL[cfg.dtype], f"seq {seq} layer {layer}: relative error {rel:.3g} (n={n}, L={L})"
            err = (lse[r0:r1] - ref_lse.T).abs().max()
            assert err < LSE_TOL[cfg.dtype] * max(1.0, float(ref_lse.abs().max())), f"lse error {err:.3g}"


def _cfg(dtype, q_heads, kv_heads, head_dim, chunk, capacity=4096, layers=2, device="cuda", thr=2):
    return chunkvale.CacheConfig(layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                                 chunk_size=chunk, dtype=dtype, capacity_chunks=capacity, device=device,
                                 share_threshold=thr)


def _random_workload(d: Driver, rnd: random.Random, n_prefixes=3, n_seqs=6, decode_steps=4):
    C = d.cfg.chunk_size
    prefixes = [[rnd.randrange(1000) for _ in range(rnd.randrange(1, 3 * C + 5))] for _ in range(n_prefixes)]
    seqs = []
    for _ in range(n_seqs):
        p = rnd.choice(prefixes)
        cut = rnd.randrange(1, len(p) + 1)  # also cuts into the middle of a chunk
        toks = p[:cut] + [rnd.randrange(1000) for _ in range(rnd.randrange(1, 2 * C))]
        seq, cached = d.add(toks)
        pend = len(toks) - cached
        # Prefill in one or two steps (the second is an extend over the first).
        first = pend if pend < 2 or rnd.random() < 0.5 else rnd.randrange(1, pend)
        d.step([(seq, first)])
        if pend - first:
            d.step([(seq, pend - first)])
        seqs.append(seq)
    for _ in range(decode_steps):
        d.step([(s, [rnd.randrange(1000)]) for s in seqs])
    # A mixed step: a new prompt prefilled while the others decode.
    p = rnd.choice(prefixes)
    seq, cached = d.add(p + [rnd.randrange(1000) for _ in range(3)])
    d.step([(s, [rnd.randrange(1000)]) for s in seqs] + [(seq, len(p) + 3 - cached)])


HEADS = [(4, 4, 64), (8, 2, 128), (8, 1, 128), (32, 8, 128), (9, 3, 64), (4, 2, 256), (6, 2, 96), (5, 5, 80),
         (16, 1, 64), (32, 1, 64)]


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
def test_random_trees(dtype, heads, chunk):
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    d = Driver(_cfg(dtype, *heads, chunk), seed, "cuda")
    try:
        _random_workload(d, rnd)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from None


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [(8, 2, 128), (9, 3, 64), (4, 4, 256)], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_reference_kernel(dtype, heads, monkeypatch):
    """The plain fp32 debugging kernel (CHUNKVALE_CUDA_KERNEL=reference) on the same items,
    partials and merge: tells plan/merge faults from tensor-core kernel faults."""
    monkeypatch.setenv("CHUNKVALE_CUDA_KERNEL", "reference")
    seed = random.randrange(2**31)
    d = Driver(_cfg(dtype, *heads, 32), seed, "cuda")
    _random_workload(d, random.Random(seed), n_seqs=4, decode_steps=2)


@gpu
@pytest.mark.parametrize("dtype,heads", [("float16", (32, 32, 128)), ("bfloat16", (32, 8, 128))])
def test_shared_prefix_decode_many_steps(dtype, heads):
    """A benchmark-like shape scaled down: many sequences over one long shared prefix, then
    decode steps that mostly only bump lengths (the device plan is diffed, not re-sent)."""
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    d = Driver(_cfg(dtype, *heads, 64, capacity=2048, layers=1), seed, "cuda")
    prefix = [rnd.randrange(1000) for _ in range(512)]
    seqs = []
    for i in range(16):
        seq, cached = d.add(prefix + [rnd.randrange(1000) for _ in range(40 + i)])
        seqs.append((seq, 552 + i - cached))
    d.step(seqs, check=False)
    ids = [s for s, _ in seqs]
    st = d.cache.stats()
    for _ in range(40):
        d.step([(s, [rnd.randrange(1000)]) for s in ids])
    st2 = d.cache.stats()
    assert st2["chunk_first_units"] > 0
    assert st2["plan_reuses"] > st["plan_reuses"], "decode steps should reuse (bump) the plan"


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("thr", [1, 2, 1000])
def test_cpu_gpu_agree(dtype, thr):
    """The same operations on a CPU cache and a CUDA cache: same plan, outputs agree."""
    seed = random.randrange(2**31)
    heads = (8, 2, 128)
    dc = Driver(_cfg(dtype, *heads, 32, device="cpu", thr=thr), seed, "cpu")
    dg = Driver(_cfg(dtype, *heads, 32, device="cuda", thr=thr), seed, "cuda")
    for d in (dc, dg):
        rnd = random.Random(seed)
        d.outs = []
        prefix = [rnd.randrange(1000) for _ in range(100)]
        ids = []
        for i in range(5):
            seq, cached = d.add(prefix + [rnd.randrange(1000) for _ in range(7 * i + 1)])
            ids.append((seq, 101 + 7 * i - cached))
        for entries in (ids, None, None, None):
            if entries is None:
                entries = [(s, [rnd.randrange(1000)]) for s, _ in ids]
            _, res = d.step(entries)
            d.outs += [(o.float().cpu(), l.float().cpu()) for _, o, l in res]
    assert len(dc.outs) == len(dg.outs)
    for (oc, lc), (og, lg) in zip(dc.outs, dg.outs):
        rel = (oc - og).norm() / oc.norm()
        assert rel < 2 * REL_TOL[dtype], f"CPU vs GPU relative difference {rel:.3g}"
        assert (lc - lg).abs().max() < 2 * LSE_TOL[dtype] * max(1.0, float(lc.abs().max()))


@gpu
def test_non_default_stream_and_graph_capture():
    """Kernels run on the caller's current stream; one layer's attention of an open step is
    capturable in a CUDA graph (no host sync, no allocation, no plan upload once warm)."""
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    d = Driver(_cfg("bfloat16", 8, 2, 128, 32, layers=1), seed, "cuda")
    prefix = [rnd.randrange(1000) for _ in range(200)]
    ids = []
    for i in range(4):
        seq, cached = d.add(prefix + [rnd.randrange(1000) for _ in range(5 + i)])
        ids.append((seq, 205 + i - cached))
    d.step(ids)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step, res = d.step([(q, [rnd.randrange(1000)]) for q, _ in ids])
    torch.cuda.synchronize()
    qt, out_eager, _ = res[0]
    out = torch.empty_like(qt)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        d.cache.attention(0, step, qt, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, out_eager), "graph replay differs from the eager result"


@gpu
def test_cuda_errors():
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        chunkvale.KVCache(_cfg("float32", 4, 4, 64, 32))
    d = Driver(_cfg("float16", 4, 4, 64, 32, layers=1), 1, "cuda")
    seq, _ = d.add([1, 2, 3])
    step = d.cache.plan([(seq, 3)])
    k = torch.zeros((3, 4, 64), dtype=torch.float16)  # on the CPU
    with pytest.raises((TypeError, ValueError), match="k"):
        d.cache.append(0, step, k, k)
    kc = torch.zeros((3, 4, 64), dtype=torch.float16, device="cuda")
    d.cache.append(0, step, kc, kc)
    flat = torch.zeros(3 * 4 * 64 + 1, dtype=torch.float16, device="cuda")
    q_odd = flat[1:].view(3, 4, 64)  # contiguous but 2 bytes off a 16-byte boundary
    with pytest.raises(ValueError, match="aligned"):
        d.cache.attention(0, step, q_odd)
    qc = torch.randn((3, 4, 64), dtype=torch.float16, device="cuda")
    out = d.cache.attention(0, step, qc)
    assert out.shape == qc.shape and torch.isfinite(out).all()


@gpu
def test_read_tile_and_copy_on_diverge():
    d = Driver(_cfg("bfloat16", 4, 2, 64, 16, layers=2), 7, "cuda")
    toks = list(range(40))
    seq, _ = d.add(toks)
    d.step([(seq, 40)])
    # A prompt diverging in the middle of chunk 2: tokens 32..35 are copied (copy_chunk).
    seq2, cached = d.add(toks[:36] + [999, 998])
    assert cached == 36
    slots = d.cache.sequence_slots(seq2)
    tile = d.cache.read_tile(1, slots[2], 0, 1)
    for j in range(4):
        want = torch.from_numpy(d.kv_of(d.hashes[seq][32 + j], 1)[0, 1]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(tile[j], want)
    d.step([(seq2, 2)])


# ----------------------------------------------------------------------------------------
# anywhere (with or without a GPU)
# ----------------------------------------------------------------------------------------


def test_cuda_flags_consistent():
    assert isinstance(chunkvale.cuda_built(), bool)
    assert isinstance(chunkvale.cuda_available(), bool)
    if not chunkvale.cuda_built():
        assert not chunkvale.cuda_available()


@pytest.mark.skipif(HAVE_GPU, reason="checks the no-GPU error")
def test_cuda_device_without_gpu_raises_cleanly():
    cfg = _cfg("float16", 4, 4, 64, 32)
    with pytest.raises(ValueError, match="cuda"):
        chunkvale.KVCache(cfg)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_driver_on_cpu(dtype):
    """The GPU tests' driver and reference, run on the CPU backend: a GPU failure then
    points at the GPU path, not at the harness."""
    seed = random.randrange(2**31)
    d = Driver(_cfg(dtype, 8, 2, 64, 16, device="cpu", capacity=512), seed, "cpu")
    _random_workload(d, random.Random(seed), n_seqs=4, decode_steps=2)
