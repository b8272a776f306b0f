"""chunkvale.PagedAttention (the stateless entry point) against the float64 reference, on
caller-owned pools in vLLM's CPU layout: random prefix trees of shared blocks at several depths,
block sizes, dtypes, head counts, batch orders, strided q/out/pool views, every kernel ISA this
CPU runs; and every bad argument named, with nothing written."""

import re

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
    # What those reads serve: each block once per user (and per row: one row each here).
    served = 8 * len(sys_blocks) + 4 * len(shot_blocks) + 2 * len(fork_blocks)
    assert plan.chunk_first_seq_blocks == served and plan.chunk_first_row_blocks == served
    assert plan.seq_blocks == sum(map(len, tables))
    extend = pa.plan(*pack(tables, lens, [3] * 8), 200)  # 3 new rows each, all in its own block
    assert extend.chunk_first_seq_blocks == served and extend.chunk_first_row_blocks == 3 * served
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


def test_plan_paged_needs_no_paged_attention(cv, seed):
    """A metadata builder plans with the free function; runners with other head counts, dtypes
    and threads run that plan like their own (the plan depends on block_size and
    share_threshold only)."""
    rng = np.random.default_rng(seed)
    B = 32
    tables, lens, rows, N = make_tree_batch(rng, B, 6, 30)
    args = (*pack(tables, lens, rows), N)
    for threshold in (1, 2, 4):
        free = cv.plan_paged(*args, block_size=B, share_threshold=threshold)
        own = cv.PagedAttention(9, 3, 64, B, share_threshold=threshold).plan(*args)
        for f in ("num_seqs", "num_tokens", "chunk_first_units", "chunk_first_blocks", "seq_blocks",
                  "chunk_first_seq_blocks", "chunk_first_row_blocks"):
            assert getattr(free, f) == getattr(own, f), (f, threshold)
    plan = cv.plan_paged(*args, block_size=B)  # share_threshold 2, PagedAttention's default
    T = sum(rows)
    for hq, hkv, D, dtype in ((9, 3, 64, "float32"), (8, 2, 128, "bfloat16")):
        pool = Pool(rng, N, hkv, B, D, dtype)
        q64 = round_to(rng.uniform(-2, 2, size=(T, hq, D)), dtype)
        K = Kind("torch" if dtype == "bfloat16" else "numpy", dtype)
        out = K.poison((T, hq, D))
        cv.PagedAttention(hq, hkv, D, B, dtype=dtype, threads=2).run(plan, K.make(q64), K.make(pool.vllm_layout()), out)
        ref_o, _, cond = reference(pool, tables, lens, rows, q64)
        assert_close(K.to64(out), ref_o, 0, 0, f"plan_paged {hq}/{hkv} d{D} {dtype}",
                     tol=out_tolerance(dtype, ref_o, cond))
    with pytest.raises(ValueError, match="plan: expected a plan for block_size 64, got one for 32"):
        cv.PagedAttention(9, 3, 64, 64).run(plan, np.zeros((T, 9, 64), np.float32),
                                            np.zeros((N, 3, 64, 128), np.float32), np.zeros((T, 9, 64), np.float32))
    for kw, match in (({"block_size": 24}, r"block_size: expected a multiple of 16 in \[16, 512\], got 24"),
                      ({"block_size": 1024}, r"block_size: expected an integer in .*16.*512.*got 1024"),
                      ({"block_size": B, "share_threshold": 0}, r"share_threshold: expected an integer in \[1, "),
                      ({"block_size": B, "share_threshold": 1.5}, "share_threshold")):
        with pytest.raises((ValueError, TypeError), match=match):
            cv.plan_paged(*args, **kw)
    with pytest.raises(TypeError):
        cv.plan_paged(*args)  # block_size has no default: a plan is for one block size


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


