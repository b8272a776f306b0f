"""Every public call with bad input raises the documented exception, names the argument, and
leaves the cache exactly as it was: stats() unchanged, and the next correct calls still match
the float64 reference.

docs/API.md: ValueError (bad shape/value/state, stale step), TypeError (dtype or kind of
tensor), KeyError (unknown or removed sequence id), chunkvale.CapacityError (RuntimeError).
Layout (non-contiguous) is read as a shape/value problem: ValueError.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import Shadow

VOCAB = 50_000
L, HQ, HKV, D, C = 2, 4, 2, 64, 16


def _fresh(rng, n):
    return [int(t) for t in rng.integers(0, VOCAB, size=int(n))]


class World:
    """A cache with: `dec` (prefilled, decoding), `pre` (pending prompt), `new` (nothing yet),
    and an open step planned over [dec (1 token), pre (5 tokens)], nothing appended yet."""

    def __init__(self, cv, seed):
        self.cv = cv
        self.rng = np.random.default_rng(seed)
        self.sh = Shadow(cv, layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C, seed=seed,
                         capacity_chunks=64)
        sh = self.sh
        self.dec, _ = sh.add(_fresh(self.rng, 2 * C + 3))
        sh.run_step([(self.dec, 2 * C + 3)])
        self.pre, _ = sh.add(_fresh(self.rng, 20))
        sh.run_step([(self.pre, 7), (self.dec, [11])])
        self.new, _ = sh.add(_fresh(self.rng, 9))
        self.gone, _ = sh.add(_fresh(self.rng, 4))
        sh.remove(self.gone)
        self.step = sh.plan([(self.dec, [12]), (self.pre, 5)])
        self.n = self.step.num_tokens  # 6

    @property
    def cache(self):
        return self.sh.cache

    def kv(self, layer=0):
        k, v = self.sh.step_kv(layer)
        return k.astype(np.float32), v.astype(np.float32)

    def q(self):
        return np.zeros((self.n, HQ, D), np.float32)

    def expect(self, exc, names, fn):
        """fn() must raise exc naming one of `names`, and change nothing."""
        before = self.cache.stats()
        lens = {s: self.cache.sequence_length(s) for s in self.sh.seqs}
        with pytest.raises(exc) as ei:
            fn()
        msg = str(ei.value)
        if names:
            assert any(n in msg for n in names), f"message {msg!r} names none of {names}"
        assert self.cache.stats() == before, "a failing call changed stats()"
        assert {s: self.cache.sequence_length(s) for s in self.sh.seqs} == lens
        return ei.value

    def settle(self):
        """Complete the open step and let the core commit it (add + remove a throwaway
        sequence), so that a failing call has no pending commit it might or might not do."""
        sh = self.sh
        for layer in range(L):
            if layer not in sh.open.appended:
                sh.append(layer)
            sh.attend(layer)
        t, _ = sh.add(_fresh(self.rng, 3))
        sh.remove(t)

    def finish(self):
        """Complete the open step correctly, run one more, check everything."""
        sh = self.sh
        for layer in range(L):
            if layer not in sh.open.appended:
                sh.append(layer)
            sh.attend(layer)
        sh.run_step([sh.random_entry(s) for s in (self.new, self.pre, self.dec)])
        sh.remove(self.new)
        sh.check_stats("after the error")


@pytest.fixture
def w(cv, seed):
    return World(cv, seed)


def _noncontig(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    view = big[..., ::2]
    view[...] = a
    assert not view.flags.c_contiguous
    return view


# ------------------------------------------------------------------------------ config


GOOD = dict(layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, dtype="float32",
            capacity_chunks=16)


@pytest.mark.parametrize("bad,name", [
    (dict(chunk_size=8), "chunk_size"),
    (dict(chunk_size=256), "chunk_size"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(head_dim=100), "head_dim"),
    (dict(head_dim=32), "head_dim"),
    (dict(head_dim=512), "head_dim"),
    (dict(q_heads=5, kv_heads=2), "heads"),
    (dict(q_heads=0), "q_heads"),
    (dict(kv_heads=0), "kv_heads"),
    (dict(q_heads=2, kv_heads=4), "heads"),
    (dict(layers=0), "layers"),
    (dict(layers=-1), "layers"),
    (dict(dtype="int8"), "dtype"),
    (dict(dtype="float64"), "dtype"),
    (dict(capacity_chunks=0), "capacity"),
    (dict(capacity_chunks=-5), "capacity"),
    (dict(capacity_chunks=16, capacity_bytes=1 << 20), "capacity"),
    (dict(capacity_chunks=None, capacity_bytes=None), "capacity"),
    (dict(capacity_chunks=None, capacity_bytes=100), "capacity_bytes"),  # less than one chunk
    (dict(threads=-1), "threads"),
    (dict(share_threshold=-1), "share_threshold"),
    (dict(device="tpu"), "device"),
])
def test_bad_config_raises_value_error(cv, bad, name):
    kw = dict(GOOD)
    kw.update(bad)
    with pytest.raises(ValueError) as ei:
        cv.KVCache(cv.CacheConfig(**kw))
    assert name in str(ei.value), f"{ei.value!s} does not name {name}"


def test_good_config_for_every_supported_shape(cv):
    for hd in (64, 80, 96, 128, 256):
        for cs in (16, 32, 64, 128):
            for dt in ("float32", "float16", "bfloat16"):
                c = cv.KVCache(cv.CacheConfig(layers=1, q_heads=6, kv_heads=3, head_dim=hd, chunk_size=cs,
                                              dtype=dt, capacity_chunks=2))
                assert c.stats()["capacity_chunks"] == 2


def test_capacity_error_is_a_runtime_error(cv):
    assert issubclass(cv.CapacityError, RuntimeError)
    assert isinstance(cv.__version__, str) and cv.__version__
    assert isinstance(cv.cuda_built(), bool) and isinstance(cv.cuda_available(), bool)
    assert not cv.cuda_available() or cv.cuda_built()


# ------------------------------------------------------------------------------ add_sequence


@pytest.mark.parametrize("case", ["empty", "2d", "float", "string", "namespace", "max_reuse", "none",
                                  "too_big", "objects"])
def test_add_sequence_bad_input(w, case):
    c = w.cache
    calls = {
        "empty": (ValueError, ["token_ids"], lambda: c.add_sequence([])),
        "2d": (ValueError, ["token_ids"], lambda: c.add_sequence(np.ones((2, 3), np.int64))),
        "float": (TypeError, ["token_ids"], lambda: c.add_sequence(np.ones(3, np.float32))),
        "string": (TypeError, ["token_ids"], lambda: c.add_sequence("hello")),
        "namespace": (TypeError, ["namespace"], lambda: c.add_sequence([1, 2], namespace=5)),
        "max_reuse": (ValueError, ["max_reuse"], lambda: c.add_sequence([1, 2], max_reuse=-1)),
        "none": (TypeError, ["token_ids"], lambda: c.add_sequence(None)),
        "too_big": (ValueError, ["token_ids"], lambda: c.add_sequence([1, 2**40])),
        "objects": (TypeError, ["token_ids"], lambda: c.add_sequence([1, "two", 3])),
    }
    exc, names, fn = calls[case]
    w.settle()
    w.expect(exc, names, fn)
    w.sh.run_step([w.sh.random_entry(s) for s in (w.pre, w.new)])
    w.sh.remove(w.new)


# ------------------------------------------------------------------------------ plan


def test_plan_while_a_step_is_incomplete(w):
    w.expect(ValueError, ["step"], lambda: w.cache.plan([(w.new, 2)]))
    w.finish()


def test_add_fork_remove_while_a_step_is_incomplete(w):
    w.sh.append(0)  # one of two layers appended
    w.expect(ValueError, ["step"], lambda: w.cache.add_sequence([1, 2, 3]))
    w.expect(ValueError, ["step"], lambda: w.cache.fork(w.dec, 1))
    w.expect(ValueError, ["step"], lambda: w.cache.remove(w.new))
    w.finish()


@pytest.mark.parametrize("case", ["unknown", "removed", "duplicate", "too_many", "negative",
                                  "tokens_while_pending", "not_pairs", "bad_token_list"])
def test_plan_bad_entries(w, case):
    w.settle()
    c, sh = w.cache, w.sh
    pend = len(sh.seqs[w.pre].prompt) - sh.seqs[w.pre].length  # pre's pending tokens (8)
    cases = {
        "unknown": (KeyError, ["987654", "seq"], lambda: c.plan([(w.dec, [1]), (987654, 1)])),
        "removed": (KeyError, [str(w.gone), "seq"], lambda: c.plan([(w.gone, 1)])),
        "duplicate": (ValueError, ["entries", "seq"], lambda: c.plan([(w.new, 2), (w.dec, [1]), (w.new, 1)])),
        "too_many": (ValueError, ["n_new", "entries", "pending"], lambda: c.plan([(w.dec, [1]), (w.pre, pend + 1)])),
        "negative": (ValueError, ["n_new", "entries"], lambda: c.plan([(w.pre, -1)])),
        "tokens_while_pending": (ValueError, ["entries", "pending", "token"], lambda: c.plan([(w.pre, [1, 2])])),
        "not_pairs": ((TypeError, ValueError), ["entries"], lambda: c.plan([w.dec])),
        "bad_token_list": (TypeError, ["entries", "token"], lambda: c.plan([(w.dec, ["a"])])),
    }
    exc, names, fn = cases[case]
    w.expect(exc, names, fn)
    sh.run_step([sh.random_entry(s) for s in (w.new, w.pre, w.dec)])
    sh.run_step([sh.random_entry(s) for s in (w.pre, w.dec)])
    sh.remove(w.new)
    sh.check_stats("after the error")


def test_failing_plan_does_not_lose_a_complete_step(w):
    """The open step is complete but not committed when a plan fails; whether the failing
    plan commits it or not, the next good plan must see it committed exactly once."""
    sh = w.sh
    for layer in range(L):
        sh.append(layer)
        sh.attend(layer)
    for bad in ([(w.dec, [1]), (w.dec, [2])], [(w.pre, 999)], [(10**9, 1)]):
        with pytest.raises((ValueError, KeyError)):
            w.cache.plan(bad)
    sh.run_step([sh.random_entry(s) for s in (w.dec, w.pre, w.new)])
    sh.run_step([sh.random_entry(s) for s in (w.pre, w.dec)])
    sh.remove(w.new)
    sh.check_stats("after failing plans")


# ------------------------------------------------------------------------------ append


@pytest.mark.parametrize("case", ["layer_neg", "layer_big", "k_rows", "k_heads", "k_dim", "k_2d",
                                  "v_shape", "k_f64", "k_f16", "v_f64", "k_noncontig", "v_noncontig",
                                  "k_list", "v_none", "step_int"])
def test_append_bad_input(w, case):
    k, v = w.kv(0)
    n = w.n
    c, st = w.cache, w.step
    cases = {
        "layer_neg": (ValueError, ["layer"], lambda: c.append(-1, st, k, v)),
        "layer_big": (ValueError, ["layer"], lambda: c.append(L, st, k, v)),
        "k_rows": (ValueError, ["k"], lambda: c.append(0, st, np.zeros((n + 1, HKV, D), np.float32), v)),
        "k_heads": (ValueError, ["k"], lambda: c.append(0, st, np.zeros((n, HKV + 1, D), np.float32), v)),
        "k_dim": (ValueError, ["k"], lambda: c.append(0, st, np.zeros((n, HKV, D // 2), np.float32), v)),
        "k_2d": (ValueError, ["k"], lambda: c.append(0, st, np.zeros((n, HKV * D), np.float32), v)),
        "v_shape": (ValueError, ["v"], lambda: c.append(0, st, k, np.zeros((n - 1, HKV, D), np.float32))),
        "k_f64": (TypeError, ["k"], lambda: c.append(0, st, k.astype(np.float64), v)),
        "k_f16": (TypeError, ["k"], lambda: c.append(0, st, k.astype(np.float16), v)),
        "v_f64": (TypeError, ["v"], lambda: c.append(0, st, k, v.astype(np.float64))),
        "k_noncontig": (ValueError, ["k"], lambda: c.append(0, st, _noncontig(k), v)),
        "v_noncontig": (ValueError, ["v"], lambda: c.append(0, st, k, _noncontig(v))),
        "k_list": (TypeError, ["k"], lambda: c.append(0, st, k.tolist(), v)),
        "v_none": (TypeError, ["v"], lambda: c.append(0, st, k, None)),
        "step_int": ((TypeError, ValueError), ["step"], lambda: c.append(0, 1, k, v)),
    }
    exc, names, fn = cases[case]
    w.expect(exc, names, fn)
    # layer 0 was not appended by the failed call: attention must still refuse it
    w.expect(ValueError, ["append", "layer"], lambda: c.attention(0, st, w.q()))
    w.finish()


def test_append_twice_for_a_layer(w):
    w.sh.append(0)
    k, v = w.kv(0)
    w.expect(ValueError, ["layer", "append"], lambda: w.cache.append(0, w.step, k, v))
    w.finish()


# ------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("case", ["before_append", "layer_big", "q_rows", "q_heads", "q_dim", "q_f64",
                                  "q_f16", "q_noncontig", "q_list", "out_shape", "out_dtype",
                                  "out_noncontig", "out_list"])
def test_attention_bad_input(w, case):
    sh, c, st, n = w.sh, w.cache, w.step, w.n
    sh.append(0)
    q = w.q()
    cases = {
        "before_append": (ValueError, ["append", "layer"], lambda: c.attention(1, st, q)),
        "layer_big": (ValueError, ["layer"], lambda: c.attention(L + 3, st, q)),
        "q_rows": (ValueError, ["q"], lambda: c.attention(0, st, np.zeros((n + 2, HQ, D), np.float32))),
        "q_heads": (ValueError, ["q"], lambda: c.attention(0, st, np.zeros((n, HKV, D), np.float32))),
        "q_dim": (ValueError, ["q"], lambda: c.attention(0, st, np.zeros((n, HQ, 2 * D), np.float32))),
        "q_f64": (TypeError, ["q"], lambda: c.attention(0, st, q.astype(np.float64))),
        "q_f16": (TypeError, ["q"], lambda: c.attention(0, st, q.astype(np.float16))),
        "q_noncontig": (ValueError, ["q"], lambda: c.attention(0, st, _noncontig(q))),
        "q_list": (TypeError, ["q"], lambda: c.attention(0, st, q.tolist())),
        "out_shape": (ValueError, ["out"], lambda: c.attention(0, st, q, out=np.zeros((n, HQ, D + 1), np.float32))),
        "out_dtype": (TypeError, ["out"], lambda: c.attention(0, st, q, out=np.zeros((n, HQ, D), np.float64))),
        "out_noncontig": (ValueError, ["out"], lambda: c.attention(0, st, q, out=_noncontig(q.copy()))),
        "out_list": (TypeError, ["out"], lambda: c.attention(0, st, q, out=q.tolist())),
    }
    exc, names, fn = cases[case]
    w.expect(exc, names, fn)
    w.finish()


# ------------------------------------------------------------------------------ steps


def test_stale_cancelled_and_foreign_steps(w, cv):
    sh = w.sh
    old = w.step
    k, v = w.kv(0)
    for layer in range(L):
        sh.append(layer)
        sh.attend(layer)
    sh.run_step([(w.dec, [3]), (w.new, 4)])  # commits `old`
    q = np.zeros((old.num_tokens, HQ, D), np.float32)
    w.expect(ValueError, ["step"], lambda: w.cache.attention(0, old, q))
    w.expect(ValueError, ["step"], lambda: w.cache.append(0, old, k, v))
    w.expect(ValueError, ["step"], lambda: w.cache.cancel(old))
    # an open step with nothing appended, and a step of another cache with the same layout
    # and (where ids are numbers) the same id
    cur = sh.plan([(w.dec, [4]), (w.new, 2)])
    other = cv.KVCache(sh.cfg)
    o1, _ = other.add_sequence(list(range(1, 100)))
    ostep = other.plan([(o1, cur.num_tokens)])
    for _ in range(200):
        if ostep.id == cur.id:
            break
        other.cancel(ostep)
        ostep = other.plan([(o1, cur.num_tokens)])
    zeros_kv = np.zeros((cur.num_tokens, HKV, D), np.float32)
    w.expect(ValueError, ["step"], lambda: w.cache.append(0, ostep, zeros_kv, zeros_kv))
    w.expect(ValueError, ["step"], lambda: w.cache.cancel(ostep))
    # cancel drops an unfinished step; then it is stale
    sh.append(0)
    sh.attend(0)
    sh.cancel()
    qc = np.zeros((cur.num_tokens, HQ, D), np.float32)
    w.expect(ValueError, ["step"], lambda: w.cache.cancel(cur))
    w.expect(ValueError, ["step"], lambda: w.cache.append(1, cur, zeros_kv, zeros_kv))
    w.expect(ValueError, ["step"], lambda: w.cache.attention(0, cur, qc))
    sh.run_step([(w.dec, [3]), (w.new, 4)])
    sh.run_step([sh.random_entry(s) for s in (w.new, w.dec, w.pre)])
    sh.check_stats("after stale steps")


# ------------------------------------------------------------------------------ ids


def test_unknown_and_removed_ids(w):
    sh, c = w.sh, w.cache
    for layer in range(L):
        sh.append(layer)
        sh.attend(layer)
    sh.run_step([(w.dec, [1])])
    sh.remove(w.new)
    for bad in (w.gone, w.new, 10**9):
        w.expect(KeyError, [str(bad), "seq"], lambda: c.remove(bad))
        w.expect(KeyError, [str(bad), "seq"], lambda: c.fork(bad, 1))
        w.expect(KeyError, [str(bad), "seq"], lambda: c.sequence_length(bad))
        w.expect(KeyError, [str(bad), "seq"], lambda: c.plan([(w.dec, [2]), (bad, [1])]))
    for bad in ("seq-1", 1.5, None):  # not an id at all
        for call in (lambda: c.remove(bad), lambda: c.fork(bad, 1), lambda: c.sequence_length(bad),
                     lambda: c.plan([(bad, 1)])):
            w.expect((TypeError, KeyError), ["seq", "entries"], call)
    w.expect((TypeError, ValueError), ["n"], lambda: c.fork(w.dec, "2"))
    w.expect(ValueError, ["n"], lambda: c.fork(w.dec, 0))
    w.expect(ValueError, ["n"], lambda: c.fork(w.dec, -2))
    sh.run_step([sh.random_entry(s) for s in (w.pre, w.dec)])
    sh.check_stats("after bad ids")


def test_capacity_error_keeps_the_open_step(cv, seed):
    """A complete step stays open for attention until a call that starts new work succeeds;
    add_sequence / fork failing with CapacityError must leave it open (the cache unchanged)."""
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C, seed=seed,
                capacity_chunks=4)
    a, _ = sh.add(_fresh(rng, 4 * C - 4))
    sh.run_step([(a, 4 * C - 4)], commit=True)  # 4 slots, all a's; the step is committed and still open
    toks = sh.seqs[a].tokens
    before = sh.cache.stats()
    with pytest.raises(cv.CapacityError):
        sh.cache.add_sequence(toks[:C + 4])  # 1 full chunk + 4 tokens to copy: needs a slot
    with pytest.raises(cv.CapacityError):
        sh.cache.fork(a, 1)  # a's 12-token tail must be copied: needs a slot
    assert sh.cache.stats() == before
    for layer in range(L):  # attention over the open step still works
        sh.attend(layer)
    sh.run_step([(a, [1])])
