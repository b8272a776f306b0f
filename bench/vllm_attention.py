"""The attention call alone: chunkvale's vLLM backend (PagedAttention.run) against vLLM's own CPU
backend (ops.cpu_attention_with_kv_cache) on the same batch metadata, in vLLM's environment.

Rows: decode steps of B sequences that share a `shared`-token prefix (the same leading block ids
in every row of the block table, as vLLM's prefix caching gives them) and own `private` tokens
each; a prefill of one 2048-token prompt; an extend of 8 sequences x (2048 shared cached + 256
new) tokens. Each backend writes the same K/V into its own cache with its own write op first
(vLLM's CPU kernels pack K per instruction set). Times one layer's call, min and median of many.
The process asks the kernel for AMX tile state first (torch.cpu._init_amx()): without it vLLM's
AMX kernels die with SIGILL. The memory floor of each row is its unique KV bytes over the copy
bandwidth measured in the same run.

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_attention.py [--dtypes bfloat16,float32]
        [--long [--budget 2048]] [--json out.json]

--budget adds, on the --long cases, chunkvale's budgeted attention (decode rows attend to sinks,
window and top-k blocks: a different result, by design, so only its time is shown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def batch(B, shared, private, block, rows=1):
    """Block table, seq_lens and query_start_loc of B sequences of shared + private tokens whose
    last `rows` tokens are this step's queries."""
    n_shared = shared // block
    n_own = -(-(private) // block)
    seq_len = shared + private
    table = torch.zeros((B, n_shared + n_own), dtype=torch.int32)
    table[:, :n_shared] = torch.arange(n_shared, dtype=torch.int32)
    for i in range(B):
        table[i, n_shared:] = n_shared + i * n_own + torch.arange(n_own, dtype=torch.int32)
    num_blocks = n_shared + B * n_own
    seq_lens = torch.full((B,), seq_len, dtype=torch.int32)
    qsl = torch.arange(B + 1, dtype=torch.int32) * rows
    return table, seq_lens, qsl, num_blocks


def slots_of(table, seq_lens, block):
    """Every token of every sequence, each shared block written once (as vLLM would have)."""
    seen, slots, owners = set(), [], []
    for i in range(table.shape[0]):
        for t in range(int(seq_lens[i])):
            b = int(table[i, t // block])
            s = b * block + t % block
            if s not in seen:
                seen.add(s)
                slots.append(s)
    return torch.tensor(slots, dtype=torch.int64)


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB copy (read + write), the best of a few."""
    src = torch.empty(1 << 28, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), 5))
    return 2 * src.numel() / best


def run_case(hq, hkv, D, dtype, B=32, shared=2048, private=128, block=128, reps=30, budget=None, rows=1,
             kind="decode"):
    import chunkvale
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    g = torch.Generator().manual_seed(0)
    table, seq_lens, qsl, N = batch(B, shared, private, block, rows)
    slots = slots_of(table, seq_lens, block)
    T = int(qsl[-1])
    k = torch.randn((len(slots), hkv, D), generator=g).to(dtype)
    v = torch.randn((len(slots), hkv, D), generator=g).to(dtype)
    q = torch.randn((T, hq, D), generator=g).to(dtype)
    scale = D ** -0.5

    isa = _get_attn_isa(dtype, block, D, "auto")
    theirs = torch.zeros((N, hkv, block, 2 * D), dtype=dtype)
    kc, vc = theirs.view(N, hkv, 2 * block, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=B, num_heads=hq, num_kv_heads=hkv, head_dim=D,
                                               seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
                                               sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out_v = torch.empty((T, hq, D), dtype=dtype)

    def vllm_call():
        ops.cpu_attention_with_kv_cache(query=q, key_cache=kc, value_cache=vc, output=out_v, query_start_loc=qsl,
                                        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
                                        sliding_window=-1, block_table=table, softcap=0.0,
                                        scheduler_metadata=meta, s_aux=None)

    pa = chunkvale.PagedAttention(hq, hkv, D, block, dtype=str(dtype).split(".")[1], sm_scale=scale,
                                  threads=torch.get_num_threads())
    ours = torch.zeros((N, hkv, block, 2 * D), dtype=dtype)
    pa.write_kv(ours, k, v, slots)
    out_c = torch.empty((T, hq, D), dtype=dtype)
    plan_box = {}

    def plan_call():
        plan_box["p"] = pa.plan(table, seq_lens, qsl, N)

    plan_call()

    def chunkvale_call():
        pa.run(plan_box["p"], q, ours, out_c)

    t_v = timed(vllm_call, reps)
    t_c = timed(chunkvale_call, reps)
    t_p = timed(plan_call, reps)
    t_b = None
    if budget:  # budgeted attention: the same pool, digests beside it, decode rows select
        pb = chunkvale.PagedAttention(hq, hkv, D, block, dtype=str(dtype).split(".")[1], sm_scale=scale,
                                      threads=torch.get_num_threads(),
                                      eviction=chunkvale.Eviction(budget_tokens=budget))
        digests = torch.zeros(pb.digest_shape(N), dtype=torch.float32)
        pb.write_kv(ours, k, v, slots, digests=digests)
        out_b = torch.empty((T, hq, D), dtype=dtype)
        t_b = timed(lambda: pb.run(plan_box["p"], q, ours, out_b, digests=digests), reps)
    err = (out_c.double() - out_v.double()).abs().max().item()
    unique_kv = len(slots) * hkv * D * 2 * dtype.itemsize
    return {"kind": kind, "rows": rows, "unique_kv_bytes": unique_kv,
            "shape": f"{hq}/{hkv} d{D} {str(dtype).split('.')[1]}", "B": B, "shared": shared, "private": private,
            "block": block, "vllm_isa": isa, "vllm_ms": [x * 1e3 for x in t_v], "chunkvale_ms": [x * 1e3 for x in t_c],
            "plan_ms": [x * 1e3 for x in t_p], "max_abs_diff": err,
            "budget": budget, "budgeted_ms": [x * 1e3 for x in t_b] if t_b else None,
            "chunk_first_blocks": plan_box["p"].chunk_first_blocks}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16 (vLLM's CPU default), float32")
    ap.add_argument("--long", action="store_true", help="also a prefix that outgrows the caches (8192 shared)")
    ap.add_argument("--budget", type=int, default=None,
                    help="also time budgeted attention (Eviction(budget_tokens=BUDGET), default top-k) on --long")
    args = ap.parse_args()
    dtypes = []
    for name in (d.strip() for d in args.dtypes.split(",") if d.strip()):
        if name not in ("bfloat16", "float32"):
            ap.error(f"--dtypes: expected bfloat16 and/or float32, got {name!r}")
        dtypes.append(getattr(torch, name))
    amx = bool(getattr(torch.cpu, "_init_amx", lambda: False)())  # before any AMX kernel runs
    import chunkvale
    import vllm
    from machine import cpu_flags, describe

    rows = []
    for dtype in dtypes:
        for hq, hkv, D in ((9, 3, 64), (32, 8, 128)):
            for shared, private in ((2048, 128), (0, 2176)):
                rows.append(run_case(hq, hkv, D, dtype, shared=shared, private=private, reps=args.reps))
            # prefill of one prompt; extend of 8 sequences over a shared cached prefix
            rows.append(run_case(hq, hkv, D, dtype, B=1, shared=0, private=2048, rows=2048, reps=max(3, args.reps // 10),
                                 kind="prefill"))
            rows.append(run_case(hq, hkv, D, dtype, B=8, shared=2048, private=256, rows=256, reps=max(3, args.reps // 10),
                                 kind="extend"))
        if args.long:
            for shared, private in ((8192, 128), (0, 8320)):
                rows.append(run_case(32, 8, 128, dtype, shared=shared, private=private, reps=max(5, args.reps // 5),
                                     budget=args.budget))
    bw = copy_bandwidth()
    print(describe(torch.get_num_threads()))
    print(f"CPU flags: {cpu_flags()}; AMX tile state granted: {amx}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, chunkvale {chunkvale.__version__} "
          f"({chunkvale.kernel_isa()} kernels), {torch.get_num_threads()} threads; one layer")
    print(f"{'kind':<8} {'shape':<18} {'B x (shared+private)':>22} {'vLLM isa':>8} {'vLLM ms (min/med)':>18} "
          f"{'chunkvale ms':>14} {'plan ms':>8} {'speed-up min/med':>17} {'floor ms':>9} {'max |diff|':>10} "
          f"{'budgeted ms (speed-up)':>24}")
    for r in rows:
        v, c = r["vllm_ms"], r["chunkvale_ms"]
        floor = r["unique_kv_bytes"] / bw * 1e3
        print(f"{r['kind']:<8} {r['shape']:<18} {str(r['B']) + ' x (' + str(r['shared']) + '+' + str(r['private']) + ')':>22} "
              f"{r['vllm_isa']:>8} {v[0]:8.3f}/{v[1]:8.3f} {c[0]:6.3f}/{c[1]:6.3f} {r['plan_ms'][1]:8.3f} "
              f"{v[0] / c[0]:7.2f}x/{v[1] / c[1]:.2f}x {floor:9.3f} {r['max_abs_diff']:10.2e}"
              + (f" {r['budgeted_ms'][1]:12.3f} ({v[1] / r['budgeted_ms'][1]:.2f}x)" if r["budgeted_ms"] else ""))
    if args.json:
        json.dump({"machine": describe(torch.get_num_threads()), "cpu_flags": cpu_flags(), "amx": amx,
                   "copy_bandwidth": bw, "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
