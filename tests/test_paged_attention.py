"""chunkvale.PagedAttention (the stateless entry point) against the float64 reference, on
caller-owned pools in vLLM's CPU layout: random prefix trees of shared blocks at several depths,
block sizes, dtypes, head counts, batch orders, strided q/out/pool views, every kernel ISA this
CPU runs; and every bad argument named, with nothing written."""

import numpy as np
import pytest

from paged_pool import Pool, make_tree_batch, pack
from reference import Kind, assert_close, attention_reference, out_tolerance, lse_tolerance, round_to


def reference(pool, tables, lens, rows, q64, sm_scale=None):
    outs, lses, conds = [], [], []
    r0 = 0
    for t, n, m in zip(tables, lens, rows):
        k, v = pool.history(t, n)
        o, l, c = attention_reference(q64[r0 : r0 + m], k, v, n - m, sm_scale=sm_scale, return_cond=True)
        outs.append(o), lses.append(l), conds.append(c)
        r0 += m
    return np.concatenate(outs), np.concatenate(lses), np.concatenate(conds)


CASES = [  # (q_heads, kv_heads, head_dim, block_size, dtype, kind)
    (9, 3, 64, 32, "float32", "numpy"),
    (32, 8, 128, 128, "float32", "torch"),
    (4, 4, 80, 16, "float16", "numpy"),
    (8, 1, 96, 48, "bfloat16", "torch"),
    (6, 2, 256, 64, "bfloat16", "torch"),
    (8, 2, 64, 128, "float16", "torch"),
]


def run_case(cv, rng, case, isa="", n_seqs=None, order=None):
    hq, hkv, D, B, dtype, kind = case
    K = Kind(kind, dtype)
    n_seqs = n_seqs or int(rng.integers(1, 10))
    tables, lens, rows, N = make_tree_batch(rng, B, n_seqs, max_rows=40)
    if order is not None:
        tables, lens, rows = [tables[i] for i in order], [lens[i] for i in order], [rows[i] for i in order]
    pool = Pool(rng, N, hkv, B, D, dtype)
    T = sum(rows)
    q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), dtype)
    pa = cv.PagedAttention(hq, hkv, D, B, dtype=dtype, kernel_isa=isa)
    bt, sl, qsl = pack(tables, lens, rows)
    plan = pa.plan(bt, sl, qsl, N)
    kv = K.make(pool.vllm_layout())
    q = K.make(q64)
    out = K.poison((T, hq, D))
    lse = np.full((T, hq), np.nan, dtype=np.float32)
    pa.run(plan, q, kv, out, lse)
    ref_o, ref_l, cond = reference(pool, tables, lens, rows, q64)
    assert_close(K.to64(out), ref_o, 0, 0, f"out {case} isa={isa or 'best'}", tol=out_tolerance(dtype, ref_o, cond, isa))
    assert_close(lse, ref_l, 0, 0, f"lse {case}", tol=lse_tolerance(ref_l, cond))
    return plan, tables, lens, rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}-b{c[3]}-{c[4]}-{c[5]}")
def test_random_trees_match_float64_reference(cv, seed, case):
    rng = np.random.default_rng(seed)
    shared_seen = 0
    for _ in range(6):
        plan, *_ = run_case(cv, rng, case)
        shared_seen += plan.chunk_first_units
    assert shared_seen > 0, "no batch of six ran a shared block chunk-first"


@pytest.mark.parametrize("isa", ["amx_bf16", "avx512bf16", "avx512", "avx2", "generic"])
def test_every_kernel_isa(cv, seed, isa):
    if isa not in cv.kernel_isas():
        pytest.skip(f"this CPU does not run {isa} (runs {cv.kernel_isas()})")
    rng = np.random.default_rng(seed)
    for case in (CASES[0], CASES[3], CASES[2]):
        run_case(cv, rng, case, isa=isa, n_seqs=6)


