"""GPU decode benchmarks: the anchor workloads of shared/anchors/README.md (both H100 tables).

Each workload (B sequences, ns shared prefix tokens, nu private tokens, one decode token per
sequence) is timed in one run against:
  * chunkvale attention of one layer (the decode step's two launches), eager and replayed
    from a CUDA graph (the graph removes Python/launch overhead: that is the kernel time);
  * torch SDPA over per-sequence copies (no sharing);
  * FlashInfer paged decode (page 16) with the prefix pages shared, CUDA-core and
    tensor-core variants, and FlashInfer's two-level cascade -- when flashinfer imports;
  * the memory floor: unique KV bytes / measured device copy bandwidth (read + write).
Medians of CUDA-event timings after warm-up. Results go to $CHUNKVALE_BENCH_JSON (default
bench/results/gpu_decode.json); scripts/gpu_check.sh prints the table. Skips without a GPU.

Run: python -m pytest bench/test_bench_gpu.py -q -s
"""
from __future__ import annotations

import json
import math
import os
import statistics

import pytest

import chunkvale

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (chunkvale.cuda_available() and torch.cuda.is_available()),
                                reason="needs the CUDA backend and a usable GPU")

# (table, dtype, q_heads, kv_heads, D, B, ns, nu)
MHA = [("mha_fp16", "float16", 32, 32, 128, b, ns, nu)
       for b, ns, nu in [(32, 1024, 128), (32, 2048, 128), (32, 4096, 128), (64, 2048, 512),
                         (32, 2048, 2048), (32, 0, 2048)]]
GQA = [("gqa_bf16", "bfloat16", 32, 8, 128, b, ns, nu)
       for b, ns, nu in [(32, 2048, 128), (64, 4096, 256), (128, 2048, 128), (8, 4096, 128)]]
WORKLOADS = MHA + GQA
CHUNK = int(os.environ.get("CHUNKVALE_BENCH_CHUNK", "64"))
PAGE = 16
RESULTS = []
_BW = {}


