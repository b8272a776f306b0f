"""Two builds of chunkvale side by side: the same CPU cases, timed in alternating worker
processes (old, new, old, new, ...), so drift in the machine's load hits both alike.

Each build is a directory holding an installed `chunkvale` package, e.g.

    git worktree add /tmp/old <commit>
    pip install --no-build-isolation --no-deps --target /tmp/site-old /tmp/old
    pip install --no-build-isolation --no-deps --target /tmp/site-new .
    python scripts/bench_commits.py /tmp/site-old /tmp/site-new --passes 3

Cases (one layer, every core; tensors from torch, for bf16): decode attention (B=32, shared prefix + private
tail, MHA 8/8 and GQA 32/8, fp32 and bf16), a 1540-token causal prefill, an extend step,
one whole decode step (plan + append + attention: the front's overhead), sequence churn
(add_sequence with prefix reuse, fork, remove), a PagedAttention decode step (write_kv + run
over a vLLM-layout pool) and a budgeted decode step (digests, selection, scoring). Prints per case the median over passes of
each pass's median for each build, and the median of the passes' paired new/old ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {  # name: (kind, dtype, q_heads, kv_heads, d, batch, shared/cached, private/new)
    "decode fp32 8/8 d128 32x(2048+128)": ("decode", "float32", 8, 8, 128, 32, 2048, 128),
    "decode fp32 8/8 d128 32x(0+2048)": ("decode", "float32", 8, 8, 128, 32, 0, 2048),
    "decode bf16 8/8 d128 32x(2048+128)": ("decode", "bfloat16", 8, 8, 128, 32, 2048, 128),
    "decode bf16 32/8 d128 32x(2048+128)": ("decode", "bfloat16", 32, 8, 128, 32, 2048, 128),
    "prefill fp32 9/3 d64 1x1540": ("extend", "float32", 9, 3, 64, 1, 0, 1540),
    "extend fp32 32/8 d128 8x(2048+256)": ("extend", "float32", 32, 8, 128, 8, 2048, 256),
    "decode step fp32 9/3 d64 32x(1024+64)": ("step", "float32", 9, 3, 64, 32, 1024, 64),
    "churn: add+fork+remove 9/3 d64": ("churn", "float32", 9, 3, 64, 16, 1024, 40),
    # PagedAttention over a vLLM-layout pool, block 128: write_kv of one row per sequence, then run.
    "paged decode step fp32 9/3 d64 32x(1024+64)": ("paged", "float32", 9, 3, 64, 32, 1024, 64),
    # Budgeted decode (Eviction, budget 1024 of 4096 tokens): plan + append (digests as chunks
    # fill) + selection, scoring and attention over the kept chunks.
    "budgeted decode step fp32 9/3 d64 8x(0+4096)": ("budget", "float32", 9, 3, 64, 8, 0, 4096),
}


def _worker(names, rounds):
    import numpy as np
    import torch  # bf16 tensors: numpy has no bfloat16

    import chunkvale as cv

    rng = np.random.default_rng(0)

    def cache(dtype, qh, kvh, d, chunks, eviction=None):
        return cv.KVCache(cv.CacheConfig(layers=1, q_heads=qh, kv_heads=kvh, head_dim=d, dtype=dtype,
                                         capacity_chunks=chunks, eviction=eviction))

    def paged_step(dtype, qh, kvh, d, b, ns, nu, tdtype):
        B = 128
        shared_blocks = ns // B
        own = -(-(ns % B + nu + 1) // B)
        N = shared_blocks + b * own
        tables = [list(range(shared_blocks)) + list(range(shared_blocks + i * own, shared_blocks + (i + 1) * own))
                  for i in range(b)]
        lens = [ns + nu + 1] * b
        bt = np.array(tables, dtype=np.int32)
        qsl = np.arange(b + 1, dtype=np.int32)
        pa = cv.PagedAttention(qh, kvh, d, B, dtype=dtype)
        kv = randn(N, kvh, B, 2 * d, dtype=tdtype)
        plan = pa.plan(bt, np.array(lens, np.int32), qsl, N)
        slots = np.array([t[(n - 1) // B] * B + (n - 1) % B for t, n in zip(tables, lens)], np.int64)
        k = randn(b, kvh, d, dtype=tdtype)
        q = randn(b, qh, d, dtype=tdtype)
        res = torch.empty_like(q)

        def step():
            pa.write_kv(kv, k, k, slots)
            pa.run(plan, q, kv, res)
        return step

    def randn(*shape, dtype):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)

    def prefill(c, prompts, kvh, d, tdtype):
        seqs = [c.add_sequence(p)[0] for p in prompts]
        pending = [len(p) - c.sequence_length(s) for s, p in zip(seqs, prompts)]
        step = c.plan([(s, n) for s, n in zip(seqs, pending)])
        k = randn(step.num_tokens, kvh, d, dtype=tdtype)
        c.append(0, step, k, k)
        return seqs

    def timed(fn):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        n = rounds if time.perf_counter() - t0 < 0.1 else max(5, rounds // 4)  # long cases: fewer rounds
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out = {}
    for name in names:
        kind, dtype, qh, kvh, d, b, ns, nu = CASES[name]
        tdtype = getattr(torch, dtype)
        C = 64
        chunks = b * ((ns + nu + 2 * C) // C + 2) + 8
        c = cache(dtype, qh, kvh, d, chunks)
        shared = rng.integers(0, 30000, ns).tolist()
        prompts = [shared + rng.integers(0, 30000, nu if kind != "extend" else 1).tolist() for _ in range(b)]
        if kind == "paged":
            out[name] = timed(paged_step(dtype, qh, kvh, d, b, ns, nu, tdtype))
            continue
        if kind == "budget":
            c = cache(dtype, qh, kvh, d, chunks, cv.Eviction(budget_tokens=1024, dense_layers=0))
        if kind == "extend" and ns == 0:
            prompts = [rng.integers(0, 30000, nu).tolist()]
            seqs = [c.add_sequence(prompts[0])[0]]
            step = c.plan([(seqs[0], nu)])
        elif kind == "extend":
            seqs = prefill(c, [shared + p[-1:] for p in prompts], kvh, d, tdtype)
            step = c.plan([(s, rng.integers(0, 30000, nu).tolist()) for s in seqs])
        elif kind == "churn":
            base = shared + rng.integers(0, 30000, nu).tolist()
            prefill(c, [base], kvh, d, tdtype)

            def churn():
                for i in range(b):
                    s, _ = c.add_sequence(base + [i, i + 1])
                    kids = c.fork(s, 2)
                    for k in kids + [s]:
                        c.remove(k)
            out[name] = timed(churn)
            continue
        else:
            seqs = prefill(c, prompts, kvh, d, tdtype)
            step = c.plan([(s, [7]) for s in seqs])
        k = randn(step.num_tokens, kvh, d, dtype=tdtype)
        q = randn(step.num_tokens, qh, d, dtype=tdtype)
        res = torch.empty_like(q)
        if kind in ("step", "budget"):
            c.append(0, step, k, k)
            state = {"tok": 0}

            def one_step():
                state["tok"] += 1
                st = c.plan([(s, [state["tok"] % 30000]) for s in seqs])
                c.append(0, st, k, k)
                c.attention(0, st, q, out=res)
            out[name] = timed(one_step)
            continue
        c.append(0, step, k, k)
        out[name] = timed(lambda: c.attention(0, step, q, out=res))
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    a = ap.parse_args()
    if a.worker:
        _worker(a.cases, a.rounds)
        return
    runs = {"old": [], "new": []}
    for p in range(a.passes):
        for label, site in (("old", a.old), ("new", a.new)) if p % 2 == 0 else (("new", a.new), ("old", a.old)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(site))
            got = subprocess.run([sys.executable, os.path.abspath(__file__), a.old, a.new, "--worker",
                                  "--rounds", str(a.rounds), "--cases", *a.cases],
                                 env=env, cwd="/", capture_output=True, text=True)
            if got.returncode != 0:
                sys.exit(f"{label} worker failed:\n{got.stderr}")
            runs[label].append(json.loads(got.stdout.strip().splitlines()[-1]))
            print(f"pass {p + 1} {label}: done", file=sys.stderr)
    # Each pass runs old and new back to back: the median of the passes' new/old ratios is the
    # paired figure (drift between passes cancels); min..max shows the spread.
    print("| case | old (ms) | new (ms) | new/old, paired (min..max) |\n|---|---|---|---|")
    for name in a.cases:
        old = [r[name] for r in runs["old"]]
        new = [r[name] for r in runs["new"]]
        ratios = [n / o for o, n in zip(old, new)]
        print(f"| {name} | {statistics.median(old) * 1e3:.3f} | {statistics.median(new) * 1e3:.3f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.2f}..{max(ratios):.2f}) |")

if __name__ == "__main__":
    main()