def test_batch_order_does_not_change_results(cv, seed):
    case = (9, 3, 64, 32, "float32", "numpy")
    for perm_seed in range(3):
        rng = np.random.default_rng(seed)
        n = 7
        order = np.random.default_rng(perm_seed).permutation(n).tolist()
        run_case(cv, rng, case, n_seqs=n, order=order)


def test_shared_prefix_depths_are_planned_chunk_first(cv):
    """A system prompt under everyone, a few-shot block under half, forks by n > 1 under that:
    every level several sequences use is one chunk-first run, nothing else is."""
    B = 32
    sys_blocks, shot_blocks, fork_blocks = [0, 1, 2, 3], [10, 11], [20]
    tables = []
    for i in range(8):
        t = list(sys_blocks)
        if i < 4:
            t += shot_blocks
            if i < 2:
                t += fork_blocks
        t += [100 + i]  # own, partly filled (the decode row lands here)
        tables.append(t)
    lens = [(len(t) - 1) * B + 5 for t in tables]
    rows = [1] * 8
    pa = cv.PagedAttention(9, 3, 64, B)
    plan = pa.plan(*pack(tables, lens, rows), 200)
    assert plan.num_seqs == 8 and plan.num_tokens == 8
    assert plan.chunk_first_units == 3  # system (8 users), few-shot (4), fork (2)
    assert plan.chunk_first_blocks == len(sys_blocks) + len(shot_blocks) + len(fork_blocks)
    lone = cv.PagedAttention(9, 3, 64, B, share_threshold=9)  # more rows than the batch has
    assert lone.plan(*pack(tables, lens, rows), 200).chunk_first_units == 0


def test_strided_views_are_read_in_place(cv, seed, torch):
    """q and out as views into fused buffers, the pool as one layer of a multi-layer tensor."""
    rng = np.random.default_rng(seed)
    hq, hkv, D, B = 8, 2, 64, 32
    tables, lens, rows, N = make_tree_batch(rng, B, 6, 20)
    pool = Pool(rng, N, hkv, B, D, "float32")
    T = sum(rows)
    q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), "float32")
    layers = torch.zeros((3, N, hkv, B, 2 * D), dtype=torch.float32)
    layers[1] = torch.from_numpy(pool.vllm_layout())
    qkv = torch.zeros((T, (hq + 2 * hkv) * D), dtype=torch.float32)
    qkv[:, : hq * D] = torch.from_numpy(q64.reshape(T, hq * D))
    q = qkv[:, : hq * D].view(T, hq, D)  # row stride (hq + 2 hkv) D
    assert not q.is_contiguous()
    wide = torch.full((T, 2 * hq * D), float("nan"))
    out = wide[:, hq * D :].view(T, hq, D)
    pa = cv.PagedAttention(hq, hkv, D, B)
    plan = pa.plan(*pack(tables, lens, rows), N)
    pa.run(plan, q, layers[1], out)
    ref_o, _, cond = reference(pool, tables, lens, rows, q64)
    assert_close(out.double().numpy(), ref_o, 0, 0, "strided out", tol=out_tolerance("float32", ref_o, cond))
    assert torch.isnan(wide[:, : hq * D]).all(), "wrote outside out"


