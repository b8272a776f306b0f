"""Budgeted attention through chunkvale.PagedAttention (an eviction config and one digest tensor
per layer, as the vLLM plugin runs it) against the float64 reference: write_kv's digests equal
the documented digest of each filled block; a decode row over budget attends to exactly the
blocks the documented policy keeps (sinks, window, top-k by digest bound: each KV head its own
with per_kv_head selection, the default, or one set with shared), every other row to its whole
context; over digest kinds, block sizes, dtypes, head counts and every kernel ISA this
CPU runs. Bad digests are named and nothing is written."""

import numpy as np
import pytest

from paged_pool import Pool, pack
from reference import (Kind, assert_close, attention_reference, digest_reference, kept_attention_reference,
                       kept_chunks_reference, out_tolerance, round_to)

SINK, WINDOW = 1, 2


def long_batch(rng, B, n_seqs):
    """Sequences of 2..12 blocks, each fresh or sharing the full blocks before an earlier one's
    new rows; two thirds decode one row, the rest prefill up to 20. Block ids scattered."""
    tables, lens, rows, used = [], [], [], 0
    for i in range(n_seqs):
        shared = []
        if i > 0 and rng.random() < 0.6:
            p = int(rng.integers(0, i))
            full = (lens[p] - rows[p]) // B
            if full:
                shared = tables[p][: int(rng.integers(1, full + 1))]
        n_new = 1 if rng.random() < 0.67 else int(rng.integers(2, 21))
        length = len(shared) * B + int(rng.integers(B, 10 * B)) + n_new
        own = -(-length // B) - len(shared)
        tables.append(list(shared) + list(range(used, used + own)))
        used += own
        lens.append(length)
        rows.append(n_new)
    N = used + 5
    ids = rng.permutation(N)
    return [[int(ids[b]) for b in t] for t in tables], lens, rows, N


def write_history(pa, K, pool, kv, digests, tables, lens, rows, tail_split):
    """Every token's K/V through write_kv in two calls, each block's rows in order: first all
    but each sequence's last `tail_split` tokens, then those (shared blocks once, by the first
    sequence that holds them)."""
    B, D = pool.B, pool.D
    seen, first, second = set(), [], []
    for t, n in zip(tables, lens):
        for pos in range(n):
            slot = t[pos // B] * B + pos % B
            if slot in seen:
                continue
            seen.add(slot)
            (second if pos >= n - tail_split else first).append(slot)
    for slots in (first, second):
        sm = np.asarray(slots, dtype=np.int64)
        blk, off = sm // B, sm % B
        k = pool.x64[blk, :, 0, off]  # [n, H, D]
        v = pool.x64[blk, :, 1, off]
        pa.write_kv(kv, K.make(k), K.make(v), sm, digests=digests)


def reference_rows(pool, tables, lens, rows, q64, budget, topk, kind, budgeted, selection):
    """The reference outputs and condition numbers of every row, and how many decode rows'
    KV heads kept different blocks."""
    outs, conds = [], []
    r0 = apart = 0
    for t, n, m in zip(tables, lens, rows):
        k, v = pool.history(t, n)
        q = q64[r0 : r0 + m]
        if budgeted and m == 1:
            keep = kept_chunks_reference(k, q[0], n, kind, budget, topk, chunk=pool.B, sink=SINK, window=WINDOW,
                                         selection=selection)
            keep = keep if selection == "per_kv_head" else [keep] * k.shape[1]
            apart += any(kh != keep[0] for kh in keep)
            o, _, c = kept_attention_reference(q, k, v, keep, pool.B, return_cond=True)
        else:
            o, _, c = attention_reference(q, k, v, k.shape[0] - m, return_cond=True)
        outs.append(o), conds.append(c)
        r0 += m
    return np.concatenate(outs), np.concatenate(conds), apart


CASES = [  # (q_heads, kv_heads, head_dim, block_size, dtype, kind, digest)
    (4, 2, 64, 16, "float32", "numpy", "cuboid_max"),
    (9, 3, 64, 32, "float32", "torch", "cuboid_mean"),
    (8, 1, 96, 48, "bfloat16", "torch", "sphere"),
    (4, 4, 80, 16, "float16", "numpy", "cuboid_max"),
    (8, 2, 128, 32, "bfloat16", "torch", "cuboid_mean"),
]


def run_case(cv, rng, case, isa="", selection=None):
    hq, hkv, D, B, dtype, kind, digest = case
    K = Kind(kind, dtype)
    budget, topk = 5 * B, 2
    ev = cv.Eviction(budget_tokens=budget, sink_chunks=SINK, window_chunks=WINDOW, topk_chunks=topk, digest=digest,
                     selection=selection)
    selection = ev.resolved_selection()
    pa = cv.PagedAttention(hq, hkv, D, B, dtype=dtype, kernel_isa=isa, eviction=ev)
    tables, lens, rows, N = long_batch(rng, B, int(rng.integers(2, 7)))
    pool = Pool(rng, N, hkv, B, D, dtype)
    kv = K.make(np.zeros((N, hkv, B, 2 * D)))
    digests = np.full(pa.digest_shape(N), np.nan, dtype=np.float32)  # a block never filled stays NaN
    write_history(pa, K, pool, kv, digests, tables, lens, rows, tail_split=int(rng.integers(1, 2 * B)))

    # Every block whose last row was written has the documented digest of its keys.
    filled = {b for t, n in zip(tables, lens) for j, b in enumerate(t) if (j + 1) * B <= n}
    for b in filled:
        for h in range(hkv):
            lo, hi = digest_reference(pool.x64[b, h, 0], digest)
            np.testing.assert_allclose(digests[b, h, 0], lo, rtol=1e-5, atol=1e-6, err_msg=f"block {b} head {h}")
            np.testing.assert_allclose(digests[b, h, 1], hi, rtol=1e-5, atol=1e-6, err_msg=f"block {b} head {h}")

    T = sum(rows)
    q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), dtype)
    plan = pa.plan(*pack(tables, lens, rows), N)
    before = pa.selection_counts["dropped_blocks"]
    apart = 0
    for budgeted in (True, False):  # without digests the same object attends densely
        out = K.poison((T, hq, D))
        pa.run(plan, K.make(q64), kv, out, digests=digests if budgeted else None)
        ref, cond, a = reference_rows(pool, tables, lens, rows, q64, budget, topk, digest, budgeted, selection)
        assert_close(K.to64(out), ref, 0, 0, f"out {case} {selection} budgeted={budgeted} isa={isa or 'best'}",
                     tol=out_tolerance(dtype, ref, cond))
        apart += a
    over = sum(1 for n, m in zip(lens, rows) if m == 1 and n > budget and -(-n // B) - SINK - WINDOW > topk)
    return over, pa.selection_counts["dropped_blocks"] - before, apart


@pytest.mark.parametrize("selection", [None, "shared"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}-b{c[3]}-{c[4]}-{c[6]}")
def test_budgeted_rows_attend_to_the_documented_blocks(cv, seed, case, selection):
    rng = np.random.default_rng(seed)
    over = dropped = apart = 0
    for _ in range(4):
        o, d, a = run_case(cv, rng, case, selection=selection)
        over, dropped, apart = over + o, dropped + d, apart + a
    assert over > 0, "no decode row over budget in four batches"
    assert dropped > 0
    if selection is None and case[1] > 1:  # per_kv_head: the KV heads' own choices were checked
        assert apart > 0


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "generic"])
def test_every_kernel_isa(cv, seed, isa):
    if isa not in cv.kernel_isas():
        pytest.skip(f"this CPU does not run {isa} (runs {cv.kernel_isas()})")
    rng = np.random.default_rng(seed)
    for case in CASES[:3]:
        for selection in (None, "shared"):
            run_case(cv, rng, case, isa=isa, selection=selection)


def test_topk_zero_keeps_sinks_and_window_only(cv, seed):
    """topk_chunks=0: StreamingLLM-style, a long decode row sees its first and last blocks."""
    rng = np.random.default_rng(seed)
    B, hq, hkv, D = 16, 4, 2, 64
    ev = cv.Eviction(budget_tokens=3 * B, sink_chunks=1, window_chunks=2, topk_chunks=0)
    pa = cv.PagedAttention(hq, hkv, D, B, eviction=ev)
    tables, lens, rows, N = [[3, 0, 5, 1, 4, 2]], [5 * B + 7], [1], 6
    pool = Pool(rng, N, hkv, B, D, "float32")
    K = Kind("numpy", "float32")
    kv = K.make(np.zeros((N, hkv, B, 2 * D)))
    digests = np.zeros(pa.digest_shape(N), np.float32)
    write_history(pa, K, pool, kv, digests, tables, lens, rows, tail_split=3)
    q64 = round_to(rng.uniform(-2, 2, size=(1, hq, D)), "float32")
    out = K.poison((1, hq, D))
    pa.run(pa.plan(*pack(tables, lens, rows), N), q64.astype(np.float32), kv, out, digests=digests)
    k, v = pool.history(tables[0], lens[0])
    idx = np.r_[0:B, 4 * B : lens[0]]
    want, _ = attention_reference(q64, k[idx], v[idx], len(idx) - 1)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)


