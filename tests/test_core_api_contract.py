"""docs/API.md's contract, table-driven: every public method of KVCache x every class of bad
argument (wrong type, bool for an int, float, None, an int beyond int32/int64, out of range,
wrong dtype, byte order, writability, device, layout, shape, invalid Unicode) raises the
documented exception naming the argument, and leaves the cache exactly as it was: stats()
and sequence lengths equal, and the outputs of the next steps bit-identical to those of a
cache that never saw the bad call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

L, HQ, HKV, D, C = 2, 4, 2, 64, 16
TIMERS = {"evict_select_seconds", "evict_score_seconds", "evict_residency_seconds"}


def _data(step, layer, rows, heads):
    rng = np.random.default_rng(1000 * step + 10 * layer + heads)
    return rng.standard_normal((rows, heads, D)).astype(np.float32)


class World:
    """Deterministic: `a` prefilled (2C+3 tokens) and decoding, `b` with pending prompt
    tokens, `gone` removed; an open step [(a, [7]), (b, 5)] with layer 0 appended only."""

    def __init__(self, cv):
        self.cv = cv
        ev = cv.Eviction(budget_tokens=4096, dense_layers=0)  # digests kept (read_digest), nothing dropped
        self.cache = cv.KVCache(cv.CacheConfig(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C,
                                               capacity_chunks=32, eviction=ev))
        c = self.cache
        self.a, _ = c.add_sequence(list(range(1, 2 * C + 4)))
        self.run([(self.a, 2 * C + 3)], 0)
        self.b, _ = c.add_sequence(list(range(500, 520)))
        self.gone, _ = c.add_sequence([9, 9, 9])
        c.remove(self.gone)
        self.step = c.plan([(self.a, [7]), (self.b, 5)])
        self.n = self.step.num_tokens
        k = _data(1, 0, self.n, HKV)
        c.append(0, self.step, k, k)
        self.slot = c.sequence_slots(self.a)[0]

    def run(self, entries, index, step=None):
        c = self.cache
        st = step or c.plan(entries)
        outs = []
        for layer in range(L):
            k = _data(index, layer, st.num_tokens, HKV)
            if step is None or layer > 0:
                c.append(layer, st, k, -k)
            outs.append(c.attention(layer, st, _data(index, layer, st.num_tokens, HQ)))
        return outs

    def lengths(self):
        return {s: self.cache.sequence_length(s) for s in (self.a, self.b)}

    def finish(self):
        """The open step's remaining layer, then two more steps: their outputs."""
        outs = self.run(None, 1, step=self.step)
        outs += self.run([(self.a, [8]), (self.b, 3)], 2)
        f = self.cache.fork(self.b, 2)
        outs += self.run([(self.a, [9]), (f[0], 4), (f[1], 2)], 3)
        return outs


INT_BAD = [  # (label, value, exception) for any int argument
    ("float", 1.0, TypeError), ("np_float", np.float64(0.0), TypeError), ("none", None, TypeError),
    ("bool", True, TypeError), ("np_bool", np.False_, TypeError), ("str", "1", TypeError),
    ("list", [0], TypeError), ("over_int64", 2**64, ValueError), ("under_int64", -(2**70), ValueError),
]
INT32_BAD = INT_BAD + [("over_int32", 2**40, ValueError)]


def _arrays_bad(shape):
    """(label, value-maker, exception) for an array argument of this (correct) shape."""
    ok = lambda: np.zeros(shape, np.float32)  # noqa: E731
    big = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)
    return [
        ("none", lambda: None, TypeError),
        ("list", lambda: ok().tolist(), TypeError),
        ("bytes", lambda: ok().tobytes(), TypeError),
        ("float64", lambda: ok().astype(np.float64), TypeError),
        ("float16", lambda: ok().astype(np.float16), TypeError),
        ("int32", lambda: ok().astype(np.int32), TypeError),
        ("big_endian", lambda: ok().astype(">f4"), TypeError),
        ("noncontig", lambda: big[..., ::2], ValueError),
        ("shape", lambda: np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32), ValueError),
        ("rows", lambda: np.zeros((shape[0] + 1,) + shape[1:], np.float32), ValueError),
        ("zero_d", lambda: np.zeros((), np.float32), ValueError),
        ("torch_meta", lambda: torch.zeros(shape, device="meta"), TypeError),
        ("torch_f64", lambda: torch.zeros(shape, dtype=torch.float64), TypeError),
    ]


