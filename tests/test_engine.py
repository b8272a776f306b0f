"""The continuous-batching engine on a tiny random Llama: scheduling, prefix reuse, forks,
sampling, stops, memory accounting, preemption and request validation."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chunkvale  # noqa: E402
from chunkvale.engine import Engine, Request  # noqa: E402

VOCAB = 256
C = 16  # chunk size used throughout


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def rand_tokens(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def solo(model, prompt, n, **kw):
    """The reference: the request alone on a fresh engine."""
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    return eng.generate([Request(token_ids=prompt, max_new_tokens=n, **kw)], progress=False)[0]


def test_concurrent_requests_share_the_prefix_and_compute_it_once(model):
    shared = rand_tokens(100, 1)
    prompts = [shared + rand_tokens(5, 10 + i) for i in range(6)]
    eng = Engine(model, chunk_size=C, capacity_tokens=4096)
    results = eng.generate([Request(token_ids=p, max_new_tokens=8) for p in prompts], progress=False)
    m = eng.metrics()
    # Later requests waited for the first prefill instead of computing the shared prompt again:
    # each reuses at least the shared prompt's full chunks.
    assert results[0].metrics.prefix_tokens_reused == 0
    assert all(r.metrics.prefix_tokens_reused >= 96 for r in results[1:])
    assert m.prefix_tokens_reused == sum(r.metrics.prefix_tokens_reused for r in results)
    # Sharing shows in memory: six 105-token sequences hold one copy of 6 shared chunks.
    assert m.kv_bytes_peak < 0.5 * m.kv_bytes_peak_unshared
    for p, r in zip(prompts, results):
        assert r.samples[0].token_ids == solo(model, p, 8).samples[0].token_ids


def test_repeated_prompt_reuses_all_but_its_last_token(model):
    prompt = rand_tokens(45, 2)
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    first = eng.generate([Request(token_ids=prompt, max_new_tokens=6)], progress=False)[0]
    again = eng.generate([Request(token_ids=prompt, max_new_tokens=6)], progress=False)[0]
    # max_reuse = len - 1: the last prompt token is recomputed because its logits are needed.
    assert again.metrics.prefix_tokens_reused == len(prompt) - 1
    assert again.samples[0].token_ids == first.samples[0].token_ids


def test_requests_join_while_others_decode(model):
    a, b = rand_tokens(30, 3), rand_tokens(20, 4)
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    ia = eng.submit(Request(token_ids=a, max_new_tokens=12))
    done = {}
    for _ in range(4):
        done.update({r.index: r for r in eng.step()})
    ib = eng.submit(Request(token_ids=b, max_new_tokens=12))
    while eng.has_work():
        done.update({r.index: r for r in eng.step()})
    assert done[ia].samples[0].token_ids == solo(model, a, 12).samples[0].token_ids
    assert done[ib].samples[0].token_ids == solo(model, b, 12).samples[0].token_ids
    # They overlapped: fewer steps than running one after the other (1 + 11 decode steps each).
    assert eng.metrics().steps < 24


def test_n_samples_fork_the_prompt_and_are_reproducible(model):
    prompt = rand_tokens(40, 5)
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    res = eng.generate([Request(token_ids=prompt, max_new_tokens=10, n=3, temperature=1.0, seed=7)],
                       progress=False)[0]
    outs = [s.token_ids for s in res.samples]
    assert len(outs) == 3 and all(len(o) == 10 for o in outs)
    assert len({tuple(o) for o in outs}) > 1  # different RNG streams
    # The prompt was prefilled once: the forks reused it, so the peak holds ~1 copy of it.
    assert eng.metrics().kv_bytes_peak < eng.metrics().kv_bytes_peak_unshared
    # Same seed, different engine and batch company: same samples.
    other = Engine(model, chunk_size=C, capacity_tokens=1024)
    again = other.generate([Request(token_ids=rand_tokens(33, 6), max_new_tokens=5),
                            Request(token_ids=prompt, max_new_tokens=10, n=3, temperature=1.0, seed=7)],
                           progress=False)[1]
    assert [s.token_ids for s in again.samples] == outs
    greedy = eng.generate([Request(token_ids=prompt, max_new_tokens=10, n=2)], progress=False)[0]
    assert greedy.samples[0].token_ids == greedy.samples[1].token_ids == solo(model, prompt, 10).samples[0].token_ids


def test_top_p_near_zero_is_greedy(model):
    prompt = rand_tokens(25, 7)
    sampled = solo(model, prompt, 10, temperature=0.8, top_p=1e-6, seed=1)
    assert sampled.samples[0].token_ids == solo(model, prompt, 10).samples[0].token_ids


def test_stop_tokens_and_max_new_tokens(model):
    prompt = rand_tokens(25, 8)
    full = solo(model, prompt, 12).samples[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_at = full.token_ids[4]
    first = full.token_ids.index(stop_at)
    stopped = solo(model, prompt, 12, stop=[stop_at]).samples[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: first + 1]


def test_eos_stops_unless_ignored(model):
    prompt = rand_tokens(25, 9)
    full = solo(model, prompt, 12).samples[0].token_ids
    model.generation_config.eos_token_id = full[2]
    try:
        assert solo(model, prompt, 12).samples[0].token_ids == full[: full.index(full[2]) + 1]
        assert solo(model, prompt, 12, ignore_eos=True).samples[0].token_ids == full
    finally:
        model.generation_config.eos_token_id = None


def test_small_cache_preempts_and_still_finishes_exactly(model):
    prompts = [rand_tokens(40, 20 + i) for i in range(4)]
    # 8 chunks of 16 = 128 tokens: not enough for four 60-token sequences at once.
    eng = Engine(model, chunk_size=C, capacity_tokens=8 * C)
    results = eng.generate([Request(token_ids=p, max_new_tokens=20) for p in prompts], progress=False)
    assert eng.metrics().preemptions >= 1
    for p, r in zip(prompts, results):
        assert r.samples[0].token_ids == solo(model, p, 20).samples[0].token_ids
    # A prompt the pool could not hold even alone is refused at submit, naming the knob.
    with pytest.raises(ValueError, match=r"request.token_ids: 200 tokens need 13 chunks .* holds 8 .*capacity_tokens"):
        eng.generate([Request(token_ids=rand_tokens(200, 30), max_new_tokens=2)], progress=False)
    assert not eng.has_work()


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_ids=[]), "prompt is empty"),
    (dict(token_ids=[1, VOCAB]), r"request.token_ids\[1\]: token id 256 outside the vocabulary \[0, 256\)"),
    (dict(token_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(token_ids=[1], n=0), r"request.n: expected an int >= 1, got 0"),
    (dict(token_ids=[1], temperature=-1.0), "temperature"),
    (dict(token_ids=[1], top_p=0.0), "top_p"),
    (dict(token_ids=[1], prompt="hi"), "exactly one of"),
    (dict(prompt="hi"), "need a tokenizer"),
    (dict(token_ids=list(range(200)) * 6), "usable context"),
])
def test_bad_requests_are_refused_clearly(model, kwargs, match):
    model.config.max_position_embeddings = 1024
    eng = Engine(model, chunk_size=C, capacity_tokens=2048)
    with pytest.raises(ValueError, match=match):
        eng.submit(Request(**kwargs))
    # A refused request leaves the engine usable.
    assert not eng.has_work()
    assert eng.generate([Request(token_ids=[1, 2, 3], max_new_tokens=2)], progress=False)[0].samples


def test_engine_arguments_are_validated(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=0)
    with pytest.raises(ValueError, match="capacity_tokens"):
        Engine(model, chunk_size=32, capacity_tokens=8)
    with pytest.raises(TypeError, match="request"):
        Engine(model, capacity_tokens=256).submit({"token_ids": [1]})


@pytest.mark.parametrize("complete", [False, True], ids=["before-append", "after-every-layer"])
def test_a_failed_step_leaves_the_engine_usable(model, complete):
    prompt = rand_tokens(30, 40)
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    eng.submit(Request(token_ids=prompt, max_new_tokens=6))
    eng.step()
    eng.step()
    real = eng.runner.forward

    def interrupted(step, ids, rows):
        if complete:
            real(step, ids, rows)  # the step is appended in every layer, hence committed
        raise KeyboardInterrupt("interrupted")

    # An interrupt (not an error of a request: test_engine_failures.py) propagates.
    eng.runner.forward = interrupted
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        eng.step()
    eng.runner.forward = real
    assert eng.cache.stats()["sequences"] == 0  # the request was released and queued again
    res = eng.run(progress=False)
    assert res[0].samples[0].token_ids == solo(model, prompt, 6).samples[0].token_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    from chunkvale import sampling

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = sampling.make_generator(0, 0)
    draws = [sampling.next_token(logits, 1.0, 0.75, gen) for _ in range(400)]
    # {0, 1} holds 0.8 >= 0.75; tokens 2 and 3 are cut, and 0 is drawn about 5/8 of the time.
    assert set(draws) == {0, 1}
    assert 0.5 < draws.count(0) / len(draws) < 0.75
    assert {sampling.next_token(logits, 1.0, 0.5, gen) for _ in range(50)} == {0}
    # Full nucleus: every token shows up, and the seed fixes the sequence.
    again = sampling.make_generator(0, 0)
    assert [sampling.next_token(logits, 1.0, 0.75, again) for _ in range(400)] == draws
    assert set(sampling.next_token(logits, 1.0, 1.0, gen) for _ in range(400)) == {0, 1, 2, 3}
