"""The scheduler alone, without torch: a real chunkvale.KVCache and a fake model whose logits are a
deterministic function of what the cache attends (each token's K/V is its embedding), so a sample's
tokens are right only if its sequence holds exactly its context. Covers admission order, waiting
for an in-flight shared prefill, backing off when a step does not fit, recompute preemption,
forking, a model failure, and the Batch's packing."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import chunkvale
from chunkvale import requests
from chunkvale.batch import Batch, BatchEntry
from chunkvale.metrics import EngineCounters
from chunkvale.request_state import RequestState, SampleState
from chunkvale.scheduler import Scheduler

VOCAB, D, C = 64, 64, 16
_rng = np.random.default_rng(7)
EMBED = _rng.standard_normal((VOCAB, D)).astype(np.float32)
QUERY = _rng.standard_normal((VOCAB, D)).astype(np.float32)
POS = _rng.standard_normal((512, D)).astype(np.float32)
HEAD = _rng.standard_normal((D, VOCAB)).astype(np.float32)


def fake_forward(cache, batch: Batch) -> np.ndarray:
    """Append every token's K and V (its embedding plus its position's), attend with a query of
    its own, and score the vocabulary: the logits of ``batch.logit_rows``."""
    step = batch.step
    ids = np.asarray(batch.input_ids)
    assert step.num_tokens == len(ids)
    kv = np.ascontiguousarray((EMBED[ids] + POS[np.asarray(step.positions)])[:, None, :])
    q = np.ascontiguousarray(QUERY[ids][:, None, :])
    for layer in range(cache.config.layers):  # every layer alike: the last one's output is scored
        cache.append(layer, step, kv, kv)
        out = cache.attention(layer, step, q)
    return out[batch.logit_rows, 0, :] @ HEAD


def pick(row_logits, sample: SampleState) -> int:
    """Greedy, shifted by the sample's index: the samples of one request differ."""
    return (int(np.argmax(row_logits)) + 7 * sample.sample_index) % VOCAB


def spy(cache, method: str) -> list:
    """Record each call of ``cache.<method>``: (its first argument, whether the cache refused it)."""
    calls, real = [], getattr(cache, method)

    def call(first, *args):
        try:
            out = real(first, *args)
        except chunkvale.CapacityError:
            calls.append((list(first) if isinstance(first, list) else first, True))
            raise
        calls.append((list(first) if isinstance(first, list) else first, False))
        return out

    setattr(cache, method, call)
    return calls


class Loop:
    """The engine loop (engine.py) with the fake model: schedule, forward, sample, fork, retire."""

    def __init__(self, capacity_chunks: int, max_batch_size: int = 16, max_step_tokens: int = 256, eviction=None):
        self.cache = chunkvale.KVCache(chunkvale.CacheConfig(layers=1 if eviction is None else 2, q_heads=1,
                                                             kv_heads=1, head_dim=D, chunk_size=C,
                                                             capacity_chunks=capacity_chunks, eviction=eviction))
        self.counters = EngineCounters(0)
        self.sched = Scheduler(self.cache, chunk_size=C, max_batch_size=max_batch_size,
                               max_step_tokens=max_step_tokens, counters=self.counters)
        self.submitted = 0
        self.plans = spy(self.cache, "plan")  # (entries, refused) of every plan() call
        self.forks = spy(self.cache, "fork")

    def submit(self, prompt, max_new_tokens, n=1, stop=()) -> int:
        request = requests.Request(token_ids=prompt, max_new_tokens=max_new_tokens, n=n, stop=list(stop))
        p = requests.check(request, vocab_size=VOCAB, has_tokenizer=False)
        req = RequestState(request=request, index=self.submitted, prompt=list(prompt), submitted=time.perf_counter(),
                           params=p, stop_ids=p.stop_ids)
        self.submitted += 1
        self.sched.queue(req)
        return req.index

    def emit(self, s: SampleState, row_logits) -> None:
        s.tokens.append(pick(row_logits, s))
        self.counters.token()
        s.finish_reason, s.text = requests.finish_reason(s.tokens, s.length, s.request.params, s.request.stop_ids,
                                                         None, None)

    def step(self) -> list[RequestState]:
        batch = self.sched.schedule()
        if batch is None:
            return self.sched.take_failed()
        self.sched.advance(batch, fake_forward(self.cache, batch), self.emit)
        return self.sched.take_failed() + self.sched.retire()

    def run(self) -> dict[int, RequestState]:
        done = {}
        for _ in range(10_000):
            if not self.sched.has_work():
                return done
            done.update((r.index, r) for r in self.step())
        raise AssertionError("the scheduler did not finish")


