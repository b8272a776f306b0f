"""Request validation at submit: every field's type and range, named in the message, nothing
queued when a request is refused, and generate() refusing a batch before running any of it."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkvale.engine import Engine, Request  # noqa: E402
from test_engine import VOCAB, model, rand_tokens, solo  # noqa: E402,F401  (the same tiny random Llama)

C = 16


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=1e-40), ValueError,
     r"request.temperature: expected 0 \(greedy\) or a finite float >= 0.001 .*got 1e-40"),
    (dict(temperature=math.nan), ValueError, r"request.temperature: .*got nan"),
    (dict(temperature=math.inf), ValueError, r"request.temperature: .*got inf"),
    (dict(temperature="hot"), TypeError, r"request.temperature: .*got 'hot' \(str\)"),
    (dict(temperature=True), TypeError, r"request.temperature: .*got True \(bool\)"),
    (dict(top_p=math.nan), ValueError, r"request.top_p: expected a finite float in \(0, 1\], got nan"),
    (dict(top_p=1.5), ValueError, r"request.top_p: .*got 1.5"),
    (dict(n=2.5), TypeError, r"request.n: expected an int >= 1, got 2.5 \(float\)"),
    (dict(n=True), TypeError, r"request.n: expected an int >= 1, got True \(bool\)"),
    (dict(n=0), ValueError, r"request.n: expected an int >= 1, got 0"),
    (dict(n=65), ValueError, r"request.n: 65 samples exceed max_batch_size=64"),
    (dict(max_new_tokens=math.nan), TypeError, r"request.max_new_tokens: expected an int >= 1, got nan \(float\)"),
    (dict(max_new_tokens=3.0), TypeError, r"request.max_new_tokens: .*got 3.0 \(float\)"),
    (dict(max_new_tokens=0), ValueError, r"request.max_new_tokens: expected an int >= 1, got 0"),
    (dict(seed=1.5), TypeError, r"request.seed: expected an int or None, got 1.5 \(float\)"),
    (dict(seed="7"), TypeError, r"request.seed: .*got '7' \(str\)"),
    (dict(seed=False), TypeError, r"request.seed: .*got False \(bool\)"),
    (dict(namespace=3), TypeError, r"request.namespace: expected a str, got 3 \(int\)"),
    (dict(namespace=None), TypeError, r"request.namespace: expected a str, got None"),
    (dict(ignore_eos="yes"), TypeError, r"request.ignore_eos: expected a bool, got 'yes' \(str\)"),
    (dict(stop=[""]), ValueError, r"request.stop\[0\]: expected a non-empty stop string"),
    (dict(stop=[1.5]), TypeError, r"request.stop\[0\]: expected a stop string or an int token id, got 1.5"),
    (dict(stop=[3, VOCAB]), ValueError, r"request.stop\[1\]: token id 256 outside the vocabulary"),
    (dict(stop=[True]), TypeError, r"request.stop\[0\]: .*got True \(bool\)"),
    (dict(stop=7), TypeError, r"request.stop: expected a str or a list of str / int token ids, got int"),
    (dict(stop="w30"), ValueError, r"request.stop\[0\]: stop strings need a tokenizer .*got 'w30'"),
])
def test_every_field_is_checked_at_submit(model, kwargs, error, match):
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    with pytest.raises(error, match=match):
        eng.submit(Request(token_ids=[1, 2, 3], **kwargs))
    assert not eng.has_work()
    # The index was not used up: the next request is request 0.
    assert eng.submit(Request(token_ids=[1, 2, 3], max_new_tokens=1)) == 0


@pytest.mark.parametrize("token_ids, error, match", [
    ([1, 2.0, 3], TypeError, r"request.token_ids\[1\]: expected an int token id, got 2.0 \(float\)"),
    ([1, True], TypeError, r"request.token_ids\[1\]: expected an int token id, got True \(bool\)"),
    ([1, -1], ValueError, r"request.token_ids\[1\]: token id -1 outside the vocabulary \[0, 256\)"),
    ("abc", TypeError, r"request.token_ids: expected a list of int token ids, got str"),
    (5, TypeError, r"request.token_ids: expected a list of int token ids, got int"),
    (np.array([1.0, 2.0]), TypeError, r"request.token_ids: expected a 1-D array of ints, got 1-D float64"),
    (torch.tensor([1.5, 2.0]), TypeError, r"request.token_ids: expected int token ids, got a torch.float32 tensor"),
    ([], ValueError, r"request.token_ids: prompt is empty"),
])
def test_token_ids_must_be_ints_in_the_vocabulary(model, token_ids, error, match):
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    with pytest.raises(error, match=r"request 0: " + match):
        eng.submit(Request(token_ids=token_ids))
    assert not eng.has_work()


def test_integer_arrays_and_tensors_are_accepted_as_token_ids(model):
    prompt = rand_tokens(20, 1)
    want = solo(model, prompt, 4).samples[0].token_ids
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    got = eng.generate([Request(token_ids=np.array(prompt, dtype=np.int32), max_new_tokens=4),
                        Request(token_ids=torch.tensor(prompt), max_new_tokens=np.int64(4), n=np.int64(1))],
                       progress=False)
    assert [r.samples[0].token_ids for r in got] == [want, want]


def test_tiny_temperature_is_refused_and_the_bound_is_usable(model):
    prompt = rand_tokens(20, 2)
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    # At the bound, sampling is still finite math: the samples equal greedy on this model.
    res = eng.generate([Request(token_ids=prompt, max_new_tokens=6, temperature=1e-3, seed=1)], progress=False)[0]
    assert res.ok and res.samples[0].token_ids == solo(model, prompt, 6).samples[0].token_ids


def test_a_prompt_longer_than_the_cache_is_refused_at_submit(model):
    eng = Engine(model, chunk_size=C, capacity_tokens=4 * C)
    # 63 tokens: 3 full chunks + the partial one; decoding fits in 4 chunks. 64 would need a 5th.
    assert eng.submit(Request(token_ids=rand_tokens(63, 3), max_new_tokens=1)) == 0
    with pytest.raises(ValueError, match=r"request 1: request.token_ids: 64 tokens need 5 chunks of 16 tokens "
                                         r"to start decoding, but the KV cache holds 4 \(64 tokens\)"):
        eng.submit(Request(token_ids=rand_tokens(64, 4)))
    # Samples each need their own chunk for their first token.
    with pytest.raises(ValueError, match=r"48 tokens with n=2 samples need 5 chunks"):
        eng.submit(Request(token_ids=rand_tokens(48, 5), n=2, temperature=1.0))
    assert eng.run(progress=False)[0].samples[0].finish_reason == "length"


def test_a_bare_stop_string_is_one_string_not_characters():
    from chunkvale import requests

    # "w30" would stop at any "w", "3" or "0" if split into characters.
    assert requests.check(Request(stop="w30"), vocab_size=10, has_tokenizer=True).stop_strings == ("w30",)
    assert requests.check(Request(stop=None), vocab_size=10, has_tokenizer=True).stop_strings == ()
    checked = requests.check(Request(stop=["a b", 3]), vocab_size=10, has_tokenizer=True)
    assert checked.stop_strings == ("a b",) and checked.stop_ids == {3}


def test_generate_refuses_the_whole_batch_before_running_any(model):
    eng = Engine(model, chunk_size=C, capacity_tokens=1024)
    good = Request(token_ids=rand_tokens(10, 6), max_new_tokens=2)
    with pytest.raises(TypeError, match=r"request 1 \(id='bad'\): request.seed"):
        eng.generate([good, Request(token_ids=[1], seed="x", id="bad"), good], progress=False)
    assert not eng.has_work() and eng.metrics().requests == 0
    assert [r.index for r in eng.generate([good], progress=False)] == [0]
