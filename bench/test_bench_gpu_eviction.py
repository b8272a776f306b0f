"""Recallable eviction on the GPU (issue: recallable eviction, speed), measured in one run.

One layer, GQA 32 query / 8 KV heads, head dim 128, float16, chunk 64; B sequences of CTX
tokens each (no shared prefix), one decode token per sequence.

* latency (B in CHUNKVALE_BENCH_BATCHES, default 4 8 16 32): the full cache's attention vs
  budgeted attention (budget CHUNKVALE_BENCH_BUDGET tokens, every chunk resident,
  dense_layers=0 so the layer selects). Both eager: a budgeted call scores on the device,
  copies the scores back, selects on the host, uploads the layer's plan and attends (it cannot
  be captured in a CUDA graph). "select share" = evict_select_seconds / wall time, of which
  the scoring kernels and the copy of the scores back = evict_score_seconds.
  CHUNKVALE_BENCH_PROFILE=1 prints a torch-profiler kernel table per batch size.
* fixed KV memory: the device holds MEM_SEQS x CTX tokens of K/V for the layer. The full cache
  decodes MEM_SEQS sequences; the host tier (device_chunks = MEM_SEQS x CTX / chunk) decodes
  4 x MEM_SEQS. A step = plan + append + attention for every sequence (wall time, synchronised).
  Two query models: "random" draws every step's queries afresh (the selection changes
  completely: the worst case for recalls), "drift" moves each sequence's query a little per
  step (q <- q + 0.25 noise, the locality decode queries have in practice). Tokens/s = B / step.

Run: python -m pytest bench/test_bench_gpu_eviction.py -q -s   (skips without a GPU)
Results: $CHUNKVALE_BENCH_EVICT_JSON (default bench/results/gpu_eviction.json).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest

import chunkvale

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (chunkvale.cuda_available() and torch.cuda.is_available()),
                                reason="needs the CUDA backend and a usable GPU")

HQ, HKV, D, C = 32, 8, 128, 64
CTX = int(os.environ.get("CHUNKVALE_BENCH_CTX", "32768"))
# 23 chunks of 64 (1 sink + 2 window + 20 top-k): what the tables in bench/README.md attended, measured
# when the default top-k of a 4096-token budget was 20 chunks (before the budget bounded attention).
BUDGET = int(os.environ.get("CHUNKVALE_BENCH_BUDGET", "1472"))
BATCHES = [int(b) for b in os.environ.get("CHUNKVALE_BENCH_BATCHES", "4 8 16 32").split()]
MEM_SEQS = int(os.environ.get("CHUNKVALE_BENCH_MEM_SEQS", "8"))
ROUNDS = int(os.environ.get("CHUNKVALE_BENCH_ROUNDS", "20"))
RESULTS: list = []


def _cache(B, eviction):
    cfg = chunkvale.CacheConfig(layers=1, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C, dtype="float16",
                                device="cuda", capacity_chunks=B * (CTX // C + 4), eviction=eviction)
    cache = chunkvale.KVCache(cfg)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    seqs = [cache.add_sequence(list(range(b * 10**6, b * 10**6 + CTX)))[0] for b in range(B)]
    piece = 4096
    for s in seqs:  # prefill in pieces (keys only need to exist; attention is not measured)
        for _ in range(0, CTX, piece):
            st = cache.plan([(s, piece)])
            k = torch.randn((piece, HKV, D), dtype=torch.float16, device="cuda", generator=gen)
            cache.append(0, st, k, k)
    return cache, seqs, gen


def _wall_ms(fn, rounds=ROUNDS, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _profile(fn, title, n=10):
    """CHUNKVALE_BENCH_PROFILE=1: device time per kernel and the host time of n calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"\n--- profile: {title}, {n} calls ---")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