@pytest.mark.parametrize(
    "shape",
    [dict(kv_heads=0), dict(q_heads=0), dict(q_heads=6, kv_heads=4), dict(head_dim=72), dict(kv_heads=70000, q_heads=70000),
     dict(q_heads=70000, kv_heads=2), dict(sm_scale=float("inf")), dict(sm_scale=-0.5),
     dict(sm_scale=1e-60), dict(sm_scale=1e39)],  # 1e-60 rounds to 0 in float32: never the default scale
)
def test_shape_rules_are_the_cache_configs(cv, shape):
    """PagedAttention and KVCache share one AttentionShape::validate (and one sm_scale check at the
    boundary): the same bad shape gets the same message from both fronts."""
    args = dict(q_heads=4, kv_heads=2, head_dim=64, **{"sm_scale": None})
    args.update(shape)
    with pytest.raises(ValueError) as paged:
        cv.PagedAttention(args["q_heads"], args["kv_heads"], args["head_dim"], 16, sm_scale=args["sm_scale"])
    with pytest.raises(ValueError) as cache:
        cv.KVCache(cv.CacheConfig(layers=1, chunk_size=16, capacity_chunks=4, **args))
    assert str(paged.value) == str(cache.value)
    field = next(iter(shape))
    assert str(paged.value).startswith(f"{field}: expected"), str(paged.value)
    # 4096 < heads <= 65536 is a shape both accept (PagedAttention once stopped at 4096).
    cv.PagedAttention(4100, 4100, 64, 16, threads=1)


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
    with pytest.raises(ValueError, match=r"lse: expected shape \[3, 4\], got \[3, 5\]"):
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


# --------------------------------------------------------------------------------------------
# outputs that share memory with an input or with the pool: refused, nothing written
# --------------------------------------------------------------------------------------------


class Aliasing:
    """A budgeted PagedAttention over one pool of 8 blocks (16 tokens, 2 KV heads of dim 64), its
    digests, and a one-step batch of 3 query rows; each argument a fresh array the table may
    replace with a view into another's memory."""

    B, HQ, HKV, D, N, T = 16, 4, 2, 64, 8, 3

    def __init__(self, cv):
        rng = np.random.default_rng(5)
        self.pa = cv.PagedAttention(self.HQ, self.HKV, self.D, self.B,
                                    eviction=cv.Eviction(budget_tokens=4 * self.B, topk_chunks=1))
        self.kv = rng.standard_normal((self.N, self.HKV, self.B, 2 * self.D)).astype(np.float32)
        self.digests = rng.standard_normal(self.pa.digest_shape(self.N)).astype(np.float32)
        self.plan = self.pa.plan(*pack([[0, 1, 2], [0, 1, 3]], [40, 36], [2, 1]), self.N)
        self.q = rng.standard_normal((self.T, self.HQ, self.D)).astype(np.float32)
        self.out = np.full((self.T, self.HQ, self.D), 7.0, np.float32)
        self.lse = np.full((self.T, self.HQ), 7.0, np.float32)
        self.k = rng.standard_normal((2, self.HKV, self.D)).astype(np.float32)
        self.v = rng.standard_normal((2, self.HKV, self.D)).astype(np.float32)
        self.slots = np.array([15, 36], np.int64)  # block 0's last row (its digest), block 2's row 4

    def run(self, digests=True):
        self.pa.run(self.plan, self.q, self.kv, self.out, self.lse, self.digests if digests else None)

    def write_kv(self):
        self.pa.write_kv(self.kv, self.k, self.v, self.slots, digests=self.digests)

    def snapshot(self):
        return [np.array(a, copy=True).tobytes() for a in (self.kv, self.digests, self.q, self.out, self.lse,
                                                           self.k, self.v, self.slots)]


