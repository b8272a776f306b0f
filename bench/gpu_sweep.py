"""Tuning sweep for the CUDA decode path: chunkvale's graph-replayed attention time for a few
anchor workloads under the backend's knobs (CHUNKVALE_CUDA_ITEMS_PER_SM and
CHUNKVALE_CUDA_MIN_PIECE, read when a cache is created), plus a per-kernel breakdown from the
torch profiler. On a GPU machine:

    python bench/gpu_sweep.py --items 2 4 8 --min-piece 2 4 [--profile]

The last line names the fastest setting over all workloads (sum of times).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_bench_gpu as tb  # noqa: E402  (the benchmark's fill and timing helpers)

WORKLOADS = [  # (name, dtype, hq, hkv, D, B, ns, nu)
    ("mha B32 2048+128", "float16", 32, 32, 128, 32, 2048, 128),
    ("mha B32 0+2048", "float16", 32, 32, 128, 32, 0, 2048),
    ("gqa B32 2048+128", "bfloat16", 32, 8, 128, 32, 2048, 128),
    ("gqa B8 4096+128", "bfloat16", 32, 8, 128, 8, 4096, 128),
]


def kernel_breakdown(fn, n=20):
    """Device time per kernel name (µs per call), eager calls under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    tot = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name.split("(")[0][:60]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: v / n for k, v in tot.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="sweep")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--items", type=int, nargs="+", default=[4])
    ap.add_argument("--min-piece", type=int, nargs="+", default=[2])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda")
    total = collections.Counter()
    for name, dtype, hq, hkv, D, B, ns, nu in WORKLOADS:
        elem = 2
        floor = (ns + B * (nu + 1)) * hkv * D * 2 * elem / tb.copy_bandwidth() * 1e6
        for items in args.items:
            for mp in args.min_piece:
                os.environ["CHUNKVALE_CUDA_ITEMS_PER_SM"] = str(items)
                os.environ["CHUNKVALE_CUDA_MIN_PIECE"] = str(mp)
                gen.manual_seed(7)
                cache, step, q = tb._fill_chunkvale(dtype, hq, hkv, D, B, ns, nu, gen)
                out = torch.empty_like(q)
                fn = lambda: cache.attention(0, step, q, out=out)  # noqa: E731
                us = tb._median_graph_ms(fn) * 1e3
                total[(items, mp)] += us
                line = f"{args.label:8} {name:18} items/SM {items:2} min_piece {mp} : {us:7.1f} us  (floor {floor:5.1f})"
                if args.profile:
                    br = kernel_breakdown(fn)
                    line += "  | " + ", ".join(f"{k.split('<')[0].split('::')[-1]} {v:.1f}" for k, v in br.items())
                print(line, flush=True)
                del cache, out
                torch.cuda.empty_cache()
    items, mp = min(total, key=total.get)
    print(f"fastest: CHUNKVALE_CUDA_ITEMS_PER_SM={items} CHUNKVALE_CUDA_MIN_PIECE={mp}")


if __name__ == "__main__":
    main()
