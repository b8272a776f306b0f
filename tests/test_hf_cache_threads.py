"""ChunkvaleCache (and a KVCache a model runs on) shared between threads: one use at a time
(chunkvale/cache_users.py). While a generate() runs on one thread, another thread's generate(),
forward, reset() or release() of that ChunkvaleCache, a forward of another ChunkvaleCache on the
same KVCache in the middle of one of its forwards, or another thread's Engine call on the
engine's cache in the middle of a step, is refused at once with a RuntimeError saying so, and
changes nothing: the running generation gives exactly transformers' own tokens and no sequence is
left behind.

The races are made certain rather than likely: the test wraps every KVCache call (each a step
boundary, so also between a forward's add_sequence and its plan) and generate()'s logits
processing (between two forwards) with a pause and, on the generating thread, a hook that runs
the competing call on another thread and waits for it. Nothing in chunkvale reads a test switch."""

import threading
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkvale.hf import ChunkvaleCache  # noqa: E402
from test_hf_cache import generate, left_padded, random_prompts, tiny_model  # noqa: E402

DELAY = 0.001
KV_CALLS = ("add_sequence", "plan", "append", "attention", "fork", "remove", "cancel")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def elsewhere(fn):
    """fn() on another thread, waited for: the exception it raised, or None."""
    box = []

    def run():
        try:
            fn()
            box.append(None)
        except Exception as e:  # noqa: BLE001  (the test looks at it)
            box.append(e)

    t = threading.Thread(target=run, name="other")
    t.start()
    t.join()
    return box[0]


class Boundaries:
    """At every step boundary of this thread's calls on `kv` (before and after each KVCache call)
    and between generate()'s forwards (``processor``): a pause, then ``hook(where)``."""

    def __init__(self, monkeypatch, kv, hook):
        self.thread, self.hook, self.seen = threading.get_ident(), hook, []
        for name in KV_CALLS:
            real = getattr(kv, name)

            def call(*args, _real=real, _name=name, **kwargs):
                self.at(f"before {_name}")
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.at(f"after {_name}")

            monkeypatch.setattr(kv, name, call)
        outer = self

        class Between(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                outer.at("between forwards")
                return scores

        self.processor = transformers.LogitsProcessorList([Between()])

    def at(self, where):
        if threading.get_ident() != self.thread:  # the competing calls themselves: no hook
            return
        time.sleep(DELAY)
        self.seen.append(where)
        self.hook(where)


def test_a_second_thread_is_refused_at_every_step_boundary_of_a_generation(llama, monkeypatch):
    prompts, other = random_prompts(101, [21, 9]), random_prompts(102, [5])
    want = generate(llama, prompts, do_sample=False, max_new_tokens=6)
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    ids, mask = left_padded(other)

    def forward():
        with torch.inference_mode():
            llama(ids, attention_mask=mask, cache=cache)

    attempts = {"generate": lambda: generate(llama, other, cache, do_sample=False, max_new_tokens=2),
                "forward": forward, "reset": cache.reset, "release": cache.release}
    outcomes = []
    at = Boundaries(monkeypatch, cache.kv_cache,
                    lambda where: outcomes.extend((where, name, elsewhere(fn)) for name, fn in attempts.items()))
    got = generate(llama, prompts, cache, do_sample=False, max_new_tokens=6, logits_processor=at.processor)
    assert torch.equal(got, want), "a refused call changed the running generation"
    assert {"before add_sequence", "after add_sequence", "before plan", "between forwards"} <= set(at.seen)
    assert len(outcomes) == 4 * len(at.seen)
    for where, name, e in outcomes:
        assert isinstance(e, RuntimeError), (where, name, e)
        msg = str(e)
        assert "this ChunkvaleCache is in use by generate() on thread 'MainThread'" in msg, (where, name, msg)
        assert "one generation at a time" in msg and "nothing was changed" in msg
    assert cache.kv_cache.stats().sequences == 2  # the generation's rows, and nothing else
    assert elsewhere(cache.release) is None  # the generation returned: its claim ended with it
    assert cache.kv_cache.stats().sequences == 0


def test_caches_on_one_kv_cache_take_turns_forward_by_forward(llama, monkeypatch):
    """Two ChunkvaleCaches on one KVCache: a forward of one in the middle of the other's is refused
    (the KVCache has one open step); between two forwards the other generates whole, and both
    give transformers' own tokens."""
    prompts, other = random_prompts(111, [30, 12]), random_prompts(112, [7, 18])
    want, want_other = (generate(llama, p, do_sample=False, max_new_tokens=4) for p in (prompts, other))
    first = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=1024)
    second = ChunkvaleCache(llama, first.kv_cache)
    ids, mask = left_padded(other)
    refused, others = [], []

    def second_generation():
        second.reset()
        others.append(generate(llama, other, second, do_sample=False, max_new_tokens=4))

    def second_forward():
        with torch.inference_mode():
            llama(ids, attention_mask=mask, cache=second)

    def hook(where):
        if where == "between forwards":
            assert elsewhere(second_generation) is None
        else:
            refused.append((where, elsewhere(second_forward)))

    at = Boundaries(monkeypatch, first.kv_cache, hook)
    got = generate(llama, prompts, first, do_sample=False, max_new_tokens=4, logits_processor=at.processor)
    assert torch.equal(got, want)
    assert len(others) == 4 and all(torch.equal(out, want_other) for out in others)
    assert refused
    for where, e in refused:
        assert isinstance(e, RuntimeError), (where, e)
        assert "forward: its kv_cache is in use by forward on thread 'MainThread'" in str(e), (where, str(e))
        assert "a KVCache runs one step at a time" in str(e)
    first.release()
    second.release()
    assert first.kv_cache.stats().sequences == 0