def _median_ms(fn, reps=20, iters=int(os.environ.get("CHUNKVALE_BENCH_ITERS", "50")), warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    return statistics.median(times)


def _median_graph_ms(fn, reps=20, iters=int(os.environ.get("CHUNKVALE_BENCH_ITERS", "50"))):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if "bw" not in _BW:
        n = 1 << 28  # 512 MiB of fp16 per buffer
        a = torch.randn(n, dtype=torch.float16, device="cuda")
        b = torch.empty_like(a)
        ms = _median_ms(lambda: b.copy_(a), reps=5, iters=20)
        _BW["bw"] = 2 * a.numel() * a.element_size() / (ms * 1e-3)
        del a, b
    return _BW["bw"]


def _fill_chunkvale(dtype, hq, hkv, D, B, ns, nu, gen):
    """A cache holding one shared prefix of ns tokens and B sequences of ns + nu tokens,
    then a planned decode step (one new token per sequence) appended; returns (cache,
    step, q) ready for attention."""
    tdt = getattr(torch, dtype)
    per_seq = math.ceil((nu + 1) / CHUNK) + 1
    cfg = chunkvale.CacheConfig(layers=1, q_heads=hq, kv_heads=hkv, head_dim=D, chunk_size=CHUNK,
                                dtype=dtype, device="cuda",
                                capacity_chunks=math.ceil(ns / CHUNK) + B * per_seq + 8)
    cache = chunkvale.KVCache(cfg)

    def prefill(entries, n_tok):
        step = cache.plan(entries)
        k = torch.randn((n_tok, hkv, D), dtype=tdt, device="cuda", generator=gen)
        v = torch.randn((n_tok, hkv, D), dtype=tdt, device="cuda", generator=gen)
        cache.append(0, step, k, v)

    prefix = list(range(1, ns + 1))
    if ns:
        s0, _ = cache.add_sequence(prefix)
        prefill([(s0, ns)], ns)
    seqs = []
    for b in range(B):
        s, cached = cache.add_sequence(prefix + [100000 + b * 10000 + i for i in range(nu)])
        assert cached == (ns // CHUNK) * CHUNK or ns == 0
        seqs.append((s, ns + nu - cached))
    # Prefill the private parts in groups (bounded activation memory).
    for i in range(0, B, 16):
        grp = seqs[i:i + 16]
        prefill(grp, sum(n for _, n in grp))
    step = cache.plan([(s, [7]) for s, _ in seqs])
    k = torch.randn((B, hkv, D), dtype=tdt, device="cuda", generator=gen)
    cache.append(0, step, k, k.clone())
    q = torch.randn((B, hq, D), dtype=tdt, device="cuda", generator=gen)
    return cache, step, q


def _dense_kv(cache_like_dtype, hkv, D, B, L, gen):
    tdt = getattr(torch, cache_like_dtype)
    k = torch.randn((B, hkv, L, D), dtype=tdt, device="cuda", generator=gen)
    v = torch.randn((B, hkv, L, D), dtype=tdt, device="cuda", generator=gen)
    return k, v


def _flashinfer():
    try:
        import flashinfer  # noqa: F401
        return flashinfer
    except Exception:  # pragma: no cover - optional
        return None


def _flashinfer_times(fi, dtype, hq, hkv, D, B, ns, nu, gen):
    """FlashInfer paged decode (prefix pages shared; CUDA cores and tensor cores) and the
    2-level cascade, page size 16. Returns {name: ms or error string}."""
    tdt = getattr(torch, dtype)
    out = {}
    n_shared = ns // PAGE
    priv_tokens = ns - n_shared * PAGE + nu + 1
    n_priv = math.ceil(priv_tokens / PAGE)
    last = priv_tokens - (n_priv - 1) * PAGE
    pages = n_shared + B * n_priv
    kv = torch.randn((pages, 2, PAGE, hkv, D), dtype=tdt, device="cuda", generator=gen)
    q = torch.randn((B, hq, D), dtype=tdt, device="cuda", generator=gen)
    shared = torch.arange(n_shared, dtype=torch.int32, device="cuda")
    priv = torch.arange(n_shared, pages, dtype=torch.int32, device="cuda").view(B, n_priv)
    indices = torch.cat([torch.cat([shared, priv[b]]) for b in range(B)])
    indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda") * (n_shared + n_priv)
    last_len = torch.full((B,), last, dtype=torch.int32, device="cuda")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for name, tc in (("flashinfer_paged", False), ("flashinfer_paged_tc", True)):
        try:
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(indptr, indices, last_len, hq, hkv, D, PAGE, pos_encoding_mode="NONE",
                   q_data_type=tdt, kv_data_type=tdt)
            out[name] = _median_ms(lambda: w.run(q, kv))
        except Exception as e:  # pragma: no cover - depends on the installed version
            out[name] = f"error: {type(e).__name__}: {e}"[:200]
    if ns >= PAGE:
        try:
            w = fi.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
            qo = [torch.tensor([0, B], dtype=torch.int32, device="cuda"),
                  torch.arange(B + 1, dtype=torch.int32, device="cuda")]
            kv_indptr = [torch.tensor([0, n_shared], dtype=torch.int32, device="cuda"),
                         torch.arange(B + 1, dtype=torch.int32, device="cuda") * n_priv]
            kv_idx = [shared, priv.reshape(-1).contiguous()]
            kv_last = [torch.tensor([PAGE], dtype=torch.int32, device="cuda"), last_len]
            w.plan(qo, kv_indptr, kv_idx, kv_last, hq, hkv, D, PAGE, causal=False,
                   pos_encoding_mode="NONE", q_data_type=tdt)
            out["flashinfer_cascade"] = _median_ms(lambda: w.run(q, kv))
        except Exception as e:  # pragma: no cover
            out["flashinfer_cascade"] = f"error: {type(e).__name__}: {e}"[:200]
    del kv, ws
    return out


@pytest.mark.parametrize("wl", WORKLOADS, ids=lambda w: f"{w[0]}-B{w[5]}-ns{w[6]}-nu{w[7]}")
def test_decode(wl):
    table, dtype, hq, hkv, D, B, ns, nu = wl
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    row = dict(table=table, dtype=dtype, q_heads=hq, kv_heads=hkv, head_dim=D, B=B, ns=ns, nu=nu,
               chunk=CHUNK, gpu=torch.cuda.get_device_name())
    L = ns + nu + 1
    elem = torch.finfo(getattr(torch, dtype)).bits // 8
    unique = (ns + B * (nu + 1)) * hkv * D * 2 * elem
    row["floor_us"] = unique / copy_bandwidth() * 1e6
    row["copy_bw_TBps"] = copy_bandwidth() / 1e12

    cache, step, q = _fill_chunkvale(dtype, hq, hkv, D, B, ns, nu, gen)
    out = torch.empty_like(q)
    fn = lambda: cache.attention(0, step, q, out=out)  # noqa: E731
    row["chunkvale_eager_us"] = _median_ms(fn) * 1e3
    try:
        row["chunkvale_us"] = _median_graph_ms(fn) * 1e3
    except Exception as e:
        row["chunkvale_us"] = None
        row["chunkvale_graph_error"] = f"{type(e).__name__}: {e}"[:200]
    st = cache.stats()
    row["chunk_first_units"] = st["chunk_first_units"]
    row["kv_bytes_chunkvale"] = st["chunks_in_use"] * st["bytes_per_chunk"]
    del cache, out

    # torch SDPA over per-sequence copies (no sharing)
    k, v = _dense_kv(dtype, hkv, D, B, L, gen)
    q4 = q.view(B, hq, 1, D)
    kw = {"enable_gqa": True} if hq != hkv else {}
    try:
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, **kw)  # noqa: E731
        row["torch_sdpa_us"] = _median_ms(sdpa) * 1e3
    except Exception as e:
        row["torch_sdpa_us"] = f"error: {type(e).__name__}: {e}"[:200]
    del k, v

    fi = _flashinfer()
    if fi is not None:
        for name, ms in _flashinfer_times(fi, dtype, hq, hkv, D, B, ns, nu, gen).items():
            row[name + "_us"] = ms * 1e3 if isinstance(ms, float) else ms
    torch.cuda.empty_cache()
    RESULTS.append(row)
    _write()


def _write():
    path = os.environ.get("CHUNKVALE_BENCH_JSON",
                          os.path.join(os.path.dirname(__file__), "results", "gpu_decode.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)


def test_decode_correct_vs_sdpa():
    """Sanity next to the timings: a small shared-prefix decode step of the benchmark's
    kind equals float64 SDPA over dense copies of the same K/V."""
    dtype, hq, hkv, D, B, ns, nu = "bfloat16", 32, 8, 128, 4, 256, 64
    tdt = getattr(torch, dtype)
    cfg = chunkvale.CacheConfig(layers=1, q_heads=hq, kv_heads=hkv, head_dim=D, chunk_size=CHUNK,
                                dtype=dtype, device="cuda", capacity_chunks=64)
    cache = chunkvale.KVCache(cfg)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(5)
    prefix = list(range(1, ns + 1))
    s0, _ = cache.add_sequence(prefix)
    kp = torch.randn((ns, hkv, D), dtype=tdt, device="cuda", generator=gen)
    vp = torch.randn((ns, hkv, D), dtype=tdt, device="cuda", generator=gen)
    st = cache.plan([(s0, ns)])
    cache.append(0, st, kp, vp)
    seqs, ks, vs = [], [], []
    for b in range(B):
        s, cached = cache.add_sequence(prefix + [1000 + 100 * b + i for i in range(nu)])
        assert cached == ns
        seqs.append(s)
    kn = torch.randn((B * nu, hkv, D), dtype=tdt, device="cuda", generator=gen)
    vn = torch.randn((B * nu, hkv, D), dtype=tdt, device="cuda", generator=gen)
    st = cache.plan([(s, nu) for s in seqs])
    cache.append(0, st, kn, vn)
    st = cache.plan([(s, [3]) for s in seqs])
    kd = torch.randn((B, hkv, D), dtype=tdt, device="cuda", generator=gen)
    vd = torch.randn((B, hkv, D), dtype=tdt, device="cuda", generator=gen)
    cache.append(0, st, kd, vd)
    q = torch.randn((B, hq, D), dtype=tdt, device="cuda", generator=gen)
    out = cache.attention(0, st, q)
    for b in range(B):
        K = torch.cat([kp, kn[b * nu:(b + 1) * nu], kd[b:b + 1]]).transpose(0, 1)[None].double()
        V = torch.cat([vp, vn[b * nu:(b + 1) * nu], vd[b:b + 1]]).transpose(0, 1)[None].double()
        ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :, None].double(), K, V,
                                                               enable_gqa=True)[0, :, 0]
        rel = (out[b].double() - ref).norm() / ref.norm()
        assert rel < 1.6e-2, f"sequence {b}: relative error {rel:.3g}"