def _write():
    path = os.environ.get("CHUNKVALE_BENCH_EVICT_JSON",
                          os.path.join(os.path.dirname(__file__), "results", "gpu_eviction.json"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(RESULTS, f, indent=1)


@pytest.mark.parametrize("B", BATCHES)
def test_budgeted_decode_latency(B):
    row = dict(kind="latency", B=B, ctx=CTX, budget=BUDGET, gpu=torch.cuda.get_device_name())
    for name, ev in (("full", None), ("budget", chunkvale.Eviction(budget_tokens=BUDGET, dense_layers=0))):
        cache, seqs, gen = _cache(B, ev)
        st = cache.plan([(s, [1]) for s in seqs])
        k = torch.randn((B, HKV, D), dtype=torch.float16, device="cuda", generator=gen)
        cache.append(0, st, k, k)
        q = torch.randn((B, HQ, D), dtype=torch.float16, device="cuda", generator=gen)
        out = torch.empty_like(q)
        before = cache.stats()
        row[name + "_us"] = _wall_ms(lambda: cache.attention(0, st, q, out=out)) * 1e3
        after = cache.stats()
        if ev is not None:
            calls = ROUNDS + 3
            per_call = row[name + "_us"] * 1e-6 * calls
            row["select_share"] = (after["evict_select_seconds"] - before["evict_select_seconds"]) / per_call
            row["score_share"] = (after["evict_score_seconds"] - before["evict_score_seconds"]) / per_call
            if os.environ.get("CHUNKVALE_BENCH_PROFILE"):
                _profile(lambda: cache.attention(0, st, q, out=out), f"budgeted B={B}")
            chunks = -(-(CTX + 1) // C)  # the decode token opens one more
            row["kept_chunks_per_seq"] = chunks - (after["evict_dropped_chunks"] - before["evict_dropped_chunks"]) / (
                calls * B)
        del cache, out
        torch.cuda.empty_cache()
    row["speedup"] = row["full_us"] / row["budget_us"]
    print(f"\nB={B} ctx={CTX} budget={BUDGET}: full {row['full_us']:.0f} us, budgeted {row['budget_us']:.0f} us "
          f"({row['speedup']:.1f}x), scoring+selection {100 * row['select_share']:.0f}% of the budgeted call "
          f"(scoring kernels and the copy back {100 * row['score_share']:.0f}%)")
    RESULTS.append(row)
    _write()


def _decode_throughput(cache, seqs, gen, drift):
    B = len(seqs)
    q = torch.randn((B, HQ, D), dtype=torch.float16, device="cuda", generator=gen)
    state = {"q": q}

    def step():
        st = cache.plan([(s, [1]) for s in seqs])
        k = torch.randn((B, HKV, D), dtype=torch.float16, device="cuda", generator=gen)
        cache.append(0, st, k, k)
        noise = torch.randn((B, HQ, D), dtype=torch.float16, device="cuda", generator=gen)
        state["q"] = state["q"] + 0.25 * noise if drift else noise
        cache.attention(0, st, state["q"])

    before = cache.stats()
    ms = _wall_ms(step)
    after = cache.stats()
    calls = ROUNDS + 3
    return ms, {k: (after[k] - before[k]) / calls for k in ("evict_recalls", "evict_evictions", "evict_bytes_from_host")}


@pytest.mark.parametrize("queries", ["drift", "random"])
def test_throughput_at_fixed_kv_memory(queries):
    drift = queries == "drift"
    row = dict(kind="fixed_memory", queries=queries, ctx=CTX, budget=BUDGET, mem_seqs=MEM_SEQS,
               gpu=torch.cuda.get_device_name())
    cache, seqs, gen = _cache(MEM_SEQS, None)
    row["full_B"] = MEM_SEQS
    row["full_step_ms"], _ = _decode_throughput(cache, seqs, gen, drift)
    del cache
    torch.cuda.empty_cache()
    B = 4 * MEM_SEQS
    ev = chunkvale.Eviction(budget_tokens=BUDGET, dense_layers=0, device_chunks=MEM_SEQS * CTX // C)
    cache, seqs, gen = _cache(B, ev)
    row["host_B"] = B
    row["host_step_ms"], moved = _decode_throughput(cache, seqs, gen, drift)
    row.update({"host_" + k: v for k, v in moved.items()})
    row["full_tok_s"] = MEM_SEQS / (row["full_step_ms"] * 1e-3)
    row["host_tok_s"] = B / (row["host_step_ms"] * 1e-3)
    row["throughput_ratio"] = row["host_tok_s"] / row["full_tok_s"]
    print(f"\nfixed KV memory ({MEM_SEQS} x {CTX} tokens), {queries} queries: full cache B={MEM_SEQS} "
          f"{row['full_step_ms']:.2f} ms/step ({row['full_tok_s']:.0f} tok/s); host tier B={B} "
          f"{row['host_step_ms']:.2f} ms/step ({row['host_tok_s']:.0f} tok/s, {row['throughput_ratio']:.2f}x), "
          f"{row['host_evict_recalls']:.0f} recalls/step ({row['host_evict_bytes_from_host'] / 2**20:.0f} MiB)")
    del cache
    torch.cuda.empty_cache()
    RESULTS.append(row)
    _write()