def _cases():
    """(id, exception, argument name, call(world))."""
    cases = []

    def add(name, exc, arg, fn):
        cases.append(pytest.param(exc, arg, fn, id=name))

    # add_sequence(token_ids, namespace, max_reuse)
    for label, toks, exc in [("none", None, TypeError), ("str", "abc", TypeError), ("bytes", b"ab", TypeError),
                             ("floats", [1.5, 2.0], TypeError), ("bools", [True, False], TypeError),
                             ("over_int32", [1, 2**40], ValueError), ("over_int64", [2**70], ValueError),
                             ("empty", [], ValueError), ("2d", [[1, 2]], ValueError),
                             ("np_float", np.ones(3, np.float32), TypeError), ("int", 5, TypeError),
                             ("mixed", [1, "two"], TypeError)]:
        add(f"add_sequence-token_ids-{label}", exc, "token_ids", lambda w, t=toks: w.cache.add_sequence(t))
    for label, ns, exc in [("int", 5, TypeError), ("none", None, TypeError), ("bytes", b"x", TypeError),
                           ("surrogate", "ns\ud800", ValueError), ("lone_low", "\udfff", ValueError)]:
        add(f"add_sequence-namespace-{label}", exc, "namespace",
            lambda w, ns=ns: w.cache.add_sequence([1, 2], namespace=ns))
    for label, v, exc in [x for x in INT_BAD if x[0] != "none"] + [("negative", -1, ValueError)]:
        add(f"add_sequence-max_reuse-{label}", exc, "max_reuse",
            lambda w, v=v: w.cache.add_sequence([1, 2], max_reuse=v))

    # plan(entries)
    for label, entries, exc in [("none", None, TypeError), ("int", 5, TypeError), ("empty", [], ValueError),
                                ("not_pair", ["x"], TypeError), ("short", [(1,)], ValueError),
                                ("triple", [(1, 2, 3)], ValueError)]:
        add(f"plan-entries-{label}", exc, "entries", lambda w, e=entries: w.cache.plan(e))
    for label, v, exc in INT_BAD:
        add(f"plan-seq-{label}", exc, "entries[1]", lambda w, v=v: w.cache.plan([(w.b, 1), (v, 1)]))
    add("plan-seq-unknown", KeyError, "entries[0]", lambda w: w.cache.plan([(424242, 1)]))
    add("plan-seq-removed", KeyError, "entries[0]", lambda w: w.cache.plan([(w.gone, 1)]))
    for label, v, exc in [("float", 1.0, TypeError), ("bool", True, TypeError), ("np_bool", np.True_, TypeError),
                          ("none", None, TypeError), ("str", "1", TypeError), ("over_int32", 2**40, ValueError),
                          ("over_int64", 2**64, ValueError), ("zero", 0, ValueError), ("negative", -3, ValueError),
                          ("beyond_pending", 100, ValueError)]:
        add(f"plan-n_new-{label}", exc, "entries[0]", lambda w, v=v: w.cache.plan([(w.b, v)]))
    for label, v, exc in [("floats", [1.5], TypeError), ("bools", [True], TypeError), ("empty", [], ValueError),
                          ("over_int32", [2**40], ValueError), ("nested", [[1]], TypeError)]:
        add(f"plan-token_ids-{label}", exc, "entries[0]", lambda w, v=v: w.cache.plan([(w.a, v)]))
    add("plan-duplicate", ValueError, "entries[1]", lambda w: w.cache.plan([(w.a, [1]), (w.a, [2])]))

    # needs(entries): checked exactly as plan() checks them
    for label, entries, exc in [("none", None, TypeError), ("empty", [], ValueError), ("triple", [(1, 2, 3)], ValueError)]:
        add(f"needs-entries-{label}", exc, "entries", lambda w, e=entries: w.cache.needs(e))
    add("needs-seq-unknown", KeyError, "entries[0]", lambda w: w.cache.needs([(424242, 1)]))
    add("needs-n_new-beyond_pending", ValueError, "entries[0]", lambda w: w.cache.needs([(w.b, 100)]))
    add("needs-duplicate", ValueError, "entries[1]", lambda w: w.cache.needs([(w.a, [1]), (w.a, [2])]))

    # request_needs(prompt_tokens, max_new_tokens, n)
    for i, arg in enumerate(("prompt_tokens", "max_new_tokens", "n")):
        for label, v, exc in INT_BAD + [("zero", 0, ValueError), ("negative", -2, ValueError)]:
            args = [10, 10, 1]
            args[i] = v
            add(f"request_needs-{arg}-{label}", exc, arg, lambda w, a=tuple(args): w.cache.request_needs(*a))
    add("request_needs-n-over_fork", ValueError, "n: expected an integer in 1..4097",
        lambda w: w.cache.request_needs(10, 10, 4098))

    # append(layer, step, k, v): layer 1 is the one still to append
    kv_shape = (3, HKV, D)  # replaced by the world's row count at call time
    for label, v, exc in INT32_BAD + [("negative", -1, ValueError), ("too_big", L, ValueError),
                                      ("already", 0, ValueError)]:
        add(f"append-layer-{label}", exc, "layer", lambda w, v=v: w.cache.append(v, w.step, *w.kv()))
    for label, v, exc in [("int", 5, TypeError), ("none", None, TypeError)]:
        add(f"append-step-{label}", exc, "step", lambda w, v=v: w.cache.append(1, v, *w.kv()))
    for label, make, exc in _arrays_bad(kv_shape):
        add(f"append-k-{label}", exc, "k", lambda w, m=make: w.cache.append(1, w.step, w.fit(m, HKV), w.kv()[1]))
        add(f"append-v-{label}", exc, "v", lambda w, m=make: w.cache.append(1, w.step, w.kv()[0], w.fit(m, HKV)))

    # attention(layer, step, q, out, return_lse): layer 0 is appended
    for label, v, exc in INT32_BAD + [("negative", -1, ValueError), ("too_big", L, ValueError),
                                      ("not_appended", 1, ValueError)]:
        add(f"attention-layer-{label}", exc, "layer", lambda w, v=v: w.cache.attention(v, w.step, w.q()))
    for label, v, exc in [("int", 5, TypeError), ("none", None, TypeError)]:
        add(f"attention-step-{label}", exc, "step", lambda w, v=v: w.cache.attention(0, v, w.q()))
    for label, make, exc in _arrays_bad((3, HQ, D)):
        add(f"attention-q-{label}", exc, "q", lambda w, m=make: w.cache.attention(0, w.step, w.fit(m, HQ)))
    for label, make, exc in [x for x in _arrays_bad((3, HQ, D)) if x[0] not in ("none", "zero_d")] + [
            ("read_only", None, ValueError), ("bytes_backed", "bytes", ValueError), ("same_as_q", "q", ValueError),
            ("torch_grad", lambda: torch.zeros((3, HQ, D), requires_grad=True), TypeError)]:
        add(f"attention-out-{label}", exc, "out", lambda w, m=make: w.cache.attention(0, w.step, *w.out(m)))
    for label, v in [("int", 1), ("str", "yes"), ("none", None)]:
        add(f"attention-return_lse-{label}", TypeError, "return_lse",
            lambda w, v=v: w.cache.attention(0, w.step, w.q(), return_lse=v))
    add("attention-q-zero_d-lse", ValueError, "q",
        lambda w: w.cache.attention(0, w.step, np.zeros((), np.float32), return_lse=True))
    # outputs apart from the input and from each other (the one check PagedAttention runs too);
    # an lse of the caller's own is passed to the core directly
    add("attention-out-over_q_shifted", ValueError, "out: expected memory apart from q",
        lambda w: w.cache.attention(0, w.step, *w.shifted()))
    for label, lse, exc, arg in [
            ("over_q", lambda q, out: _within(q, (q.shape[0], HQ)), ValueError, "lse: expected memory apart from q"),
            ("over_out", lambda q, out: _within(out, (q.shape[0], HQ), 64), ValueError,
             "lse: expected memory apart from out"),
            ("float64", lambda q, out: np.zeros((q.shape[0], HQ)), TypeError, "lse: expected dtype float32, got float64"),
            ("shape", lambda q, out: np.zeros((q.shape[0], HQ + 1), np.float32), ValueError,
             "lse: expected shape [6, 4], got [6, 5]"),
            ("noncontig", lambda q, out: np.zeros((HQ, q.shape[0]), np.float32).T, ValueError,
             "lse: expected a C-contiguous tensor of shape [6, 4] (strides (4, 1)), got strides (1, 6)")]:
        add(f"attention-lse-{label}", exc, arg, lambda w, lse=lse: w.native_attention(lse))

    # cancel(step)
    for label, v in [("int", 5), ("none", None), ("str", "step")]:
        add(f"cancel-step-{label}", TypeError, "step", lambda w, v=v: w.cache.cancel(v))

    # fork(seq, n)
    for label, v, exc in INT_BAD + [("unknown", 424242, KeyError)]:
        add(f"fork-seq-{label}", exc, "seq", lambda w, v=v: w.cache.fork(v, 1))
    for label, v, exc in INT_BAD + [("zero", 0, ValueError), ("negative", -1, ValueError),
                                    ("over_max", 4097, ValueError), ("over_int32", 2**40, ValueError)]:
        add(f"fork-n-{label}", exc, "n", lambda w, v=v: w.cache.fork(w.a, v))

    # remove, sequence_length, sequence_slots (seq)
    for method in ("remove", "sequence_length", "sequence_slots"):
        for label, v, exc in INT_BAD + [("unknown", 424242, KeyError), ("removed", "gone", KeyError)]:
            add(f"{method}-seq-{label}", exc, "seq",
                lambda w, v=v, m=method: getattr(w.cache, m)(w.gone if v == "gone" else v))

    # read_tile(layer, slot, kv, head), chunk_residency(layer, slot), read_digest(layer, slot, head)
    ranges = {"layer": L, "slot": 32, "kv": 2, "head": HKV}
    for method, args in (("read_tile", ("layer", "slot", "kv", "head")), ("chunk_residency", ("layer", "slot")),
                         ("read_digest", ("layer", "slot", "head"))):
        for i, arg in enumerate(args):
            for label, v, exc in INT32_BAD + [("negative", -1, ValueError), ("too_big", ranges[arg], ValueError)]:
                def call(w, v=v, i=i, m=method, n=len(args)):
                    good = [0, w.slot, 0, 0][:n] if n != 3 else [0, w.slot, 0]
                    good[i] = v
                    return getattr(w.cache, m)(*good)
                add(f"{method}-{arg}-{label}", exc, arg, call)
    return cases


