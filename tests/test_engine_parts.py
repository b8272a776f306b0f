"""The engine's plain-Python parts alone (no torch, no model): the stop rules, the refusal of a
request the cache could never hold, and the metrics counters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chunkvale import requests
from chunkvale.metrics import EngineCounters, request_metrics
from chunkvale.request_state import RequestState, SampleState


def params(**kw):
    return requests.check(requests.Request(token_ids=[1], **kw), vocab_size=100, has_tokenizer=True)


def test_a_stop_id_ends_a_sample_before_the_length_rules():
    p = params(max_new_tokens=2, stop=[5])
    assert requests.finish_reason([3, 5], 10, p, frozenset({5}), None, None) == ("stop", None)
    assert requests.finish_reason([3, 4], 10, p, frozenset({5}), None, None) == ("length", None)
    assert requests.finish_reason([3], 10, p, frozenset({5}), None, None) == (None, None)


def test_a_stop_string_cuts_the_text_before_it():
    p = params(max_new_tokens=10, stop=["XY", "Z"])
    text = {(1,): "aX", (1, 2): "aXYbZ"}
    decode = lambda tokens: text[tuple(tokens)]  # noqa: E731
    assert requests.finish_reason([1], 5, p, frozenset(), None, decode) == (None, None)
    assert requests.finish_reason([1, 2], 6, p, frozenset(), None, decode) == ("stop", "a")  # the first one in the text


def test_the_models_context_ends_a_sample_at_its_length():
    p = params(max_new_tokens=10)
    assert requests.finish_reason([1], 31, p, frozenset(), 32, None) == (None, None)
    assert requests.finish_reason([1], 32, p, frozenset(), 32, None) == ("length", None)


def needs(pool=1, pool_available=8, device=0, device_available=0):
    return SimpleNamespace(pool_chunks=pool, pool_available=pool_available, device_chunks=device,
                           device_available=device_available)


def test_refusal_names_the_field_and_the_limit_it_exceeds():
    requests.refuse_unfittable("request.prompt", 100, 5, 1, needs(8, 8, 5, 5), chunk_size=16, budget_tokens=64)
    with pytest.raises(ValueError, match=r"^request.token_ids: 200 tokens need 13 chunks of 16 tokens to start "
                                         r"decoding, but the KV cache holds 8 \(128 tokens\); raise capacity_tokens"):
        requests.refuse_unfittable("request.token_ids", 200, 5, 1, needs(13, 8), chunk_size=16, budget_tokens=None)
    with pytest.raises(ValueError, match=r"48 tokens with n=2 samples need 5 chunks"):
        requests.refuse_unfittable("request.token_ids", 48, 5, 2, needs(5, 4), chunk_size=16, budget_tokens=None)
    with pytest.raises(ValueError, match=r"^request.prompt: 40 tokens \(\+ up to 5 new, n=4 samples\) need up to 6 "
                                         r"chunks .*budget_tokens=48.* eviction.device_chunks=5; raise device_chunks"):
        requests.refuse_unfittable("request.prompt", 40, 5, 4, needs(7, 64, 6, 5), chunk_size=16, budget_tokens=48)


def state(prompt_tokens=10, n_cached=4):
    req = RequestState(request=None, index=0, prompt=list(range(prompt_tokens)), submitted=100.0, params=None,
                       stop_ids=frozenset(), n_cached=n_cached)
    req.samples = [SampleState(request=req, sample_index=i, tokens=[1] * (3 + i)) for i in range(2)]
    return req


def test_request_metrics_are_measured_from_submit_admission_and_first_token():
    req = state()
    req.admitted, req.first_token = 101.0, 103.0
    m = request_metrics(req, ended=107.0)
    assert (m.prompt_tokens, m.prefix_tokens_reused, m.generated_tokens) == (10, 4, 7)
    assert (m.queue_s, m.ttft_s, m.prefill_s, m.total_s) == (1.0, 3.0, 2.0, 7.0)
    assert m.decode_tokens_per_s == (7 - 2) / 4.0  # the first token of each sample is not decode
    failed_in_queue = request_metrics(state(), ended=100.5)
    assert failed_in_queue.queue_s is None and failed_in_queue.ttft_s is None and failed_in_queue.prefill_s is None
    assert failed_in_queue.decode_tokens_per_s == 0.0


def test_counters_take_back_what_a_restarted_request_had_counted():
    c = EngineCounters(chunks_in_use=3)
    req = state()
    c.queued(req)
    c.admitted(req)
    for _ in range(7):
        c.token()
    c.requeued(req)
    c.preempted()
    assert (c.requests, c.prompt_tokens, c.reused, c.generated, c.preemptions) == (1, 10, 0, 0, 1)


def test_counters_keep_the_peaks_and_the_window():
    c = EngineCounters(chunks_in_use=3)
    assert c.snapshot(3, 100).wall_s == 0.0 and c.snapshot(3, 100).kv_bytes_peak == 300
    c.stepping()
    c.stepped()
    c.memory(5, [40, 40, 10], chunk_size=16)  # unshared: 3 + 3 + 1 chunks
    c.memory(4, [16], chunk_size=16)
    c.token()
    c.idle()
    m = c.snapshot(2, 100)
    assert (m.steps, m.kv_bytes_peak, m.kv_bytes_peak_unshared, m.kv_bytes_in_use) == (1, 500, 700, 200)
    assert m.kv_sharing_ratio == 5 / 7
    assert m.wall_s > 0 and m.wall_s == c.snapshot(2, 100).wall_s  # idle: the window is closed
    c.reset(chunks_in_use=1)
    assert c.snapshot(1, 100) == type(m)(requests=0, prompt_tokens=0, prefix_tokens_reused=0, generated_tokens=0,
                                         steps=0, wall_s=0.0, tokens_per_s=0.0, kv_bytes_peak=100,
                                         kv_bytes_peak_unshared=0, kv_bytes_in_use=100, preemptions=0)