def tokens(req: RequestState) -> list[list[int]]:
    return [s.tokens for s in req.samples]


def solo(prompt, max_new_tokens, n=1) -> list[list[int]]:
    loop = Loop(capacity_chunks=256)
    loop.submit(prompt, max_new_tokens, n)
    return tokens(loop.run()[0])


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def assert_released(loop: Loop):
    st = loop.cache.stats()
    assert st["sequences"] == 0 and st["chunks_in_use"] == st["chunks_cached"]
    assert not loop.sched.running and not loop.sched.waiting


def test_the_scheduler_and_its_parts_import_no_torch():
    code = ("import sys, chunkvale.scheduler, chunkvale.batch, chunkvale.request_state, chunkvale.metrics, "
            "chunkvale.requests; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fake_model_depends_on_the_context():
    # Otherwise the comparisons below would prove nothing.
    a, b = prompt(20, 1), prompt(20, 2)
    assert solo(a, 8) != solo(b, 8)
    assert solo(a, 8) != solo(a[1:], 8)


def test_batch_packs_rows_in_entry_order():
    req = RequestState(request=None, index=0, prompt=[1, 2, 3, 4], submitted=0.0, params=None, stop_ids=frozenset())
    a, b, c = (SampleState(request=req, sample_index=i, seq=10 + i) for i in range(3))
    batch = Batch([BatchEntry(a, [5], [5], wants_logits=True),
                   BatchEntry(b, 3, [1, 2, 3], wants_logits=False),  # the middle of a prompt
                   BatchEntry(c, 2, [3, 4], wants_logits=True)])  # the end of one
    assert batch.plan_entries == [(10, [5]), (11, 3), (12, 2)]
    assert batch.input_ids == [5, 1, 2, 3, 3, 4]
    assert batch.logit_rows == [0, 5]
    assert batch.sampled == [a, c]
    assert (batch.prefill_tokens, batch.decoding) == (5, 1)


def test_batched_requests_get_their_solo_tokens_and_share_the_prefix():
    head = prompt(40, 3)
    prompts = [head + prompt(5 + i, 10 + i) for i in range(4)] + [prompt(30, 20)]
    loop = Loop(capacity_chunks=64)
    for p in prompts:
        loop.submit(p, 6)
    done = loop.run()
    for i, p in enumerate(prompts):
        assert tokens(done[i]) == solo(p, 6), i
    # The later requests waited for the first one's prefill and reuse the whole head (its
    # partial chunk copied).
    assert [done[i].n_cached for i in range(5)] == [0, 40, 40, 40, 0]
    assert loop.counters.reused == 120 and loop.counters.generated == 30
    assert_released(loop)


def test_admission_is_in_submission_order_within_max_batch_size():
    loop = Loop(capacity_chunks=64, max_batch_size=2)
    lengths = [8, 3, 4, 2]
    for i, n in enumerate(lengths):
        loop.submit(prompt(20, 30 + i), n)
    admitted, finished = [], []
    while loop.sched.has_work():
        for r in loop.sched.running:
            if r.index not in admitted:
                admitted.append(r.index)
        finished += [r.index for r in loop.step()]
        for r in loop.sched.running:
            if r.index not in admitted:
                admitted.append(r.index)
        assert sum(len(r.samples) for r in loop.sched.running) <= 2
    assert admitted == [0, 1, 2, 3]
    assert finished == [1, 2, 0, 3]  # each as soon as its tokens are out
    assert_released(loop)


def test_a_request_waits_for_the_in_flight_prefill_of_its_prefix():
    head = prompt(64, 40)
    loop = Loop(capacity_chunks=64, max_step_tokens=16)  # the head takes 4 steps to prefill
    a = loop.submit(head + [1], 2)
    b = loop.submit(head + [2], 2)
    loop.step()
    assert [r.index for r in loop.sched.running] == [a] and [r.index for r in loop.sched.waiting] == [b]
    done = loop.run()
    assert done[b].n_cached == 64  # reused, not computed twice
    assert tokens(done[b]) == solo(head + [2], 2)


def test_a_step_that_does_not_fit_prefills_less_before_anyone_is_preempted():
    # A decodes (2 chunks) while B's 100-token prompt (7 chunks) arrives: the pool (8) holds
    # both, but not B's whole prompt in one step next to A: B's prefill is halved until it fits.
    loop = Loop(capacity_chunks=8)
    a = loop.submit(prompt(20, 50), 12)
    loop.step()
    b = loop.submit(prompt(100, 51), 4)
    done = loop.run()
    refused = [i for i, (_, no) in enumerate(loop.plans) if no]
    assert refused, "the situation under test did not happen"
    for i in refused:
        entries, retry = loop.plans[i][0], loop.plans[i + 1][0]
        prefill = sum(n for _, n in entries if isinstance(n, int))
        assert sum(n for _, n in retry if isinstance(n, int)) <= prefill // 2
        assert [e for e in retry if not isinstance(e[1], int)] == [e for e in entries if not isinstance(e[1], int)]
    assert loop.counters.preemptions == 0
    assert tokens(done[a]) == solo(prompt(20, 50), 12) and tokens(done[b]) == solo(prompt(100, 51), 4)
    assert_released(loop)


def test_when_decodes_do_not_fit_the_newest_request_is_recomputed_later():
    # Two decoding requests outgrow a 5-chunk pool: at 33 tokens only A (the older) decodes
    # while B waits with 2 chunks; when A needs its 4th chunk even A alone does not fit, so B
    # goes back to the front of the queue, from scratch, and later gives its solo tokens.
    pa, pb = prompt(30, 60), prompt(30, 61)
    loop = Loop(capacity_chunks=5)
    a, b = loop.submit(pa, 40), loop.submit(pb, 30)
    done = {}
    for _ in range(100):
        done.update((r.index, r) for r in loop.step())
        if loop.counters.preemptions:
            break
    assert [r.index for r in loop.sched.running] == [a]
    restarted = loop.sched.waiting[0]
    assert restarted.index == b and restarted.samples == [] and restarted.prefilled == 0
    done.update(loop.run())
    assert loop.counters.preemptions >= 1  # B may be readmitted and preempted again
    assert tokens(done[a]) == solo(pa, 40) and tokens(done[b]) == solo(pb, 30)
    # What the preempted run had counted was taken back: every token is counted once.
    assert loop.counters.generated == 70
    assert_released(loop)


def test_a_request_whose_step_cannot_fit_even_alone_fails_alone():
    loop = Loop(capacity_chunks=3)
    big = loop.submit(prompt(40, 70), 30)  # 70 tokens > 48 in the pool
    small = loop.submit(prompt(5, 71), 3)
    done = loop.run()
    assert done[big].error.startswith("CapacityError: KV cache too small for this request")
    assert "raise capacity_tokens (now 3 chunks of 16 tokens)" in done[big].error
    assert all(s.finish_reason == "error" for s in done[big].samples)
    got = done[big].samples[0].tokens
    assert 0 < len(got) < 30 and got == solo(prompt(40, 70), 30)[0][:len(got)]
    assert done[small].error is None and tokens(done[small]) == solo(prompt(5, 71), 3)
    assert_released(loop)


def test_fork_shares_the_prompt_and_gives_each_sample_its_own_tokens():
    p = prompt(40, 80)  # 2 full chunks and a partial one
    loop = Loop(capacity_chunks=16)
    loop.submit(p, 5, n=3)
    loop.step()  # the prefill completes and forks
    req = loop.sched.running[0]
    assert [s.sample_index for s in req.samples] == [0, 1, 2]
    assert all(len(s.tokens) == 1 and s.length == 40 for s in req.samples)
    assert loop.cache.stats()["chunks_in_use"] == 2 + 3  # the full chunks once, a partial chunk each
    done = loop.run()
    want = solo(p, 5, n=3)
    assert tokens(done[0]) == want and len({tuple(t) for t in want}) == 3
    assert_released(loop)


def test_a_fork_that_does_not_fit_preempts_a_newer_request():
    # A's prompt (3 chunks) completes in the first step next to B (1 chunk); A's fork copies
    # its partial chunk twice: 6 > 5 chunks, so B goes back to the queue.
    pa, pb = prompt(40, 90), prompt(5, 91)
    loop = Loop(capacity_chunks=5)
    a, b = loop.submit(pa, 3, n=3), loop.submit(pb, 3)
    loop.step()
    assert [refused for _, refused in loop.forks] == [True, False] and loop.counters.preemptions == 1
    assert [r.index for r in loop.sched.running] == [a] and len(loop.sched.running[0].samples) == 3
    assert [r.index for r in loop.sched.waiting] == [b]
    done = loop.run()
    assert tokens(done[a]) == solo(pa, 3, n=3) and tokens(done[b]) == solo(pb, 3)
    assert_released(loop)


def test_samples_that_cannot_fork_even_alone_fail_with_what_they_have():
    loop = Loop(capacity_chunks=4)  # 3 prompt chunks + 2 copies of the partial one > 4
    loop.submit(prompt(40, 100), 3, n=3)
    done = loop.run()
    assert done[0].error.startswith("CapacityError: request 0: its n=3 samples do not fit the KV cache even alone")
    assert len(done[0].samples) == 1 and done[0].samples[0].finish_reason == "error"
    assert len(done[0].samples[0].tokens) == 1  # the parent's first token is kept
    assert_released(loop)


def test_a_model_failure_in_a_shared_step_reruns_its_requests_one_at_a_time():
    loop = Loop(capacity_chunks=32)
    a, b = loop.submit(prompt(20, 110), 3), loop.submit(prompt(20, 111), 3)
    batch = loop.sched.schedule()
    assert len(batch.entries) == 2
    loop.sched.forward_failed(batch, RuntimeError("boom"))
    assert loop.sched.running == [] and [r.index for r in loop.sched.waiting] == [a, b]
    assert loop.sched.isolate == {a, b} and loop.sched.take_failed() == []
    assert loop.cache.stats()["sequences"] == 0  # the step was dropped, the sequences released
    # Now one at a time: a fails alone, b completes.
    batch = loop.sched.schedule()
    assert [e.sample.request.index for e in batch.entries] == [a]
    loop.sched.forward_failed(batch, RuntimeError("boom"))
    (failed,) = loop.sched.take_failed()
    assert failed.index == a and failed.error == "RuntimeError: boom" and failed.ended is not None
    done = loop.run()
    assert tokens(done[b]) == solo(prompt(20, 111), 3) and not loop.sched.isolate
    assert_released(loop)


def test_cancel_releases_a_running_request_and_a_waiting_one():
    loop = Loop(capacity_chunks=32, max_batch_size=1)
    a, b = loop.submit(prompt(20, 120), 10), loop.submit(prompt(20, 121), 10)
    loop.step()
    loop.step()
    running = loop.sched.cancel(a)
    assert running.samples[0].finish_reason == "cancelled" and len(running.samples[0].tokens) == 2
    waiting = loop.sched.cancel(b)
    assert waiting.samples == [] and loop.sched.cancel(a) is None
    assert_released(loop)


# The engine refuses at submit what the cache's request_needs says could never fit; these are the
# rules it used to derive itself (its refusal messages explain them), so the cache must keep them.

def test_request_needs_without_a_host_tier_is_the_pool_rule():
    loop = Loop(capacity_chunks=8)
    needs = loop.cache.request_needs(40, 100, 3)
    assert (needs.pool_chunks, needs.pool_available) == (40 // C + 3, 8)  # full prompt chunks + one per sample
    assert (needs.device_chunks, needs.device_available) == (0, 0)


@pytest.mark.parametrize("prompt_tokens,max_new,n,budget,want", [
    (81, 4, 1, 64, 6),  # prefill attends to every chunk
    (70, 15, 1, 64, 5),  # decode beyond the budget: the prompt is the longest full step
    (70, 15, 1, 96, 6),  # within the budget: 84 tokens
    (40, 5, 4, 48, 6),  # alone: 3 chunks next to 3 siblings' partial chunks (together: 2 + 4)
    (10, 1, 3, 48, 4),  # a fork: the partial chunk, 2 copies and the copy source
    (70, 4, 3, 64, 5),  # the prefill; the siblings do not exist yet (decode beyond the budget: 3 + 2)
])
def test_request_needs_with_a_host_tier_counts_device_chunks(prompt_tokens, max_new, n, budget, want):
    ev = chunkvale.Eviction(budget_tokens=budget, sink_chunks=1, window_chunks=1, topk_chunks=1, dense_layers=1,
                            device_chunks=5)
    cache = chunkvale.KVCache(chunkvale.CacheConfig(layers=2, q_heads=1, kv_heads=1, head_dim=D, chunk_size=C,
                                                    capacity_chunks=64, eviction=ev))
    needs = cache.request_needs(prompt_tokens, max_new, n)
    assert (needs.device_chunks, needs.device_available) == (want, 5)


def test_request_needs_is_what_running_the_request_alone_needs(seed):
    """request_needs(...).fits exactly when the request, run alone by the scheduler (prefill once,
    fork its other samples, decode them all, backing off to fewer samples when a step does not
    fit), generates every token; over random prompts, sample counts, budgets and device tiers."""
    rng = np.random.default_rng(seed)
    wrong = []
    for _ in range(40):
        sink, window, topk = int(rng.integers(0, 3)), int(rng.integers(1, 4)), int(rng.integers(0, 4))
        budget = int(rng.integers((sink + window + topk) * C, 10 * C + 1))  # room for what a row attends
        device = int(rng.integers(sink + window + topk, 17))
        prompt_tokens, max_new, n = int(rng.integers(1, 8 * C + 1)), int(rng.integers(1, 4 * C + 1)), int(rng.integers(1, 6))
        ev = chunkvale.Eviction(budget_tokens=budget, sink_chunks=sink, window_chunks=window, topk_chunks=topk,
                                dense_layers=1, device_chunks=device)
        loop = Loop(capacity_chunks=256, eviction=ev)
        needs = loop.cache.request_needs(prompt_tokens, max_new, n)
        loop.submit(prompt(prompt_tokens, int(rng.integers(1 << 30))), max_new, n)
        (done,) = loop.run().values()
        if done.error is None:
            assert [len(s.tokens) for s in done.samples] == [max_new] * n
        else:
            assert "raise eviction.device_chunks" in done.error, done.error
        if needs.fits != (done.error is None):
            wrong.append((prompt_tokens, max_new, n, ev, needs.device_chunks, done.error))
        assert_released(loop)
    assert not wrong, wrong


def test_request_needs_is_checked_64_bit_arithmetic():
    ev = chunkvale.Eviction(budget_tokens=64, sink_chunks=1, window_chunks=1, topk_chunks=1, dense_layers=1,
                            device_chunks=8)
    cache = chunkvale.KVCache(chunkvale.CacheConfig(layers=2, q_heads=1, kv_heads=1, head_dim=D, chunk_size=C,
                                                    capacity_chunks=64, eviction=ev))
    big = 2**63 - 1
    needs = cache.request_needs(big, big, 2)  # used to wrap around to a negative device need
    assert (needs.pool_chunks, needs.device_chunks) == (big // C + 2, big // C + 1) and not needs.fits
    needs = cache.request_needs(40, big, 3)  # decode far beyond the budget: the steps repeat
    assert 0 < needs.device_chunks <= 8 and needs.fits
    with pytest.raises(ValueError, match=r"n: expected an integer in 1\.\.4097 \(the other n - 1 samples are forked"):
        cache.request_needs(40, 1, 4098)


def test_a_step_that_cannot_fit_the_device_tier_alone_names_device_chunks():
    # The failure message reads the CapacityError's resource, not its text. A cache given
    # directly (no submit-time check) with 2 device chunks: the prefill shrinks until the prompt
    # outgrows 2 chunks, then even a one-token step attends to 3.
    ev = chunkvale.Eviction(budget_tokens=32, sink_chunks=1, window_chunks=1, topk_chunks=0, dense_layers=1,
                            device_chunks=2)
    loop = Loop(capacity_chunks=64, eviction=ev)
    loop.submit(prompt(40, 130), 2)
    done = loop.run()
    assert done[0].error.startswith("CapacityError: KV cache too small for this request")
    assert "; raise eviction.device_chunks. The cache said: " in done[0].error
    assert done[0].prefilled == 32 and done[0].samples[0].tokens == []
    assert_released(loop)
