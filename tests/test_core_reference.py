"""chunkvale attention against the dense float64 reference.

Every step runs every layer with fresh queries, NaN-poisoned outputs, and compares each row
(and its natural-log LSE) with tests/reference.py over the sequence's whole token history:
random prefix trees (shared prefixes of random lengths, matches into the middle of a chunk,
forks, removals, cached prefixes reused after removal, namespaces), interleaved prefill /
extend / decode steps mixed in one batch in random order, chunk sizes 16-128, GQA/MQA/MHA,
head dims 64/80/96/128/256, float32/float16, both attention paths (share_threshold), 1 and 2
threads. bfloat16 runs through torch tensors in test_core_torch.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from reference import (
    Shadow,
    assert_close,
    attention_reference,
    extend_hashes,
    kernel_isa_params,
    kv_for,
    merge_lse,
    naive_attention,
    namespace_seed,
    round_to,
)

NEVER = 1 << 30  # share_threshold that no chunk reaches: sequence-first only
try:
    import chunkvale as _cv
    ISAS = _cv.kernel_isas()  # every CPU kernel path this machine runs
except ImportError:  # the cv fixture fails the tests with a clear message
    ISAS = [None]

# --------------------------------------------------------------------------------------
# the reference itself (needs no chunkvale)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,n_past,hq,hkv,d", [(3, 5, 4, 2, 8), (1, 0, 3, 1, 5), (4, 0, 2, 2, 4),
                                               (2, 7, 6, 3, 3), (5, 2, 9, 3, 6)])
def test_reference_matches_naive_loops(seed, n, n_past, hq, hkv, d):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, hq, d)) * 3
    k = rng.standard_normal((n_past + n, hkv, d))
    v = rng.standard_normal((n_past + n, hkv, d))
    scale = float(rng.uniform(0.1, 1.0))
    o, l = attention_reference(q, k, v, n_past, scale)
    o2, l2 = naive_attention(q, k, v, n_past, scale)
    np.testing.assert_allclose(o, o2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l, l2, rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_sdpa_float64(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    n, n_past, hq, hkv, d = 7, 33, 9, 3, 16
    q = rng.standard_normal((n, hq, d))
    k = rng.standard_normal((n_past + n, hkv, d))
    v = rng.standard_normal((n_past + n, hkv, d))
    o, _ = attention_reference(q, k, v, n_past)
    g = hq // hkv
    kk = torch.from_numpy(np.repeat(k, g, axis=1)).permute(1, 0, 2)
    vv = torch.from_numpy(np.repeat(v, g, axis=1)).permute(1, 0, 2)
    qq = torch.from_numpy(q).permute(1, 0, 2)
    mask = torch.from_numpy(np.arange(n_past + n)[None, :] <= (n_past + np.arange(n))[:, None])
    ot = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
    np.testing.assert_allclose(o, ot.permute(1, 0, 2).numpy(), rtol=1e-12, atol=1e-12)


def test_reference_lse_is_natural_log_and_merges(seed):
    rng = np.random.default_rng(seed)
    n_past, hq, hkv, d = 40, 4, 2, 8
    q = rng.standard_normal((1, hq, d)) * 2
    k = rng.standard_normal((n_past + 1, hkv, d))
    v = rng.standard_normal((n_past + 1, hkv, d))
    o, l = attention_reference(q, k, v, n_past, 0.5)
    # lse = log(sum exp(scaled scores)), natural log
    s = 0.5 * np.einsum("hd,lhd->hl", q[0], np.repeat(k, 2, axis=1))
    np.testing.assert_allclose(l[0], np.log(np.exp(s).sum(-1)), rtol=1e-13)
    # two halves merged through their LSE give the whole (the property callers rely on)
    cut = 17
    o1, l1 = attention_reference(q, k[:cut], v[:cut], cut - 1, 0.5)
    qa = q
    s2 = 0.5 * np.einsum("hd,lhd->hl", qa[0], np.repeat(k[cut:], 2, axis=1))
    w = np.exp(s2 - s2.max(-1, keepdims=True))
    o2 = (w[..., None] * np.repeat(v[cut:], 2, axis=1).transpose(1, 0, 2)).sum(1) / w.sum(-1)[:, None]
    l2 = s2.max(-1) + np.log(w.sum(-1))
    om, lm = merge_lse(o1[0], l1[0], o2, l2)
    np.testing.assert_allclose(om, o[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lm, l[0], rtol=1e-13)


def test_test_kv_is_a_function_of_namespace_and_prefix():
    toks = list(range(100, 300))
    h1 = extend_hashes([], toks, namespace_seed(""))
    h2 = extend_hashes([], toks[:150] + [7] + toks[151:], namespace_seed(""))
    h3 = extend_hashes([], toks, namespace_seed("other"))
    k1, v1 = kv_for(h1, 0, 2, 64)
    k2, _ = kv_for(h2, 0, 2, 64)
    k3, _ = kv_for(h3, 0, 2, 64)
    k1l1, _ = kv_for(h1, 1, 2, 64)
    np.testing.assert_array_equal(k1[:150], k2[:150])  # same prefix, same K/V
    assert not np.any(np.all(k1[150:] == k2[150:], axis=(1, 2)))  # diverged prefix: all differ
    assert not np.any(np.all(k1 == k3, axis=(1, 2)))  # other namespace: all differ
    assert not np.any(np.all(k1 == k1l1, axis=(1, 2)))  # other layer: differ
    assert abs(k1.std() - 1) < 0.05 and abs(v1.mean()) < 0.05


def test_tolerance_helper_reports_nan_rows():
    want = np.zeros((3, 2, 4))
    got = want.copy()
    got[1] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(got, want, 1e-6, 1e-6, "x")


# --------------------------------------------------------------------------------------
# random trees
# --------------------------------------------------------------------------------------

VOCAB = 50_000


def _fresh(rng, n):
    return [int(t) for t in rng.integers(0, VOCAB, size=int(n))]


def random_scenario(sh: Shadow, rng, n_ops: int, max_prompt: int, max_new: int, max_live: int = 8,
                    namespaces=("", "", "", "tenant-b")):
    """Random operations on a Shadow; every step is checked against the reference."""
    bases = [_fresh(rng, max_prompt) for _ in range(3)]
    C = sh.C

    def new_prompt():
        r = rng.random()
        if r < 0.45:  # a prefix of a base of random length (cuts into chunks) + private suffix
            base = bases[int(rng.integers(len(bases)))]
            cut = int(rng.integers(0, max_prompt + 1))
            p = base[:cut] + _fresh(rng, rng.integers(0 if cut else 1, max(2, max_prompt - cut + 1)))
        elif r < 0.65 and sh.seqs:  # continue some live sequence's committed history
            sm = sh.seqs[list(sh.seqs)[int(rng.integers(len(sh.seqs)))]]
            cut = int(rng.integers(0, sm.length + 1))
            p = sm.tokens[:cut] + _fresh(rng, rng.integers(0 if cut else 1, C + 2))
        elif r < 0.8:  # exactly a whole-chunk multiple of a base (full match, no partial)
            base = bases[int(rng.integers(len(bases)))]
            p = base[:C * int(rng.integers(1, max(2, max_prompt // C + 1)))]
        elif r < 0.9:  # a different base prefix followed by a shared tail chunk (same chunk
            # tokens under another parent must not match)
            p = _fresh(rng, C) + bases[0][C:2 * C + int(rng.integers(0, C))]
        else:
            p = _fresh(rng, rng.integers(1, max_prompt + 1))
        return p[:max_prompt] or _fresh(rng, 1)

    # a "system prompt" prefilled first, so that later prompts find cached prefixes
    first, _ = sh.add(bases[0][:int(rng.integers(C, max_prompt + 1))])
    sh.run_step([(first, sh.seqs[first].pending)])
    for _ in range(n_ops):
        r = rng.random()
        if not sh.seqs or (r < 0.32 and len(sh.seqs) < max_live):
            for _ in range(int(rng.integers(1, 4))):
                p = new_prompt()
                ns = namespaces[int(rng.integers(len(namespaces)))]
                mr = len(p) - 1 if rng.random() < 0.2 else None
                sh.add(p, namespace=ns, max_reuse=mr)
        elif r < 0.74:
            live = sh.live()
            rng.shuffle(live)
            batch = live[:int(rng.integers(1, min(6, len(live)) + 1))]
            entries = [sh.random_entry(s, max_new=max_new) for s in batch]
            sh.run_step(entries, order="interleaved" if rng.random() < 0.8 else "append_first")
        elif r < 0.82:
            if len(sh.seqs) < max_live:
                sid = sh.live()[int(rng.integers(len(sh.seqs)))]
                sh.fork(sid, int(rng.integers(1, 3)))
        elif r < 0.93:
            sid = sh.live()[int(rng.integers(len(sh.seqs)))]
            sh.remove(sid)
        elif r < 0.95:
            if sh.open is None:
                sh.clear()
        else:  # plan, append part of the layers, maybe attend to them, cancel
            live = sh.live()
            batch = live[:int(rng.integers(1, len(live) + 1))]
            sh.plan([sh.random_entry(s, max_new=max_new) for s in batch])
            for layer in range(int(rng.integers(0, sh.layers))):
                sh.append(layer)
                if rng.random() < 0.5:
                    sh.attend(layer)
            sh.cancel()
    # finish: drain every pending prompt, decode a little, then empty the pool
    live = sh.live()
    while any(sh.seqs[s].pending for s in live):
        sh.run_step([sh.random_entry(s, max_new=max_new) for s in live])
    for _ in range(2):
        sh.run_step([sh.random_entry(s) for s in live])
    for s in live:
        sh.remove(s)
    sh.clear()
    st = sh.check_stats("remove all + clear")
    if sh.memory == "exact":
        assert st["chunks_in_use"] == 0 and st["chunks_cached"] == 0 and st["sequences"] == 0, st


# id: chunk, q_heads, kv_heads, head_dim, dtype, share_threshold, threads, layers, extra
CONFIGS = [
    ("c16-gqa9x3-d64-f32", 16, 9, 3, 64, "float32", 2, 1, 2, {}),
    ("c32-gqa9x3-d64-f16", 32, 9, 3, 64, "float16", 1, 2, 2, {}),
    ("c64-mqa8x1-d128-f32-seqfirst", 64, 8, 1, 128, "float32", NEVER, 2, 2, {}),
    ("c128-mha4-d64-f32", 128, 4, 4, 64, "float32", 2, 1, 2, {}),
    ("c16-gqa4x2-d80-f32-t3", 16, 4, 2, 80, "float32", 3, 2, 3, {}),
    ("c32-gqa6x2-d96-f16", 32, 6, 2, 96, "float16", 2, 1, 2, {}),
    ("c64-gqa2x1-d256-f32", 64, 2, 1, 256, "float32", 2, 2, 2, {}),
    ("c16-mha8-d128-f16-seqfirst", 16, 8, 8, 128, "float16", NEVER, 1, 2, {}),
    ("c128-gqa9x3-d64-f16-t1", 128, 9, 3, 64, "float16", 1, 2, 2, {}),
    ("c32-mqa4x1-d256-f16-t4", 32, 4, 1, 256, "float16", 4, 1, 2, {}),
    ("c64-gqa6x3-d80-f16", 64, 6, 3, 80, "float16", 1, 1, 2, {}),
    ("c16-mha2-d96-f32-t1", 16, 2, 2, 96, "float32", 1, 2, 2, {}),
    ("c32-gqa8x2-d128-f32-smscale", 32, 8, 2, 128, "float32", 2, 2, 2, {"sm_scale": 0.05}),
    ("c16-gqa9x3-d64-f16-seqfirst-t2", 16, 9, 3, 64, "float16", NEVER, 2, 1, {}),
    ("c32-gqa4x2-d64-f32-allcores", 32, 4, 2, 64, "float32", 2, 0, 2, {}),
]


# Run on every instruction set the CPU has: each dtype, head dim 64-256, MHA (dot path for
# decode rows) and grouped heads (lane path), both phases.
EVERY_ISA = {"c16-gqa9x3-d64-f32", "c32-gqa9x3-d64-f16", "c64-mqa8x1-d128-f32-seqfirst",
             "c16-gqa4x2-d80-f32-t3", "c32-gqa6x2-d96-f16", "c64-gqa2x1-d256-f32",
             "c16-mha8-d128-f16-seqfirst", "c16-mha2-d96-f32-t1"}


@pytest.mark.parametrize("isa,cfg", kernel_isa_params(CONFIGS, EVERY_ISA))
def test_random_trees_match_reference(cv, seed, isa, cfg):
    _, C, hq, hkv, d, dtype, thr, threads, layers, extra = cfg
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=layers, q_heads=hq, kv_heads=hkv, head_dim=d, chunk_size=C, dtype=dtype,
                capacity_chunks=2048, threads=threads, share_threshold=thr, seed=seed, memory="exact",
                kernel_isa=isa, **extra)
    max_prompt = min(3 * C + 17, 300)
    random_scenario(sh, rng, n_ops=60, max_prompt=max_prompt, max_new=min(2 * C, 160))
    assert sh.steps_run >= 3


# --------------------------------------------------------------------------------------
# targeted shapes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [16, 32, 64, 128])
def test_partial_match_into_a_chunk_copies_the_matched_tokens(cv, seed, C):
    """Copy-on-diverge: n_cached lands in the middle of a chunk of a cached prefix."""
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=9, kv_heads=3, head_dim=64, chunk_size=C, seed=seed)
    a = _fresh(rng, 3 * C + 5)
    sa, n0 = sh.add(a)
    assert n0 == 0
    sh.run_step([(sa, len(a))])
    m = 2 * C + C // 2 + 3  # into the middle of A's third chunk
    b = a[:m] + _fresh(rng, C + 7)
    sb, nb = sh.add(b)
    assert nb == m
    assert nb % C != 0
    sh.remove(sa)  # A's chunks stay cached; B's copied tail must not depend on A's tail slot
    sh.run_step([(sb, len(b) - m)])
    for _ in range(C // 2 + 2):  # decode across at least one chunk boundary
        sh.run_step([sh.random_entry(sb)])
    # a third sequence matching into B's committed (now full) chunks and the cached ones of A
    c = a[:C + 1] + _fresh(rng, 3)
    sc, nc = sh.add(c)
    assert nc == C + 1
    sh.run_step([(sc, len(c) - nc), sh.random_entry(sb)])


def test_whole_prompt_cached_then_decode(cv, seed):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, seed=seed)
    p = _fresh(rng, 40)
    s1, _ = sh.add(p)
    sh.run_step([(s1, 40)])
    s2, n2 = sh.add(p)  # all 40 tokens: 2 full chunks + 8 copied
    assert n2 == 40
    s3, n3 = sh.add(p, max_reuse=39)  # an engine that needs the last token's logits
    assert n3 == 39
    sh.run_step([(s3, 1), (s2, [5]), (s1, [6])])
    sh.run_step([(s2, [7]), (s3, [8])])


def test_concurrent_identical_prompts_in_one_step(cv, seed):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=9, kv_heads=3, head_dim=64, chunk_size=32, seed=seed)
    p = _fresh(rng, 100)
    ids = [sh.add(p)[0] for _ in range(4)]
    assert all(sh.seqs[s].length == 0 for s in ids)
    sh.run_step([(s, 100) for s in ids])
    for _ in range(3):
        sh.run_step([sh.random_entry(s) for s in ids])
    sh.check_stats("identical prompts committed")  # exact model: 3 shared chunks, not 12


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("thr", [1, 2, 24, 25])
@pytest.mark.parametrize("isa", ISAS)
def test_shared_prefix_decode_batch(cv, seed, thr, threads, isa):
    """24 sequences over one 200-token prefix: chunk-first at thresholds <= 24, not at 25."""
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=8, kv_heads=2, head_dim=128, chunk_size=32, seed=seed,
                share_threshold=thr, threads=threads, kernel_isa=isa)
    prefix = _fresh(rng, 200)
    s0, _ = sh.add(prefix + _fresh(rng, 5))
    sh.run_step([(s0, 205)])
    ids = [s0]
    for _ in range(23):
        s, n = sh.add(prefix + _fresh(rng, int(rng.integers(1, 40))))
        assert n == 200
        ids.append(s)
    rng.shuffle(ids)
    sh.run_step([(s, sh.pending_after_open(s) or [7]) for s in ids])  # extend: 23 prefills + a decode
    sh.chunk_first_units = 0
    for _ in range(3):
        order = list(ids)
        rng.shuffle(order)
        sh.run_step([(s, [int(rng.integers(VOCAB))]) for s in order])
    if "chunk_first_units" in sh.cache.stats():  # the two paths really both ran
        assert (sh.chunk_first_units > 0) == (thr <= 24), (thr, sh.chunk_first_units)


def test_mixed_prefill_extend_decode_in_one_batch(cv, seed):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=3, q_heads=9, kv_heads=3, head_dim=64, chunk_size=16, seed=seed)
    base = _fresh(rng, 90)
    d1, _ = sh.add(base[:50])
    d2, _ = sh.add(_fresh(rng, 33))
    sh.run_step([(d1, 50), (d2, 33)])
    e1, n = sh.add(base[:70] + _fresh(rng, 9))  # extend over 48 shared + 2 copied tokens
    assert n == 50
    p1, _ = sh.add(_fresh(rng, 61))  # cold prefill
    for _ in range(4):
        entries = [sh.random_entry(s, max_new=23) for s in (d1, d2, e1, p1)]
        rng.shuffle(entries)
        sh.run_step(entries)


def test_long_private_context_decode(cv, seed):
    """One sequence, ~1.2K tokens over 16-token chunks: long sequence-first walks."""
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=1, q_heads=8, kv_heads=2, head_dim=128, chunk_size=16, seed=seed, threads=2)
    p = _fresh(rng, 1200)
    s, _ = sh.add(p)
    while sh.seqs[s].pending:
        sh.run_step([sh.random_entry(s, max_new=400)])
    for _ in range(20):
        sh.run_step([sh.random_entry(s)])


def test_peaky_scores_stay_finite(cv, seed):
    """Scores in the hundreds: the kernel must subtract the running max."""
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=1, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, seed=seed, q_scale=60.0)
    p = _fresh(rng, 70)
    a, _ = sh.add(p)
    b, _ = sh.add(p[:40] + _fresh(rng, 3))
    sh.run_step([(a, 70), (b, 43)])
    sh.run_step([sh.random_entry(a), sh.random_entry(b)])


@pytest.mark.parametrize("order", ["interleaved", "append_first"])
def test_layer_order_and_out_none(cv, seed, order):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=3, q_heads=4, kv_heads=4, head_dim=80, chunk_size=32, seed=seed)
    a, _ = sh.add(_fresh(rng, 45))
    sh.run_step([(a, 45)], order=order, use_out=False, return_lse=True)
    sh.run_step([sh.random_entry(a)], order=order, use_out=True, return_lse=False)


def test_namespaces_never_share(cv, seed):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, seed=seed)
    p = _fresh(rng, 50)
    a, _ = sh.add(p, namespace="alice")
    sh.run_step([(a, 50)])
    b, nb = sh.add(p, namespace="bob")
    assert nb == 0
    c, nc = sh.add(p, namespace="alice")
    assert nc == 50
    sh.run_step([(b, 50), (c, [1])])


def test_fork_children_diverge(cv, seed):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=9, kv_heads=3, head_dim=64, chunk_size=16, seed=seed)
    a, _ = sh.add(_fresh(rng, 37))
    sh.run_step([(a, 20)])  # 20 of 37 prompt tokens: children inherit 17 pending
    kids = sh.fork(a, 3)
    sh.run_step([(k, 17) for k in kids] + [(a, 10)])
    sh.run_step([(a, 7)] + [sh.random_entry(k) for k in kids])
    for _ in range(14):  # decode across a chunk boundary, every child its own tokens
        sh.run_step([sh.random_entry(s) for s in [a] + kids])
    g = sh.fork(kids[0], 2)
    sh.remove(kids[0])
    sh.run_step([sh.random_entry(s) for s in g + [a]])


def test_stats_from_another_thread_during_steps(cv, seed):
    """DESIGN.md: public methods are safe to call from several threads. A reader thread
    hammers stats()/sequence_length() while the main thread runs checked steps."""
    import threading
    import time

    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=2, q_heads=8, kv_heads=2, head_dim=128, chunk_size=16, seed=seed, threads=2,
                memory="off")
    prefix = _fresh(rng, 150)
    ids = []
    for i in range(6):
        s, _ = sh.add(prefix + _fresh(rng, 10 + i))
        sh.run_step([(s, sh.seqs[s].pending)])
        ids.append(s)
    stop = threading.Event()
    seen = []
    errors = []

    def reader():
        try:
            while not stop.is_set():
                st = sh.cache.stats()
                assert st["chunks_in_use"] + st["chunks_free"] == st["capacity_chunks"]
                for s in list(ids):
                    sh.cache.sequence_length(s)
                seen.append(st["tokens_cached"])
                time.sleep(0.0002)  # let the stepping thread take the GIL too
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(12):
            sh.run_step([(s, [int(rng.integers(VOCAB))]) for s in ids])
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert seen == sorted(seen), "tokens_cached went backwards"
