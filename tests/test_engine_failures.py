"""A request that fails while running fails alone: its Result carries the error and what it had
generated, every other request still completes with exactly its solo tokens, and the cache
holds nothing of the failed one afterwards."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkvale.engine import Engine, Request  # noqa: E402
from test_engine import model, rand_tokens, solo  # noqa: E402,F401  (the same tiny random Llama)

C = 16


def tokens(result):
    return [s.token_ids for s in result.samples]


def assert_released(eng):
    st = eng.cache.stats()
    assert st["sequences"] == 0 and st["chunks_in_use"] == st["chunks_cached"]


def test_a_decode_that_outgrows_the_pool_fails_alone(model):
    a = Request(token_ids=rand_tokens(40, 1), max_new_tokens=40, id="long")  # 80 tokens > 64 in the pool
    b = Request(token_ids=rand_tokens(10, 2), max_new_tokens=4, id="short")
    eng = Engine(model, chunk_size=C, capacity_tokens=4 * C)
    ra, rb = eng.generate([a, b], progress=False)
    assert rb.ok and tokens(rb) == tokens(solo(model, b.token_ids, 4))
    assert not ra.ok and ra.error.startswith("CapacityError: KV cache too small for this request")
    assert "capacity_tokens" in ra.error
    # What it generated until the pool ran out is kept, and is the solo run's beginning.
    got = ra.samples[0].token_ids
    assert ra.samples[0].finish_reason == "error" and 0 < len(got) < 40
    assert got == solo(model, a.token_ids, 40).samples[0].token_ids[: len(got)]
    assert ra.metrics.generated_tokens == len(got) and ra.metrics.ttft_s is not None
    assert_released(eng)


def test_samples_that_outgrow_the_pool_fail_together_and_keep_their_tokens(model):
    # 40 tokens = 2 full chunks + a partial; 3 samples fit 5 chunks until their partial chunks
    # fill, then none can open a new one.
    req = Request(token_ids=rand_tokens(40, 3), max_new_tokens=30, n=3, temperature=1.0, seed=4)
    eng = Engine(model, chunk_size=C, capacity_tokens=5 * C)
    res = eng.generate([req], progress=False)[0]
    assert "CapacityError" in res.error and len(res.samples) == 3
    ref = Engine(model, chunk_size=C, capacity_tokens=1024).generate([req], progress=False)[0]
    for got, want in zip(res.samples, ref.samples):
        assert got.finish_reason == "error" and 0 < len(got.token_ids) < 30
        assert got.token_ids == want.token_ids[: len(got.token_ids)]
    assert_released(eng)


def test_a_request_the_model_fails_on_fails_alone_in_a_shared_step(model):
    poison = 77
    prompts = [rand_tokens(30, 10 + i) for i in range(4)]
    prompts[2] = [t for t in prompts[2] if t != poison] + [poison]
    for i in (0, 1, 3):
        prompts[i] = [t for t in prompts[i] if t != poison]
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    real = eng.runner.forward
    calls = []

    def forward(step, ids, rows):
        calls.append(len(step.seq_ids))
        if poison in list(ids):
            raise RuntimeError("the model cannot take token 77")
        return real(step, ids, rows)

    eng.runner.forward = forward
    results = eng.generate([Request(token_ids=p, max_new_tokens=6) for p in prompts], progress=False)
    assert max(calls) > 1  # the poisoned request did share a step with others first
    bad = results[2]
    assert bad.error == "RuntimeError: the model cannot take token 77"
    assert bad.samples == [] or bad.samples[0].finish_reason == "error"
    for i in (0, 1, 3):
        assert results[i].ok
        assert tokens(results[i]) == tokens(solo(model, prompts[i], 6))
    assert_released(eng)
    # Afterwards the engine batches again.
    eng.runner.forward = forward
    calls.clear()
    again = eng.generate([Request(token_ids=p, max_new_tokens=3) for p in (prompts[0], prompts[1])], progress=False)
    assert all(r.ok for r in again) and max(calls) == 2


def test_stream_yields_each_result_as_it_finishes(model):
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    eng.submit(Request(token_ids=rand_tokens(20, 20), max_new_tokens=12))
    eng.submit(Request(token_ids=rand_tokens(20, 21), max_new_tokens=2))
    it = eng.stream(progress=False)
    first = next(it)
    assert first.index == 1 and eng.has_work()  # the short one, while the long one still runs
    assert [r.index for r in it] == [0]


def test_cancel_releases_a_request_and_returns_what_it_had(model):
    eng = Engine(model, chunk_size=C, capacity_tokens=1024, max_batch_size=2)
    prompts = [rand_tokens(20, 30 + i) for i in range(3)]
    ia, ib, ic = (eng.submit(Request(token_ids=p, max_new_tokens=10, id=i)) for i, p in enumerate(prompts))
    for _ in range(3):
        eng.step()
    running = eng.cancel(ia)
    waiting = eng.cancel(ic)  # max_batch_size=2: still queued behind a and b
    assert running.samples[0].finish_reason == "cancelled" and 0 < len(running.samples[0].token_ids) < 10
    assert running.samples[0].token_ids == solo(model, prompts[0], 10).samples[0].token_ids[: len(running.samples[0].token_ids)]
    assert waiting.samples == [] and waiting.ok
    assert eng.cancel(ia) is None and eng.cancel(99) is None
    rest = eng.run(progress=False)
    assert [r.index for r in rest] == [ib] and tokens(rest[0]) == tokens(solo(model, prompts[1], 10))
    assert_released(eng)


def test_a_refused_fork_keeps_the_parent_a_later_fork_of_the_step_copies(model):
    # Two prompts complete in one step and both fork. The first fork is refused once (as under
    # pool pressure), so the engine gives back samples that finished in this step -- but not
    # the second request's parent, which its first token finished (max_new_tokens=1) and which
    # its own fork, later in the step, still copies. (Found by the soak: that fork got None.)
    import chunkvale

    reqs = [Request(token_ids=rand_tokens(20, 80), max_new_tokens=4, n=2, temperature=1.0, seed=1),
            Request(token_ids=rand_tokens(20, 81), max_new_tokens=1, n=2, temperature=1.0, seed=2)]
    want = [tokens(r) for r in Engine(model, chunk_size=C, capacity_tokens=64 * C).generate(reqs, progress=False)]
    eng = Engine(model, chunk_size=C, capacity_tokens=64 * C)
    real, calls = eng.cache.fork, []

    def fork(seq, n):
        calls.append(seq)
        if len(calls) == 1:
            raise chunkvale.CapacityError("pool: injected refusal")
        return real(seq, n)

    eng.cache.fork = fork
    got = eng.generate(reqs, progress=False)
    assert len(calls) == 3  # refused, retried, then the second request's fork
    assert all(r.ok for r in got), [r.error for r in got]
    assert [tokens(r) for r in got] == want
    assert [len(s) for s in want[1]] == [1, 1]
    assert_released(eng)