@pytest.fixture
def budgeted(cv):
    B, hq, hkv, D, N = 16, 4, 2, 64, 8
    pa = cv.PagedAttention(hq, hkv, D, B, eviction=cv.Eviction(budget_tokens=4 * B, topk_chunks=1))
    kv = np.zeros((N, hkv, B, 2 * D), np.float32)
    digests = np.zeros(pa.digest_shape(N), np.float32)
    plan = pa.plan(np.array([[0, 1, 2, 3, 4, 5]], np.int32), np.array([6 * B], np.int32),
                   np.array([0, 1], np.int32), N)
    return pa, kv, digests, plan


@pytest.mark.parametrize("bad, exc, match", [
    (lambda d: d.astype(np.float64), TypeError, "digests: expected a float32 array"),
    (lambda d: d[:4], ValueError, r"digests: expected shape \[num_blocks=8"),
    (lambda d: np.zeros((8, 1, 2, 64), np.float32), ValueError, r"digests: expected shape .*got \[8, 1, 2, 64\]"),
    (lambda d: d.reshape(8, 2, 128), ValueError, "digests: expected shape"),
    (lambda d: np.zeros((8, 2, 2, 128), np.float32)[..., ::2], ValueError, "digests: expected a C-contiguous"),
    (lambda d: [[0.0]], TypeError, "digests"),
])
def test_bad_digests_are_named_and_nothing_is_written(cv, budgeted, bad, exc, match):
    pa, kv, digests, plan = budgeted
    d = bad(digests)
    k = np.ones((2, 2, 64), np.float32)
    kv0 = kv.copy()
    with pytest.raises(exc, match=match):
        pa.write_kv(kv, k, k, np.array([15, 31], np.int64), digests=d)
    np.testing.assert_array_equal(kv, kv0)
    out = np.full((1, 4, 64), 7.0, np.float32)
    with pytest.raises(exc, match=match):
        pa.run(plan, np.ones((1, 4, 64), np.float32), kv, out, digests=d)
    assert (out == 7.0).all()