def _kv(self):
    k = _data(1, 1, self.n, HKV)
    return k, -k


def _fit(self, make, heads):
    """The bad array of make(), with the step's row count where its shape is the good one."""
    x = make()
    if isinstance(x, (np.ndarray, torch.Tensor)) and tuple(x.shape) == (3, heads, D):
        if isinstance(x, np.ndarray):
            y = np.zeros((self.n, heads, D), x.dtype) if x.flags.c_contiguous else \
                np.zeros((self.n, heads, 2 * D), x.dtype)[..., ::2]
            return y
        return torch.zeros((self.n, heads, D), dtype=x.dtype, device=x.device, requires_grad=x.requires_grad)
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[0] == 4:  # "rows": one too many
        return np.zeros((self.n + 1,) + x.shape[1:], x.dtype)
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[-1] == 2 * D:
        return x
    if isinstance(x, np.ndarray) and x.ndim == 3:
        return np.zeros((self.n,) + x.shape[1:], x.dtype)
    if isinstance(x, list):
        return np.zeros((self.n, heads, D), np.float32).tolist()
    if isinstance(x, bytes):
        return np.zeros((self.n, heads, D), np.float32).tobytes()
    return x


def _out(self, make):
    q = self.q()
    if make is None:
        out = np.zeros_like(q)
        out.flags.writeable = False
        return q, out
    if make == "bytes":
        return q, np.frombuffer(np.zeros_like(q).tobytes(), np.float32).reshape(q.shape)
    if make == "q":
        return q, q
    bad = self.fit(make, HQ)
    if isinstance(bad, torch.Tensor):
        q = torch.from_numpy(q)
    return q, bad