def test_an_interrupted_generation_does_not_hold_the_cache(llama):
    """A claim ends when its call returns or raises, Ctrl-C included: another thread then uses the
    cache, and its first forward undoes the interrupted one."""
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    prompts = random_prompts(121, [10, 17])

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = llama.model.layers[1].mlp.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(llama, prompts, cache, do_sample=False)
    finally:
        handle.remove()
    outs = []
    assert elsewhere(lambda: (cache.reset(), outs.append(generate(llama, prompts, cache, do_sample=False,
                                                                   max_new_tokens=3)))) is None
    assert torch.equal(outs[0], generate(llama, prompts, do_sample=False, max_new_tokens=3))
    assert elsewhere(cache.release) is None and cache.kv_cache.stats().sequences == 0


def test_engine_calls_from_another_thread_are_refused_in_the_middle_of_a_step(llama, monkeypatch):
    from chunkvale.engine import Engine, Request

    prompt = random_prompts(131, [20])
    engine = Engine(llama, chunk_size=16, capacity_tokens=512)
    cache = ChunkvaleCache(llama, engine.cache)
    ids, mask = left_padded(random_prompts(132, [6]))

    def forward():
        with torch.inference_mode():
            llama(ids, attention_mask=mask, cache=cache)

    outcomes = []
    Boundaries(monkeypatch, engine.cache, lambda where: outcomes.extend(
        (where, elsewhere(fn)) for fn in (lambda: engine.cancel(0), engine.step, forward)))
    got = engine.generate([Request(token_ids=prompt[0], max_new_tokens=4)], progress=False)
    assert got[0].samples[0].token_ids == generate(llama, prompt, do_sample=False, max_new_tokens=4)[0, 20:].tolist()
    assert outcomes
    for where, e in outcomes:
        assert isinstance(e, RuntimeError), (where, e)
        assert "its kv_cache is in use by Engine.step() on thread 'MainThread'" in str(e), (where, str(e))
    assert engine.cache.stats().sequences == 0