def test_digests_need_an_eviction_config(cv):
    pa = cv.PagedAttention(4, 2, 64, 16)
    assert not pa.budgeted
    kv = np.zeros((4, 2, 16, 128), np.float32)
    digests = np.zeros((4, 2, 2, 64), np.float32)
    with pytest.raises(ValueError, match="digests: expected None: this PagedAttention was made without eviction"):
        pa.write_kv(kv, np.ones((1, 2, 64), np.float32), np.ones((1, 2, 64), np.float32), np.array([15], np.int64),
                    digests=digests)
    assert not kv.any()


@pytest.mark.parametrize("kw, match", [
    (dict(device_chunks=8), "eviction.device_chunks: expected None"),
    (dict(host_bytes=1 << 20, device_chunks=8), "eviction.device_chunks: expected None"),
    (dict(window_chunks=0), "eviction.window_chunks"),
    (dict(budget_tokens=16, topk_chunks=None), "eviction.budget_tokens: expected at least"),
    (dict(budget_tokens=64), r"eviction.topk_chunks: expected \(sink_chunks \+ window_chunks \+ topk_chunks\)"),
])
def test_bad_eviction_configs_are_named(cv, kw, match):
    args = dict(budget_tokens=256, topk_chunks=2) | kw
    with pytest.raises(ValueError, match=match):
        cv.PagedAttention(4, 2, 64, 16, eviction=cv.Eviction(**args))
    with pytest.raises(TypeError, match="eviction: expected a chunkvale.Eviction or None, got dict"):
        cv.PagedAttention(4, 2, 64, 16, eviction={"budget_tokens": 256})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_kv_head_selection_of_head_slices_equals_the_whole(cv, seed, dtype):
    """What tensor parallelism relies on: a rank holding a slice of the KV heads (and their query
    heads, digests and pool) selects and attends as one process does for those heads, with
    per-KV-head selection; with a shared selection, heads would depend on each other."""
    rng = np.random.default_rng(seed)
    hq, hkv, D, B = 8, 4, 64, 16
    K = Kind("torch" if dtype == "bfloat16" else "numpy", dtype)
    ev = cv.Eviction(budget_tokens=5 * B, sink_chunks=SINK, window_chunks=WINDOW, topk_chunks=2, selection="per_kv_head")
    whole = cv.PagedAttention(hq, hkv, D, B, dtype=dtype, eviction=ev, threads=1)
    while True:  # a batch with a decode row far enough over budget to select (drawn from the seed)
        tables, lens, rows, N = long_batch(rng, B, 5)
        if any(m == 1 and n > 7 * B for n, m in zip(lens, rows)):
            break
    pool = Pool(rng, N, hkv, B, D, dtype)
    kv = K.make(np.zeros((N, hkv, B, 2 * D)))
    digests = np.full(whole.digest_shape(N), np.nan, dtype=np.float32)
    write_history(whole, K, pool, kv, digests, tables, lens, rows, tail_split=3)
    T = sum(rows)
    q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), dtype)
    plan = cv.plan_paged(*pack(tables, lens, rows), N, block_size=B)
    out = K.poison((T, hq, D))
    whole.run(plan, K.make(q64), kv, out, digests=digests)
    # Scored, not dropped: with per-KV-head selection every candidate can be some head's pick (4
    # heads x top-2 of 3 candidates), so no block is dropped by all; each head still attends less.
    assert whole.selection_counts["scored_blocks"] > 0, "nothing over budget: the case checks nothing"
    g = hq // hkv
    for h0, h1 in ((0, 2), (2, 4)):  # two ranks of tensor parallelism 2
        rank = cv.PagedAttention(g * (h1 - h0), h1 - h0, D, B, dtype=dtype, eviction=ev, threads=1)
        part = K.poison((T, g * (h1 - h0), D))
        rank.run(plan, K.make(np.ascontiguousarray(q64[:, g * h0 : g * h1])),
                 K.make(K.to64(kv)[:, h0:h1]), part,
                 digests=np.ascontiguousarray(digests[:, h0:h1]))
        np.testing.assert_array_equal(K.to64(part), K.to64(out)[:, g * h0 : g * h1],
                                      err_msg=f"heads {h0}..{h1}: a slice selected or attended otherwise")