def _within(buf, shape, offset=0):
    """A float32 array of `shape` over buf's memory from element `offset`."""
    return buf.reshape(-1)[offset:offset + int(np.prod(shape))].reshape(shape)


def _shifted(self):
    """q and out one row apart in one buffer."""
    buf = np.zeros((self.n + 1, HQ, D), np.float32)
    buf[: self.n] = self.q()
    return buf[: self.n], buf[1:]


def _native_attention(self, make_lse):
    q, out = self.q(), np.zeros((self.n, HQ, D), np.float32)
    return self.cache._native.attention(0, self.step, q, out, make_lse(q, out), 0)


World.kv = _kv
World.fit = _fit
World.out = _out
World.shifted = _shifted
World.native_attention = _native_attention
World.q = lambda self: _data(1, 0, self.n, HQ)


def _comparable(stats):
    return {k: v for k, v in stats.items() if k not in TIMERS}


@pytest.mark.parametrize("exc,arg,call", _cases())
def test_bad_argument_names_it_and_changes_nothing(cv, exc, arg, call):
    bad, clean = World(cv), World(cv)
    before, lengths = bad.cache.stats(), bad.lengths()
    with pytest.raises(exc) as ei:
        call(bad)
    msg = str(ei.value)
    assert arg in msg, f"message {msg!r} does not name {arg!r}"
    assert "incompatible function arguments" not in msg
    assert bad.cache.stats() == before, "the failed call changed stats()"
    assert bad.lengths() == lengths
    assert _comparable(bad.cache.stats()) == _comparable(clean.cache.stats())
    for got, want in zip(bad.finish(), clean.finish()):
        np.testing.assert_array_equal(got, want)
    assert _comparable(bad.cache.stats()) == _comparable(clean.cache.stats())


