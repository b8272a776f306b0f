"""CPU attention beyond the MHA decode table: grouped-head decode, prefill, extend and thread
scaling, each against torch SDPA (or itself) in the same run.

  gqa decode   B=32 sequences, 32 query / 8 KV heads, d128, bf16, 2048 shared + 128 private
               tokens each; torch SDPA (enable_gqa) over per-sequence copies; floor = unique
               KV bytes / copy bandwidth (as in test_bench_cpu.py)
  prefill      one prompt of 1540 new tokens, causal: 9/3 heads d64 fp32 (SmolLM2's shape) and
               32/8 heads d128 fp32; torch SDPA is_causal=True (enable_gqa)
  extend       8 sequences x (2048 cached + 256 new) tokens, 32/8 heads d128 fp32; torch SDPA over
               per-sequence copies with the causal-offset mask
  threads      the fp32 MHA decode rows (8 heads d128, B=32: 2048 + 128 and 0 + 2048) with one
               thread and with every core: chunkvale against itself

Run (prints the table at the end):

    pytest bench/test_bench_cpu_shapes.py --benchmark-columns=median,iqr,rounds -q

Knobs: CHUNKVALE_BENCH_ROUNDS (default 10), CHUNKVALE_BENCH_ISA (force a kernel instruction set).
Before timing, every row checks that chunkvale and torch agree.
"""

from __future__ import annotations

import gc
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from machine import bench_isa, describe, print_table_at_end  # noqa: E402
from test_bench_cpu import copy_bandwidth, flush_cache, torch  # noqa: E402,F401  (fixtures)

ROUNDS = int(os.environ.get("CHUNKVALE_BENCH_ROUNDS", "10"))
ALL = os.cpu_count() or 1
C = 64
RESULTS: dict = {}
ITEM = {"float32": 4, "bfloat16": 2}


def _cache(cv, *, q_heads, kv_heads, d, dtype, chunks, threads=0):
    return cv.KVCache(cv.CacheConfig(layers=1, q_heads=q_heads, kv_heads=kv_heads, head_dim=d, dtype=dtype,
                                     chunk_size=C, capacity_chunks=chunks, threads=threads,
                                     kernel_isa=bench_isa()))


class Decode:
    """B sequences over one shared prefix + private tails, one decode token each."""

    def __init__(self, cv, torch, dtype, ns, nu, q_heads, kv_heads, d=128, B=32, threads=0, with_torch=True):
        tdt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(ns + 31 * nu + q_heads)
        cap = math.ceil(ns / C) + B * (math.ceil((nu + 1) / C) + 2) + 8
        self.cache = c = _cache(cv, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype, chunks=cap, threads=threads)
        pk, pv = (torch.randn(ns, kv_heads, d, generator=g).to(tdt) for _ in range(2))
        ks, vs, ids = [], [], []
        for b in range(B):
            toks = list(range(1, ns + 1)) + [10**6 + b * 10**4 + i for i in range(nu)]
            sid, cached = c.add_sequence(toks)
            k, v = (torch.randn(nu, kv_heads, d, generator=g).to(tdt) for _ in range(2))
            step = c.plan([(sid, len(toks) - cached)])
            c.append(0, step, torch.cat([pk, k])[cached:].contiguous(), torch.cat([pv, v])[cached:].contiguous())
            ks.append(torch.cat([pk, k]))
            vs.append(torch.cat([pv, v]))
            ids.append(sid)
        self.step = c.plan([(s, [7]) for s in ids])
        kd, vd = (torch.randn(B, kv_heads, d, generator=g).to(tdt) for _ in range(2))
        c.append(0, self.step, kd, vd)
        self.q = torch.randn(B, q_heads, d, generator=g).to(tdt)
        self.out = torch.empty_like(self.q)
        self.floor_bytes = (ns + B * (nu + 1)) * kv_heads * d * 2 * ITEM[dtype]
        self.torch_fn = None
        if with_torch:
            tk = torch.stack([torch.cat([k, kd[b:b + 1]]) for b, k in enumerate(ks)]).transpose(1, 2).contiguous()
            tv = torch.stack([torch.cat([v, vd[b:b + 1]]) for b, v in enumerate(vs)]).transpose(1, 2).contiguous()
            tq = self.q.reshape(B, q_heads, 1, d).contiguous()
            sdpa = torch.nn.functional.scaled_dot_product_attention
            self.torch_fn = lambda: sdpa(tq, tk, tv, enable_gqa=True).reshape(B, q_heads, d)
        del ks, vs

    def chunkvale_fn(self):
        return self.cache.attention(0, self.step, self.q, out=self.out)


