"""The engine with eviction: budgeted decode attention and the host tier (device_chunks).

Reference points: a budget that covers every context changes nothing (same tokens as the dense
engine); the host tier only moves chunks between device and host, it never changes which chunks
a step attends (docs/API.md "Host tier"), so with the same budget and selection the tokens equal
those of an engine without a host tier, however small device_chunks is, as long as one request
fits. The host tier selects one set of chunks per sequence ("shared"); the default selection
resolves to it there and to "per_kv_head" without a host tier, so these runs name "shared"."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chunkvale  # noqa: E402
from chunkvale.engine import Engine, Request  # noqa: E402
from test_engine import model, rand_tokens  # noqa: E402,F401  (the same tiny random Llama)

C = 16
EVICTING = 1  # the tiny model has 2 layers; dense_layers=1 leaves one evicting layer


def evict(**kw):
    kw.setdefault("dense_layers", 2 - EVICTING)
    # The host tier's selection (its default) everywhere, so runs with and without it compare;
    # per-KV-head selection through the Engine: tests/test_passkey_replay.py.
    kw.setdefault("selection", "shared")
    return chunkvale.Eviction(**kw)


def serve(model, requests, eviction=None, capacity_tokens=4096):
    eng = Engine(model, chunk_size=C, capacity_tokens=capacity_tokens, eviction=eviction)
    results = eng.generate(requests, progress=False)
    return [[s.token_ids for s in r.samples] for r in results], eng


def workload():
    # A shared 40-token head (ends mid-chunk: copy-on-diverge tails), unrelated prompts, and a
    # sampled request with three forks.
    head = rand_tokens(40, 1)
    return [
        Request(token_ids=head + rand_tokens(110, 2), max_new_tokens=30),
        Request(token_ids=head + rand_tokens(75, 3), max_new_tokens=30),
        Request(token_ids=rand_tokens(170, 4), max_new_tokens=25),
        Request(token_ids=rand_tokens(130, 5), max_new_tokens=30, n=3, temperature=1.0, seed=9),
        Request(token_ids=head + rand_tokens(9, 6), max_new_tokens=30),
    ]


def test_budget_covering_every_context_gives_the_dense_engines_tokens(model):
    reqs = workload()
    dense, _ = serve(model, reqs)
    longest = max(len(r.token_ids) + r.max_new_tokens for r in reqs)
    budget = evict(budget_tokens=longest)
    same, eng = serve(model, reqs, budget)
    assert same == dense
    assert eng.cache.stats()["evict_dropped_chunks"] == 0
    # Host tier just big enough for the longest request alone (every chunk of a sequence within
    # budget is attended, so all of them must be on the device): the engine shrinks and
    # serialises steps, chunks go to host and come back, and the tokens are still exact.
    need = -(-(longest - 1) // C)  # 13: the 170-token prompt's last decode step (194 tokens)
    tiered, eng = serve(model, reqs, evict(budget_tokens=longest, device_chunks=need))
    assert tiered == dense
    st = eng.cache.stats()
    assert st["evict_device_chunks"] == need
    assert st["evict_evictions"] > 0 and st["evict_recalls"] > 0 and st["evict_bytes_from_host"] > 0
    assert st["evict_device_slots_in_use"] <= need * EVICTING


@pytest.mark.parametrize("device_chunks", [12, 16, 40])
def test_small_device_tier_completes_every_request_with_the_same_tokens(model, device_chunks):
    reqs = workload()
    kw = dict(budget_tokens=64, sink_chunks=1, window_chunks=1, topk_chunks=2)
    dense, _ = serve(model, reqs)
    budgeted, ref = serve(model, reqs, evict(**kw))
    assert budgeted != dense  # the budget really drops chunks from attention
    assert ref.cache.stats()["evict_dropped_chunks"] > 0
    tiered, eng = serve(model, reqs, evict(**kw, device_chunks=device_chunks))
    assert tiered == budgeted
    # The default selection with the host tier is the shared one: the same tokens.
    auto, _ = serve(model, reqs, evict(**kw, device_chunks=device_chunks, selection=None))
    assert auto == budgeted
    assert [len(samples) for samples in tiered] == [1, 1, 1, 3, 1]
    st = eng.cache.stats()
    assert st["evict_recalls"] > 0 and st["evict_evictions"] > 0
    assert st["evict_device_slots_in_use"] <= device_chunks * EVICTING
    if device_chunks == 12:  # the largest prompt (11 chunks) fits only nearly alone
        assert eng.metrics().steps > ref.metrics().steps


def test_step_shrinking_beats_preempting(model):
    # Two requests whose prefills do not fit the device together: the second one's prefill is
    # cut down (or waits) while the first decodes; nobody is sent back to recompute.
    reqs = [Request(token_ids=rand_tokens(150, 20), max_new_tokens=20),
            Request(token_ids=rand_tokens(140, 21), max_new_tokens=20)]
    kw = dict(budget_tokens=48, sink_chunks=1, window_chunks=1, topk_chunks=1)
    budgeted, _ = serve(model, reqs, evict(**kw))
    tiered, eng = serve(model, reqs, evict(**kw, device_chunks=12))
    assert tiered == budgeted
    assert eng.metrics().preemptions == 0


def test_a_request_that_cannot_fit_the_device_is_refused_at_submit(model):
    eng = Engine(model, chunk_size=C, capacity_tokens=4096,
                 eviction=evict(budget_tokens=64, sink_chunks=1, window_chunks=1, topk_chunks=2, device_chunks=5))
    # Prefill attends to every chunk: 81 tokens take 6 chunks > 5.
    with pytest.raises(ValueError,
                       match=r"request 0: request.token_ids: 81 tokens .* need up to 6 chunks .* eviction.device_chunks=5"):
        eng.submit(Request(token_ids=rand_tokens(81, 30), max_new_tokens=4))
    # Decode within budget attends to every chunk too: 70 + 15 - 1 > 64 = budget, so the
    # longest full-attention step is 64 tokens (4 chunks, fits); with budget 96 it would be 84.
    assert not eng.has_work()
    eng.submit(Request(token_ids=rand_tokens(70, 31), max_new_tokens=15))
    tight = Engine(model, chunk_size=C, capacity_tokens=4096,
                   eviction=evict(budget_tokens=96, sink_chunks=1, window_chunks=1, topk_chunks=2, device_chunks=5))
    with pytest.raises(ValueError, match="need up to 6 chunks"):
        tight.submit(Request(token_ids=rand_tokens(70, 31), max_new_tokens=15))
    # Exactly at the limit is accepted and served.
    ok = tight.generate([Request(token_ids=rand_tokens(80, 32), max_new_tokens=1)], progress=False)
    assert len(ok[0].samples[0].token_ids) == 1
    assert eng.run(progress=False)[0].samples[0].finish_reason == "length"


def test_samples_that_cannot_fit_even_alone_are_refused_at_submit(model):
    # The prompt fits (3 chunks), but 4 samples each keep a partial chunk on the device: the
    # one decoding needs its 3 chunks next to 3 partial chunks of its siblings.
    eng = Engine(model, chunk_size=C, capacity_tokens=4096,
                 eviction=evict(budget_tokens=48, sink_chunks=1, window_chunks=1, topk_chunks=1, device_chunks=5))
    with pytest.raises(ValueError, match=r"n=4 samples\) need up to 6 chunks .*eviction.device_chunks=5"):
        eng.submit(Request(token_ids=rand_tokens(40, 40), max_new_tokens=5, n=4, temperature=1.0))
    # Three samples fit, decoded one at a time when they must be: same tokens as without the tier.
    req = Request(token_ids=rand_tokens(40, 40), max_new_tokens=5, n=3, temperature=1.0, seed=2)
    tiered = eng.generate([req], progress=False)[0]
    budgeted, _ = serve(model, [req], evict(budget_tokens=48, sink_chunks=1, window_chunks=1, topk_chunks=1))
    assert [s.token_ids for s in tiered.samples] == budgeted[0]


def test_engine_eviction_argument_is_checked(model):
    with pytest.raises(TypeError, match="eviction: expected chunkvale.Eviction or None, got dict"):
        Engine(model, chunk_size=C, eviction={"budget_tokens": 64})
    cache = chunkvale.KVCache(chunkvale.CacheConfig(layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=C,
                                                    capacity_chunks=64))
    with pytest.raises(ValueError, match="eviction: .*cache=.*CacheConfig"):
        Engine(model, cache=cache, eviction=evict(budget_tokens=64))
    # The core's own validation still speaks for the fields.
    with pytest.raises(ValueError, match="device_chunks"):
        Engine(model, chunk_size=C, eviction=evict(budget_tokens=64, device_chunks=2))
    eng = Engine(model, chunk_size=C, eviction=evict(budget_tokens=64))
    assert eng.eviction.budget_tokens == 64


def test_admission_waits_while_partial_chunk_copies_do_not_fit(model):
    # Six prompts share a 20-token head: each admission copies its 4-token partial chunk, and
    # every live sequence's partial chunk stays on the device. With 4 device chunks a copy often
    # does not fit; those requests wait and still reuse the head when admitted.
    head = rand_tokens(20, 50)
    reqs = [Request(token_ids=head + rand_tokens(6, 51 + i), max_new_tokens=10) for i in range(6)]
    kw = dict(budget_tokens=48, sink_chunks=1, window_chunks=1, topk_chunks=1)
    budgeted, _ = serve(model, reqs, evict(**kw))
    eng = Engine(model, chunk_size=C, capacity_tokens=4096, eviction=evict(**kw, device_chunks=4))
    refused = []
    real = eng.cache.add_sequence

    def add_sequence(tokens, namespace="", max_reuse=None):
        try:
            return real(tokens, namespace=namespace, max_reuse=max_reuse)
        except chunkvale.CapacityError:
            refused.append(max_reuse)
            raise

    eng.cache.add_sequence = add_sequence
    results = eng.generate(reqs, progress=False)
    assert refused  # the situation under test happened
    assert [[s.token_ids for s in r.samples] for r in results] == budgeted
    assert [r.metrics.prefix_tokens_reused for r in results] == [0] + [20] * 5


def test_alone_a_partial_chunk_that_cannot_be_copied_is_computed(model):
    # device_chunks=1: the cached 16-token chunk matches 10 tokens of the next prompt, but a
    # copy needs a second device slot (copy and source); the engine reuses nothing and computes.
    x = rand_tokens(16, 60)
    y = x[:10] + rand_tokens(3, 61)
    kw = dict(budget_tokens=32, sink_chunks=0, window_chunks=1, topk_chunks=0)
    outs = []
    for ev in (evict(**kw), evict(**kw, device_chunks=1)):
        eng = Engine(model, chunk_size=C, capacity_tokens=4096, eviction=ev)
        eng.generate([Request(token_ids=x, max_new_tokens=1)], progress=False)
        res = eng.generate([Request(token_ids=y, max_new_tokens=4)], progress=False)[0]
        outs.append((res.samples[0].token_ids, res.metrics.prefix_tokens_reused))
    assert outs[0][1] == 10 and outs[1][1] == 0
    assert outs[1][0] == outs[0][0]


def _fork_runs(model, a, b, on_third_step=None):
    """A runs two steps, then B (n=4 samples, forked after its prefill) arrives. Once without a
    host tier, once with 5 device chunks; per run: every sample's tokens, how many forks the
    cache refused, and the engine's preemptions."""
    kw = dict(budget_tokens=48, sink_chunks=1, window_chunks=1, topk_chunks=1)
    outs = []
    for ev in (evict(**kw), evict(**kw, device_chunks=5)):
        eng = Engine(model, chunk_size=C, capacity_tokens=4096, eviction=ev)
        refused = []
        real = eng.cache.fork

        def fork(seq, n, real=real, refused=refused):
            try:
                return real(seq, n)
            except chunkvale.CapacityError:
                refused.append(seq)
                raise

        eng.cache.fork = fork
        ia = eng.submit(a)
        eng.step()
        eng.step()  # A decodes, with a partial chunk, when B arrives
        ib = eng.submit(b)
        done = {r.index: r for r in eng.step()}  # B's prefill completes and forks
        if on_third_step:
            on_third_step(ia, done)
        while eng.has_work():
            done.update({r.index: r for r in eng.step()})
        outs.append(([[s.token_ids for s in done[i].samples] for i in (ia, ib)], len(refused),
                     eng.metrics().preemptions))
    return outs