def _view(buf, shape, dtype=np.float32, offset=0):
    """An array of `shape` over buf's bytes from byte `offset` (the memory of another argument)."""
    flat = buf.reshape(-1).view(np.uint8)[offset:]
    return flat[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


def _aliasing_cases():
    """(id, what replaces an argument, the call, the message)."""
    T, HQ, D, HKV, B = Aliasing.T, Aliasing.HQ, Aliasing.D, Aliasing.HKV, Aliasing.B
    cases = []

    def add(name, setup, call, match):
        cases.append(pytest.param(setup, call, match, id=name))

    run, write = Aliasing.run, Aliasing.write_kv
    add("run-lse-over_q", lambda w: setattr(w, "lse", _view(w.q, (T, HQ))), run, "lse: expected memory apart from q")
    def lse_over_q_tail(w):  # lse starts inside q's last row
        buf = np.zeros(w.q.size + T * HQ, np.float32)
        buf[: w.q.size] = w.q.reshape(-1)
        w.q, w.lse = buf[: w.q.size].reshape(w.q.shape), buf[w.q.size - 4 : w.q.size - 4 + T * HQ].reshape(T, HQ)
    add("run-lse-over_q_tail", lse_over_q_tail, run, "lse: expected memory apart from q")
    add("run-lse-over_out", lambda w: setattr(w, "lse", _view(w.out, (T, HQ))), run,
        "lse: expected memory apart from out")
    add("run-out-over_kv_cache", lambda w: setattr(w, "out", _view(w.kv, (T, HQ, D), offset=4096)), run,
        "out: expected memory apart from kv_cache")
    add("run-lse-over_kv_cache", lambda w: setattr(w, "lse", _view(w.kv, (T, HQ), offset=w.kv.nbytes - T * HQ * 4)), run,
        "lse: expected memory apart from kv_cache")
    add("run-out-over_digests", lambda w: setattr(w, "out", _view(w.digests, (T, HQ, D))), run,
        "out: expected memory apart from digests")
    add("run-lse-over_digests", lambda w: setattr(w, "lse", _view(w.digests, (T, HQ), offset=64)), run,
        "lse: expected memory apart from digests")

    def shifted_q(w):  # q and out one row apart in one buffer
        buf = np.zeros((T + 1, HQ, D), np.float32)
        buf[:T] = w.q
        w.q, w.out = buf[:T], buf[1:]
    add("run-out-over_q_shifted", shifted_q, run, "out: expected memory apart from q")
    add("run-out-over_q_dense", shifted_q, lambda w: w.run(digests=False), "out: expected memory apart from q")
    add("write_kv-digests-over_kv_cache", lambda w: setattr(w, "digests", _view(w.kv, w.digests.shape)), write,
        "digests: expected memory apart from kv_cache")
    add("write_kv-digests-over_k", lambda w: setattr(w, "k", _view(w.digests, w.k.shape, offset=256)), write,
        "digests: expected memory apart from k")

    def k_from_its_slots(w):  # k's row of head 0 is the very pool row write_kv writes it to
        w.k = _view(w.kv, (1, HKV, D), offset=w.kv[0, 0, 15].ctypes.data - w.kv.ctypes.data)
        w.v, w.slots = w.v[:1].copy(), np.array([15], np.int64)
    add("write_kv-k-from_its_own_slot", k_from_its_slots, write, "kv_cache: expected memory apart from k")
    add("write_kv-v-from_other_blocks", lambda w: setattr(w, "v", _view(w.kv, w.v.shape, offset=5 * 2 * B * 2 * D * 4)),
        write, "kv_cache: expected memory apart from v")
    def slots_in_the_pool(w):
        w.slots = _view(w.kv, (2,), np.int64, offset=8 * 1024)
        w.slots[:] = [15, 36]
    add("write_kv-slot_mapping-in_kv_cache", slots_in_the_pool, write, "kv_cache: expected memory apart from slot_mapping")
    return cases


@pytest.mark.parametrize("setup,call,match", _aliasing_cases())
def test_outputs_over_inputs_or_the_pool_are_refused_and_nothing_changes(cv, setup, call, match):
    w = Aliasing(cv)
    setup(w)
    before = w.snapshot()
    with pytest.raises(ValueError, match=match):
        call(w)
    assert w.snapshot() == before, "the refused call wrote something"
    fresh = Aliasing(cv)  # the same call with apart arguments runs
    call(fresh)


def test_zero_rows_and_lse_dtypes(cv):
    pa = cv.PagedAttention(4, 2, 64, 16)
    plan = pa.plan(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), np.zeros(1, np.int32), 0)
    lse = np.zeros((0, 4), np.float32)  # numpy gives it strides (0, 0)
    pa.run(plan, np.zeros((0, 4, 64), np.float32), np.zeros((0, 2, 16, 128), np.float32),
           np.zeros((0, 4, 64), np.float32), lse)
    plan = pa.plan(*pack([[0, 1, 2], [0, 1, 3]], [40, 36], [2, 1]), 8)
    kv, q, out = np.zeros((8, 2, 16, 128), np.float32), np.ones((3, 4, 64), np.float32), np.full((3, 4, 64), 7.0, np.float32)
    for bad, exc, match in [
        (np.zeros((3, 4), np.float64), TypeError, "lse: expected dtype float32, got float64"),
        (np.zeros((3, 4), np.int32), TypeError, "lse: expected dtype float32, got int32"),
        (np.zeros((3, 5), np.float32), ValueError, r"lse: expected shape \[3, 4\], got \[3, 5\]"),
        (np.zeros((3, 4, 1), np.float32), ValueError, r"lse: expected shape \[3, 4\], got \[3, 4, 1\]"),
        (np.zeros((4, 3), np.float32).T, ValueError, r"lse: expected a C-contiguous tensor .* got strides \(1, 3\)"),
    ]:
        with pytest.raises(exc, match=match):
            pa.run(plan, q, kv, out, bad)
        assert (out == 7.0).all()


