"""The explicit step (docs/API.md): ``plan`` returns a Step bound to its cache, with its rows and
positions; ``step.commit()`` is the one call that caches its tokens (reads never do), idempotent;
``step.cancel()`` drops a step that was not committed, idempotent, and leaves a committed one as it
is, saying so through ``step.committed`` rather than an exception; a stale step is refused by name;
code that never commits gets its complete step committed by the next call that starts new work."""

from __future__ import annotations

import gc

import numpy as np
import pytest

L, HQ, HKV, D, C = 2, 4, 2, 64, 16


@pytest.fixture
def cache(cv):
    return cv.KVCache(cv.CacheConfig(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, chunk_size=C,
                                     capacity_chunks=32, threads=1))


def _kv(n, value=0.5):
    return np.full((n, HKV, D), value, np.float32)


def _append_all(cache, step, layers=L):
    for layer in range(layers):
        cache.append(layer, step, _kv(step.num_tokens), _kv(step.num_tokens))


_STATE = ("chunks_in_use", "chunks_cached", "chunks_shared", "sequences", "tokens_cached", "tokens_saved_by_sharing")


def _snapshot(cache, seqs):
    """What the cache holds (not its counters of work done: plans built, peak chunks)."""
    st = cache.stats()
    return {k: st[k] for k in _STATE}, [cache.sequence_length(s) for s in seqs]


def test_plan_returns_a_step_with_its_rows(cv, cache):
    a, _ = cache.add_sequence(list(range(20)))
    b, _ = cache.add_sequence(list(range(100, 105)))
    step = cache.plan([(a, 20), (b, 3)])
    assert isinstance(step, cv.Step)
    assert step.num_tokens == 23 and step.seq_ids == [a, b] and step.row_offsets == [0, 20, 23]
    assert step.positions.dtype == np.int64 and step.positions.tolist() == list(range(20)) + [0, 1, 2]
    assert not step.committed and not step.cancelled
    assert "open" in repr(step)


def test_reads_never_commit(cache):
    a, _ = cache.add_sequence(list(range(40)))
    b, _ = cache.add_sequence(list(range(200, 205)))
    step = cache.plan([(a, 40)])
    _append_all(cache, step)
    before = _snapshot(cache, [a, b])
    for _ in range(2):
        assert cache.stats()["tokens_cached"] == 0 and cache.sequence_length(a) == 0
        cache.sequence_slots(a)
    with pytest.raises(ValueError, match="needs: .*not committed"):
        cache.needs([(b, 5)])  # a read: it does not guess what committing would change
    assert _snapshot(cache, [a, b]) == before and not step.committed
    step.commit()
    assert step.committed and cache.sequence_length(a) == 40 and cache.stats()["tokens_cached"] == 40
    assert cache.needs([(b, 5)]).fits


def test_commit_is_idempotent_and_refuses_a_missing_layer(cache):
    a, _ = cache.add_sequence(list(range(10)))
    step = cache.plan([(a, 10)])
    _append_all(cache, step, layers=1)
    before = _snapshot(cache, [a])
    with pytest.raises(ValueError, match=r"step: step \d+ was appended in 1 of 2 layers"):
        step.commit()
    assert not step.committed and _snapshot(cache, [a]) == before
    cache.append(1, step, _kv(10), _kv(10))
    step.commit()
    once = _snapshot(cache, [a])
    step.commit()
    assert step.committed and _snapshot(cache, [a]) == once and cache.sequence_length(a) == 10
    # A committed step still attends until the step ends.
    out = cache.attention(0, step, np.zeros((10, HQ, D), np.float32))
    assert out.shape == (10, HQ, D)


def test_a_committed_step_is_not_cancelled_and_says_so(cache):
    a, _ = cache.add_sequence(list(range(10)))
    step = cache.plan([(a, 10)])
    _append_all(cache, step)
    step.commit()
    before = _snapshot(cache, [a])
    assert step.cancel() is False  # no exception: `committed` is the answer
    assert step.committed and not step.cancelled and _snapshot(cache, [a]) == before
    with pytest.raises(ValueError, match="step: .*is committed"):
        cache.cancel(step)  # the cache's strict form refuses it by name


def test_cancel_is_idempotent(cache):
    a, _ = cache.add_sequence(list(range(30)))
    empty = _snapshot(cache, [a])
    step = cache.plan([(a, 30)])
    _append_all(cache, step)  # complete, not committed: still cancellable
    assert step.cancel() is True and step.cancelled and not step.committed
    assert _snapshot(cache, [a]) == empty
    assert step.cancel() is True and _snapshot(cache, [a]) == empty
    with pytest.raises(ValueError, match="was cancelled"):
        step.commit()
    with pytest.raises(ValueError, match=r"step: .*\(cancelled\)"):
        cache.cancel(step)
    again = cache.plan([(a, 30)])  # the prompt is pending again
    _append_all(cache, again)
    again.commit()
    assert cache.sequence_length(a) == 30


def test_a_stale_step_is_refused_by_name(cv, cache):
    a, _ = cache.add_sequence(list(range(10)))
    old = cache.plan([(a, 10)])
    _append_all(cache, old)
    nxt = cache.plan([(a, [5])])  # nobody committed `old`: this plan commits it, then ends it
    assert old.committed and cache.sequence_length(a) == 10
    q = np.zeros((old.num_tokens, HQ, D), np.float32)
    for call in (lambda: cache.append(0, old, _kv(10), _kv(10)), lambda: cache.attention(0, old, q),
                 lambda: cache.cancel(old)):
        with pytest.raises(ValueError, match=r"step: expected the open step, got step \d+ \(committed, then ended\)"):
            call()
    assert old.cancel() is False and old.committed  # the lenient form: nothing to do
    old.commit()  # idempotent, also once ended
    other = cv.KVCache(cache.config)
    o, _ = other.add_sequence([1])
    foreign = other.plan([(o, 1)])
    with pytest.raises(ValueError, match="step: expected the open step"):
        cache.append(0, foreign, _kv(1), _kv(1))
    with pytest.raises(TypeError, match="step: expected the Step returned by plan"):
        cache.append(0, nxt.id, _kv(1), _kv(1))
    assert nxt.cancel()


def test_a_step_keeps_its_cache_alive(cv):
    cache = cv.KVCache(cv.CacheConfig(layers=1, q_heads=1, kv_heads=1, head_dim=D, chunk_size=C, capacity_chunks=4))
    a, _ = cache.add_sequence([1, 2, 3])
    step = cache.plan([(a, 3)])
    del cache
    gc.collect()
    assert step.cancel() and step.cancelled


def test_test_hooks_are_checked(cv, cache):
    cfg = cache.config
    with pytest.raises(TypeError, match="test_hooks: expected a dict"):
        cv.KVCache(cfg, test_hooks="write=EIO@0")
    with pytest.raises(ValueError, match="test_hooks: expected the keys"):
        cv.KVCache(cfg, test_hooks={"delay": 1})
    with pytest.raises(TypeError, match="test_hooks.backup_delay_us: expected an int"):
        cv.KVCache(cfg, test_hooks={"backup_delay_us": 1.5})
    with pytest.raises(ValueError, match="test_hooks.backup_delay_us"):
        cv.KVCache(cfg, test_hooks={"backup_delay_us": -1})
    with pytest.raises(ValueError, match="test_hooks.faults"):
        cv.KVCache(cfg, test_hooks={"faults": "read=EIO"})
    cv.KVCache(cfg, test_hooks={"backup_delay_us": 0, "faults": ""})
