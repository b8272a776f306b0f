"""Several engines on several threads over one model object: each gets exactly the tokens it
gets alone, the model's config is never switched (``_attn_implementation`` stays what it was,
read from any thread), and the model's own attention keeps working on another thread meanwhile."""

import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkvale.engine import Engine, Request  # noqa: E402
from test_engine import model, rand_tokens  # noqa: E402,F401  (the same tiny random Llama)

C = 16
THREADS = 3


def workload(t):
    head = rand_tokens(37, 100 + t)
    return [Request(token_ids=head + rand_tokens(5 + i, 200 + 10 * t + i), max_new_tokens=6 + i,
                    n=1 + (i == 1), temperature=0.7 if i == 1 else 0.0, seed=t) for i in range(3)]


def serve(model, t):
    # Several steps per prefill; one attention thread each (the engines already run side by side).
    eng = Engine(model, chunk_size=C, capacity_tokens=1024, max_step_tokens=48, threads=1)
    return [[s.token_ids for s in r.samples] for r in eng.generate(workload(t), progress=False)]


def test_engines_on_threads_share_one_model(model):
    before = model.config._attn_implementation
    alone = [serve(model, t) for t in range(THREADS)]
    ids = torch.tensor([rand_tokens(24, 7)])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits

    got, errors, plain_ok = {}, [], []
    barrier = threading.Barrier(THREADS + 1)

    def engine_thread(t):
        try:
            barrier.wait()
            got[t] = serve(model, t)
        except BaseException as e:  # reported below, with the thread
            errors.append((t, repr(e)))

    def plain_thread():
        try:
            barrier.wait()
            for _ in range(4):
                # Read on a thread that runs no chunkvale step: the model's own attention.
                assert model.config._attn_implementation == before
                with torch.inference_mode():
                    plain_ok.append(torch.allclose(model(input_ids=ids).logits, plain, atol=1e-5))
        except BaseException as e:
            errors.append(("plain", repr(e)))

    threads = [threading.Thread(target=engine_thread, args=(t,)) for t in range(THREADS)]
    threads.append(threading.Thread(target=plain_thread))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
    assert plain_ok == [True] * 4
    for t in range(THREADS):
        assert got[t] == alone[t], f"thread {t}"
    assert model.config._attn_implementation == before
    # Each attention module reads the model's config through chunkvale's view: same object
    # underneath, so a change made through the model is seen by every layer.
    layer_config = model.model.layers[0].self_attn.config
    assert layer_config.hidden_size == model.config.hidden_size
    assert layer_config._attn_implementation == before