def test_a_fork_that_does_not_fit_preempts_a_newer_request(model):
    # B's 4 samples fork next to A's partial chunk: 2 live partial chunks + 3 copies + the copy
    # source = 6 > 5 device chunks. The engine preempts A (it restarts later, same tokens).
    a = Request(token_ids=rand_tokens(20, 70), max_new_tokens=30)
    b = Request(token_ids=rand_tokens(20, 71), max_new_tokens=5, n=4, temperature=1.0, seed=5)
    outs = _fork_runs(model, a, b)
    assert outs[0][1:] == (0, 0)
    assert outs[1][1] >= 1 and outs[1][2] >= 1
    assert outs[1][0] == outs[0][0]


def test_a_fork_first_takes_back_the_chunks_of_samples_that_just_finished(model):
    # As above, but A's last token comes in the very step B's prefill completes and forks: A's
    # finished sequence gives its chunks back first, so nothing complete is preempted and redone.
    a = Request(token_ids=rand_tokens(20, 70), max_new_tokens=3)
    b = Request(token_ids=rand_tokens(20, 71), max_new_tokens=5, n=4, temperature=1.0, seed=5)

    def a_finished(ia, done):
        assert ia in done and done[ia].samples[0].finish_reason == "length"

    outs = _fork_runs(model, a, b, on_third_step=a_finished)
    assert outs[0][1:] == (0, 0)
    assert outs[1][1] >= 1, "the fork should not have fit next to A's live partial chunk"
    assert outs[1][2] == 0
    assert outs[1][0] == outs[0][0]