def test_one_plan_serves_every_layer(cv, seed):
    rng = np.random.default_rng(seed)
    case = (9, 3, 64, 32, "float32", "numpy")
    hq, hkv, D, B, dtype, _ = case
    tables, lens, rows, N = make_tree_batch(rng, B, 5, 30)
    pa = cv.PagedAttention(hq, hkv, D, B)
    plan = pa.plan(*pack(tables, lens, rows), N)
    T = sum(rows)
    for layer in range(3):
        pool = Pool(rng, N, hkv, B, D, dtype)
        q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), dtype)
        out = np.full((T, hq, D), np.nan, dtype=np.float32)
        pa.run(plan, q64.astype(np.float32), pool.vllm_layout().astype(np.float32), out)
        ref_o, _, cond = reference(pool, tables, lens, rows, q64)
        assert_close(out, ref_o, 0, 0, f"layer {layer}", tol=out_tolerance(dtype, ref_o, cond))


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small(cv):
    pa = cv.PagedAttention(4, 2, 64, 16)
    tables, lens, rows = [[0, 1, 2], [0, 1, 3]], [40, 36], [2, 1]
    bt, sl, qsl = pack(tables, lens, rows)
    return pa, bt, sl, qsl


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(q_heads=5), ValueError, "q_heads: expected a multiple of kv_heads=2, got 5"),
        (dict(head_dim=72), ValueError, "head_dim: expected one of"),
        (dict(block_size=40), ValueError, "block_size: expected a multiple of 16"),
        (dict(dtype="int8"), ValueError, "dtype: expected"),
        (dict(threads=-1), ValueError, "threads: expected"),
        (dict(share_threshold=0), ValueError, "share_threshold"),
        (dict(sm_scale=-1.0), ValueError, "sm_scale"),
        (dict(kernel_isa="sse9"), ValueError, "kernel_isa"),
        (dict(q_heads=True), TypeError, "q_heads"),
        (dict(cpus=3), TypeError, "cpus: expected a list of CPU numbers or None, got int"),
        (dict(cpus=[-1]), ValueError, "cpus: expected an integer in"),
        (dict(cpus=[1023], threads=2), ValueError, "cpus: could not pin a worker thread to CPU 1023"),
    ],
)
def test_bad_config_is_named(cv, kw, exc, match):
    args = dict(q_heads=4, kv_heads=2, head_dim=64, block_size=16)
    args.update(kw)
    with pytest.raises(exc, match=match):
        cv.PagedAttention(**args)