class Prompt:
    """B sequences of `cached` private tokens each, then `new` tokens each in one step
    (B=1, cached=0: a prefill)."""

    def __init__(self, cv, torch, dtype, B, cached, new, q_heads, kv_heads, d):
        tdt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(B * 7 + cached + new + q_heads)
        L = cached + new
        self.cache = c = _cache(cv, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype,
                                chunks=B * (math.ceil(L / C) + 2) + 8)
        k, v = (torch.randn(B, L, kv_heads, d, generator=g).to(tdt) for _ in range(2))
        ids = []
        for b in range(B):
            sid, _ = c.add_sequence([10**6 + b * 10**5 + i for i in range(L)])
            if cached:
                step = c.plan([(sid, cached)])
                c.append(0, step, k[b, :cached].contiguous(), v[b, :cached].contiguous())
            ids.append(sid)
        self.step = c.plan([(s, new) for s in ids])
        c.append(0, self.step, k[:, cached:].reshape(B * new, kv_heads, d).contiguous(),
                 v[:, cached:].reshape(B * new, kv_heads, d).contiguous())
        q = torch.randn(B, new, q_heads, d, generator=g).to(tdt)
        self.q = q.reshape(B * new, q_heads, d).contiguous()
        self.out = torch.empty_like(self.q)
        tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, heads, L, d]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if cached == 0:
            self.torch_fn = lambda: sdpa(tq, tk, tv, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(B * new, q_heads, d)
        else:
            mask = torch.arange(L)[None, :] <= (cached + torch.arange(new))[:, None]
            self.torch_fn = lambda: sdpa(tq, tk, tv, attn_mask=mask, enable_gqa=True).transpose(1, 2).reshape(B * new, q_heads, d)
        self.floor_bytes = None

    def chunkvale_fn(self):
        return self.cache.attention(0, self.step, self.q, out=self.out)


CASES = {
    "gqa decode bf16 32/8 d128 B32 2048+128":
        lambda cv, t: Decode(cv, t, "bfloat16", 2048, 128, 32, 8),
    "prefill fp32 9/3 d64 1x1540":
        lambda cv, t: Prompt(cv, t, "float32", 1, 0, 1540, 9, 3, 64),
    "prefill fp32 32/8 d128 1x1540":
        lambda cv, t: Prompt(cv, t, "float32", 1, 0, 1540, 32, 8, 128),
    "extend fp32 32/8 d128 8x(2048+256)":
        lambda cv, t: Prompt(cv, t, "float32", 8, 2048, 256, 32, 8, 128),
}
THREAD_CASES = {
    "threads fp32 8/8 d128 B32 2048+128": (2048, 128),
    "threads fp32 8/8 d128 B32 0+2048": (0, 2048),
}
_STATE: dict = {}


def _case(name, torch):
    import chunkvale as cv

    if name not in _STATE:
        _STATE.clear()
        gc.collect()
        case = CASES[name](cv, torch)
        a = case.chunkvale_fn().float()
        b = case.torch_fn().float()
        err = (a - b).abs().max().item()
        tol = 2e-2 if case.q.dtype == torch.bfloat16 else 1e-4
        assert err < tol, f"{name}: chunkvale and torch disagree by {err:.2e} (tolerance {tol})"
        _STATE[name] = case
    return _STATE[name]


def _median(benchmark):
    st = getattr(benchmark, "stats", None)
    return st.stats.median if st is not None and getattr(st, "stats", None) is not None else None


@pytest.mark.parametrize("impl", ["chunkvale", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_shape(benchmark, name, impl, torch, copy_bandwidth):
    case = _case(name, torch)
    benchmark.group = name
    fn = case.chunkvale_fn if impl == "chunkvale" else case.torch_fn
    benchmark.pedantic(fn, setup=flush_cache, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    r = RESULTS.setdefault(name, {})
    r[impl] = _median(benchmark)
    if case.floor_bytes:
        r["floor"] = case.floor_bytes / copy_bandwidth
    benchmark.extra_info.update(impl=impl, row=name, threads=ALL, isa=bench_isa())


@pytest.mark.parametrize("threads", [1, ALL])
@pytest.mark.parametrize("name", list(THREAD_CASES))
def test_thread_scaling(benchmark, name, threads, torch):
    import chunkvale as cv

    key = (name, threads)
    if key not in _STATE:
        _STATE.clear()
        gc.collect()
        _STATE[key] = Decode(cv, torch, "float32", *THREAD_CASES[name], 8, 8, threads=threads, with_torch=False)
    case = _STATE[key]
    benchmark.group = name
    benchmark.pedantic(case.chunkvale_fn, setup=flush_cache, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    RESULTS.setdefault(name, {})[f"t{threads}"] = _median(benchmark)
    benchmark.extra_info.update(row=name, threads=threads, isa=bench_isa())


def format_table(results):
    us = lambda x: "–" if x is None else f"{x * 1e6:.0f}"  # noqa: E731
    lines = [describe(ALL), "", "| row | chunkvale µs | torch SDPA µs | torch / chunkvale | floor µs | chunkvale / floor |",
             "|---|---|---|---|---|---|"]
    for name in CASES:
        r = results.get(name)
        if not r:
            continue
        cvt, tt, fl = r.get("chunkvale"), r.get("torch"), r.get("floor")
        lines.append(f"| {name} | {us(cvt)} | {us(tt)} | {f'{tt / cvt:.2f}x' if cvt and tt else '–'} | "
                     f"{us(fl)} | {f'{cvt / fl:.2f}x' if cvt and fl else '–'} |")
    if any(n in results for n in THREAD_CASES):
        lines += ["", f"| decode row | 1 thread µs | {ALL} threads µs | speedup |", "|---|---|---|---|"]
        for name in THREAD_CASES:
            r = results.get(name, {})
            t1, tn = r.get("t1"), r.get(f"t{ALL}")
            lines.append(f"| {name} | {us(t1)} | {us(tn)} | {f'{t1 / tn:.2f}x' if t1 and tn else '–'} |")
    return "\n".join(lines)


_print_table = print_table_at_end(RESULTS, _STATE, lambda: format_table(RESULTS))