def test_the_table_covers_every_public_method(cv):
    methods = {p.id.split("-")[0] for p in _cases()}
    public = {m for m in dir(cv.KVCache) if not m.startswith("_") and callable(getattr(cv.KVCache, m))}
    assert public - methods == {"clear", "stats"}  # they take no arguments


# ------------------------------------------------------------------ CacheConfig / Eviction

GOOD = dict(layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, capacity_chunks=16)
EV = dict(budget_tokens=4096, sink_chunks=1, window_chunks=2, dense_layers=1, device_chunks=64,
          host_bytes=None, spill_path=None)


@pytest.mark.parametrize("field,value,exc", [
    ("capacity_chunks", 2.5, TypeError), ("capacity_chunks", "16", TypeError), ("capacity_chunks", True, TypeError),
    ("capacity_bytes", 1e6, TypeError), ("capacity_chunks", 2**70, ValueError), ("capacity_chunks", -1, ValueError),
    ("layers", 2.0, TypeError), ("layers", "2", TypeError), ("layers", 2**40, ValueError), ("layers", 1 << 17, ValueError),
    ("q_heads", None, TypeError), ("kv_heads", True, TypeError), ("head_dim", 64.0, TypeError),
    ("chunk_size", "16", TypeError), ("threads", 2**31, ValueError), ("share_threshold", 1.5, TypeError),
    ("sm_scale", 0.0, ValueError), ("sm_scale", -0.125, ValueError), ("sm_scale", float("nan"), ValueError),
    ("sm_scale", float("inf"), ValueError), ("sm_scale", "0.1", TypeError), ("sm_scale", True, TypeError),
    ("device", 0, TypeError), ("dtype", "float\ud800", ValueError), ("kernel_isa", 3, TypeError),
])
def test_bad_config_field_is_named(cv, field, value, exc):
    with pytest.raises(exc, match=field):
        cv.KVCache(cv.CacheConfig(**{**GOOD, field: value}))