def test_bad_page_tables_are_named(cv, small):
    pa, bt, sl, qsl = small
    bad = [
        ((bt.astype(np.int64), sl, qsl, 8), TypeError, "block_table: expected an int32 array"),
        ((bt[:1], sl, qsl, 8), ValueError, r"block_table: expected one row per sequence \(2\), got 1"),
        ((bt, sl, qsl[:2], 8), ValueError, "query_start_loc: expected num_seqs \\+ 1 = 3 offsets"),
        ((bt, sl, np.array([1, 3, 4], np.int32), 8), ValueError, "query_start_loc: expected 0 first, got 1"),
        ((bt, sl, np.array([0, 3, 2], np.int32), 8), ValueError, "query_start_loc: expected non-decreasing"),
        ((bt, np.array([1, 36], np.int32), qsl, 8), ValueError, "seq_lens: expected at least the sequence's 2 new"),
        ((bt, np.array([40, 49], np.int32), qsl, 8), ValueError, "seq_lens: expected at most table_width"),
        ((bt, sl, qsl, 3), ValueError, r"block_table: expected block ids in \[0, num_blocks=3\).*got 3 at entry 2"),
        ((np.array([[0, 1, 1], [0, 1, 3]], np.int32), sl, qsl, 8), ValueError, "distinct blocks within a sequence"),
        ((np.array([[0, 1, 2], [1, 0, 3]], np.int32), sl, qsl, 8), ValueError, "at the same entry in each"),
        ((bt, sl, qsl, -1), ValueError, "num_blocks"),
        ((bt, sl.astype(np.float32), qsl, 8), TypeError, "seq_lens: expected an int32 array"),
        ((bt, sl, qsl.reshape(1, 3), 8), ValueError, "query_start_loc: expected 1 dimensions"),
        ((bt, "x", qsl, 8), TypeError, "seq_lens"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            pa.plan(*args)
    assert pa.plan(bt, sl, qsl, 8).num_tokens == 3  # the good batch still plans


def test_bad_run_arguments_are_named_and_nothing_is_written(cv, small, torch):
    pa, bt, sl, qsl = small
    plan = pa.plan(bt, sl, qsl, 8)
    kv = np.zeros((8, 2, 16, 128), np.float32)
    q = np.zeros((3, 4, 64), np.float32)
    out = np.full((3, 4, 64), np.nan, np.float32)
    bad = [
        ((plan, q, kv[:3], out), ValueError, "kv_cache: expected at least the plan's num_blocks=8 blocks, got 3"),
        ((plan, q, kv.astype(np.float16), out), TypeError, "kv_cache: expected dtype float32"),
        ((plan, q, np.zeros((8, 2, 16, 96), np.float32), out), ValueError, "kv_cache: expected blocks of 16 tokens"),
        ((plan, q, kv.reshape(8, 2, 2048), out), ValueError, "kv_cache: expected vLLM's CPU layout"),
        ((plan, q, kv[:, :, ::2], out), ValueError, "kv_cache: expected blocks of 16|kv_cache: expected each"),
        ((plan, q[:2], kv, out), ValueError, r"q: expected shape \[3, 4, 64\], got \[2, 4, 64\]"),
        ((plan, q.astype(np.float16), kv, out), TypeError, "q: expected dtype float32"),
        ((plan, q, kv, out[:, :, ::2]), ValueError, "out: expected shape"),
        ((plan, q.transpose(1, 0, 2), kv, out), ValueError, "q: expected shape"),
        ((plan, q, kv, out.transpose(0, 2, 1).copy().transpose(0, 2, 1)), ValueError, "out: expected contiguous"),
        ((plan, out, kv, out), ValueError, "out: expected memory apart from q"),
        (("plan", q, kv, out), TypeError, "plan: expected a PagedPlan"),
        ((plan, q, kv, out[:0]), ValueError, r"out: expected shape \[3, 4, 64\], got \[0, 4, 64\]"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            pa.run(*args)
        assert np.isnan(out).all(), f"{match}: out was written"
    with pytest.raises(ValueError, match=r"lse: expected a C-contiguous float32 tensor of shape \[3, 4\]"):
        pa.run(plan, q, kv, out, np.zeros((3, 5), np.float32))
    other = cv.PagedAttention(4, 2, 64, 32)
    with pytest.raises(ValueError, match="plan: expected a plan for block_size 32, got one for 16"):
        other.run(plan, q, np.zeros((8, 2, 32, 128), np.float32), out)
    assert np.isnan(out).all()
    pa.run(plan, q, kv, out)  # the good call runs
    assert np.isfinite(out).all()


def test_workers_pinned_to_cpus_give_the_same_results(cv, seed):
    """cpus pins the worker threads (vLLM pins its own threads, and new ones inherit that)."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    rng = np.random.default_rng(seed)
    case = (9, 3, 64, 32, "float32", "numpy")
    pa = cv.PagedAttention(9, 3, 64, 32, threads=2, cpus=cpus)
    assert pa.cpus == cpus
    hq, hkv, D, B = case[:4]
    tables, lens, rows, N = make_tree_batch(rng, B, 6, 20)
    pool = Pool(rng, N, hkv, B, D, "float32")
    T = sum(rows)
    q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), "float32")
    out = np.full((T, hq, D), np.nan, np.float32)
    pa.run(pa.plan(*pack(tables, lens, rows), N), q64.astype(np.float32), pool.vllm_layout().astype(np.float32), out)
    ref_o, _, cond = reference(pool, tables, lens, rows, q64)
    assert_close(out.astype(np.float64), ref_o, 0, 0, "pinned", tol=out_tolerance("float32", ref_o, cond))


def test_empty_batch(cv):
    pa = cv.PagedAttention(4, 2, 64, 16)
    plan = pa.plan(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), np.zeros(1, np.int32), 0)
    assert plan.num_tokens == 0
    pa.run(plan, np.zeros((0, 4, 64), np.float32), np.zeros((0, 2, 16, 128), np.float32),
           np.zeros((0, 4, 64), np.float32))
