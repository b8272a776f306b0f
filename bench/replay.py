"""Replaying a recorded prefill: the shared machinery of bench/passkey.py and bench/fidelity.py.

Budgeted attention only budgets decode steps (prefill rows attend to everything), so a prompt's
K/V are the same under every eviction config. The full-cache run goes through the plain Engine
once, with a :class:`PrefillRecorder` keeping each prefill step's K/V per layer; every
configuration then gets a fresh KVCache fed those K/V in the same steps (:func:`feed_prefill`)
and decodes from there. tests/test_passkey_replay.py checks that this gives the plain Engine's
tokens under every configuration.
"""

from __future__ import annotations

import chunkvale
from chunkvale.engine import Engine, Request


class PrefillRecorder:
    """Stands in for a KVCache during one single-request Engine run: passes every call through,
    and keeps each prompt step's K/V per layer (rows at positions < ``prompt_len``).

    ``steps``: one ``(n_tokens, [k per layer], [v per layer])`` per prefill step, in order.
    """

    def __init__(self, cache, prompt_len: int):
        self._cache = cache
        self._prompt_len = prompt_len
        self._open = None  # step id being recorded
        self.steps = []

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def append(self, layer, step, k, v):
        self._cache.append(layer, step, k, v)
        if int(step.positions.max()) >= self._prompt_len:
            if int(step.positions.min()) < self._prompt_len:
                raise ValueError("a step mixes prompt and decode rows; record one request at a time")
            return
        if self._open != step.id:
            if layer != 0:
                raise ValueError(f"layer {layer} appended before layer 0 of step {step.id}")
            self._open = step.id
            self.steps.append((step.num_tokens, [], []))
        n, ks, vs = self.steps[-1]
        if layer != len(ks):
            raise ValueError(f"layer {layer} appended out of order (expected {len(ks)})")
        ks.append(k.detach().clone())
        vs.append(v.detach().clone())


def engine_run(model, tokenizer, cfg, prompt, max_new_tokens, record=False, **engine_kw):
    """Greedy tokens of the plain Engine on a fresh cache; with ``record``, also the prefill steps."""
    cache = chunkvale.KVCache(cfg)
    recorder = PrefillRecorder(cache, len(prompt)) if record else None
    engine = Engine(model, tokenizer, cache=recorder or cache, **engine_kw)
    out = engine.generate([Request(token_ids=prompt, max_new_tokens=max_new_tokens)], progress=False)[0]
    tokens = out.samples[0].token_ids
    return (tokens, recorder.steps) if record else tokens


def feed_prefill(cache, prompt, steps) -> int:
    """Adds ``prompt`` to a fresh ``cache`` and appends the recorded ``steps`` (a
    :class:`PrefillRecorder`'s) in the same step sizes; returns the sequence id. The last step
    commits at the cache's next plan."""
    seq, n_cached = cache.add_sequence(prompt)
    if n_cached:
        raise RuntimeError(f"fresh cache reused {n_cached} tokens")
    if sum(n for n, _, _ in steps) != len(prompt):
        raise ValueError(f"steps hold {sum(n for n, _, _ in steps)} tokens, the prompt {len(prompt)}")
    for n, ks, vs in steps:
        step = cache.plan([(seq, n)])  # the next plan commits and ends the previous step
        for layer, (k, v) in enumerate(zip(ks, vs)):
            cache.append(layer, step, k, v)
    return seq