def test_every_message_about_slots_digests_and_lse_says_what_was_given(cv, torch):
    """Each names the argument, what was expected and what was given."""
    ev = cv.Eviction(budget_tokens=64, topk_chunks=1)
    pa = cv.PagedAttention(4, 2, 64, 16, eviction=ev)
    plain = cv.PagedAttention(4, 2, 64, 16)
    kv = np.zeros((8, 2, 16, 128), np.float32)
    k = np.ones((2, 2, 64), np.float32)
    d = np.zeros(pa.digest_shape(8), np.float32)
    plan = pa.plan(*pack([[0, 1, 2], [0, 1, 3]], [40, 36], [2, 1]), 8)
    q, out = np.ones((3, 4, 64), np.float32), np.zeros((3, 4, 64), np.float32)
    calls = [
        (lambda: pa.write_kv(kv, k, k, np.array([1, 2], np.int32)), TypeError, "slot_mapping", "got numpy.ndarray"),
        (lambda: pa.write_kv(kv, k, k, np.array([[1, 2]], np.int64)), ValueError, "slot_mapping", r"got shape \(1, 2\)"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 9, 2, 9], np.int64)[::2]), ValueError, "slot_mapping",
         "got stride 2"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 128], np.int64)), ValueError, "slot_mapping", "got 128 at row 1"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 2], np.int64), digests=d.astype(np.float64)), TypeError,
         "digests", "got numpy.ndarray of dtype float64"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 2], np.int64), digests=d.reshape(8, 2, 128)), ValueError,
         "digests", r"got shape \(8, 2, 128\)"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 2], np.int64), digests=np.zeros((8, 2, 2, 128), np.float32)[..., ::2]),
         ValueError, "digests", r"got strides \(512, 256, 128, 2\)"),
        (lambda: pa.write_kv(kv, k, k, np.array([1, 2], np.int64), digests=d[:4]), ValueError, "digests",
         r"got \[4, 2, 2, 64\]"),
        (lambda: plain.write_kv(kv, k, k, np.array([1, 2], np.int64), digests=d), ValueError, "digests",
         "got a digest tensor of 8 blocks"),
        (lambda: pa.run(plan, q, kv, out, np.zeros((3, 4), np.float64)), TypeError, "lse", "got float64"),
        (lambda: pa.run(plan, q, kv, out, np.zeros((2, 4), np.float32)), ValueError, "lse", r"got \[2, 4\]"),
        (lambda: pa.run(plan, q, kv, out, torch.zeros((3, 4), dtype=torch.bfloat16)), TypeError, "lse", "got bfloat16"),
    ]
    for call, exc, arg, given in calls:
        with pytest.raises(exc) as ei:
            call()
        msg = str(ei.value)
        assert msg.startswith(arg + ": expected"), msg
        assert re.search(given, msg), f"{msg!r} does not say what was given ({given!r})"
    assert not kv.any() and not d.any() and not out.any()


@pytest.mark.parametrize("value, exc, match", [
    (True, TypeError, r"sm_scale: expected a float or None, got bool \(True\)"),
    (np.True_, TypeError, "sm_scale: expected a float or None, got numpy.bool"),
    ("0.1", TypeError, "sm_scale: expected a float or None, got str"),
    (2**1100, ValueError, "sm_scale: expected a finite value > 0 within float32's range"),
    (1e39, ValueError, "sm_scale: expected a finite value > 0 within float32's range .*got 1e\\+39"),
    (1e-60, ValueError, "sm_scale: expected a finite value > 0"),
    (float("nan"), ValueError, "sm_scale"), (-1, ValueError, "sm_scale"), (0, ValueError, "sm_scale"),
])
def test_bad_sm_scale_is_named(cv, value, exc, match):
    with pytest.raises(exc, match=match):
        cv.PagedAttention(4, 2, 64, 16, sm_scale=value)


def test_good_sm_scale_of_other_kinds(cv):
    outs = []
    for scale in (0.125, 1 / 8, np.float64(0.125), None):  # 1/sqrt(64) each
        pa = cv.PagedAttention(4, 2, 64, 16, sm_scale=scale)
        plan = pa.plan(*pack([[0, 1]], [20], [2]), 2)
        kv = np.random.default_rng(0).standard_normal((2, 2, 16, 128)).astype(np.float32)
        out = np.zeros((2, 4, 64), np.float32)
        pa.run(plan, np.ones((2, 4, 64), np.float32), kv, out)
        outs.append(out)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