@pytest.mark.parametrize("field,value,exc,named", [
    ("sink_chunks", 2**31 - 1, ValueError, "eviction.budget_tokens"),  # (sink + window) * C used to wrap
    ("window_chunks", 2**31 - 1, ValueError, "eviction.budget_tokens"),
    ("topk_chunks", 2**31 - 2, ValueError, "eviction.topk_chunks"),  # sink + window + top-k used to wrap
    ("sink_chunks", 2**31, ValueError, "eviction.sink_chunks"),
    ("budget_tokens", 2**63, ValueError, "eviction.budget_tokens"),
    ("budget_tokens", 96.0, TypeError, "eviction.budget_tokens"),
    ("topk_chunks", True, TypeError, "eviction.topk_chunks"),
    ("device_chunks", "64", TypeError, "eviction.device_chunks"),
    ("host_bytes", 1.5e6, TypeError, "eviction.host_bytes"),
    ("digest", 3, TypeError, "eviction.digest"),
    ("dense_layers", None, TypeError, "eviction.dense_layers"),
])
def test_bad_eviction_field_is_named_and_sums_do_not_wrap(cv, field, value, exc, named):
    with pytest.raises(exc, match=named.replace(".", r"\.")):
        cv.KVCache(cv.CacheConfig(**GOOD, eviction=cv.Eviction(**{**EV, field: value})))


def test_good_config_values_of_other_int_and_float_kinds(cv):
    cache = cv.KVCache(cv.CacheConfig(**{**GOOD, "capacity_chunks": np.int64(16), "layers": np.int32(2)},
                                      sm_scale=np.float32(0.25)))
    assert cache.stats()["capacity_chunks"] == 16
    default = cv.KVCache(cv.CacheConfig(**GOOD, sm_scale=None))
    explicit = cv.KVCache(cv.CacheConfig(**GOOD, sm_scale=1 / 8))  # 1/sqrt(64): the same outputs
    outs = []
    for c in (default, explicit):
        s, _ = c.add_sequence(list(range(20)))
        st = c.plan([(s, 20)])
        k = _data(0, 0, 20, HKV)
        for layer in range(2):
            c.append(layer, st, k, k)
        outs.append(c.attention(1, st, _data(0, 1, 20, HQ)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_fork_beyond_the_pool_is_all_or_nothing(cv):
    cache = cv.KVCache(cv.CacheConfig(**{**GOOD, "capacity_chunks": 8}))
    s, _ = cache.add_sequence(list(range(20)))  # one full chunk + a partial tail: each child copies it
    st = cache.plan([(s, 20)])
    k = _data(0, 0, 20, HKV)
    for layer in range(2):
        cache.append(layer, st, k, k)
    st.commit()
    before = cache.stats()
    with pytest.raises(cv.CapacityError, match="fork"):
        cache.fork(s, 4096)
    assert cache.stats() == before
    kids = cache.fork(s, 3)
    assert kids == [s + 1, s + 2, s + 3]  # no id was used by the failed call
    assert cache.stats()["sequences"] == 4


def test_inputs_that_require_grad_are_read_like_any_other(cv):
    """Only outputs refuse requires_grad (writing would bypass autograd); k, v and q are read."""
    outs = []
    for as_torch in (False, True):
        cache = cv.KVCache(cv.CacheConfig(**GOOD))
        s, _ = cache.add_sequence(list(range(20)))
        st = cache.plan([(s, 20)])
        wrap = (lambda a: torch.from_numpy(a).requires_grad_(True)) if as_torch else (lambda a: a)
        for layer in range(2):
            k = _data(0, layer, 20, HKV)
            cache.append(layer, st, wrap(k), wrap(-k))
        out = cache.attention(1, st, wrap(_data(0, 1, 20, HQ)))
        outs.append(out.detach().numpy() if as_torch else out)
    np.testing.assert_array_equal(outs[0], outs[1])
