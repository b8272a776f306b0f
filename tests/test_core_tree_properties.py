"""Hypothesis state machines over the prefix tree.

Random operation sequences (add_sequence / plan+append+attention / fork / remove / clear /
cancel) run against a chunkvale.KVCache and the Shadow model in tests/reference.py, which
predicts n_cached and every chunk count; every step's attention is checked against the
float64 reference. A tiny token alphabet makes equal chunks under different parents, partial
matches and identical concurrent prompts common.

ExactTree: capacity large, nothing evicted: the model must match stats() exactly.
PressureTree: a small pool: cached prefixes get reclaimed; the model checks bounds, and that
CapacityError is raised only when live chunks leave no room (nothing evictable), leaving
the cache unchanged.

Example counts are modest by default (conftest profile "default");
CHUNKVALE_HYPOTHESIS_PROFILE=thorough runs many more.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from reference import Shadow

ALPHABET = 4  # tokens 0..3
C = 16
MAX_LIVE = 6
MAX_PROMPT = 70


def _cv():
    import chunkvale

    return chunkvale


tokens = st.lists(st.integers(0, ALPHABET - 1), min_size=0, max_size=MAX_PROMPT)


class TreeMachine(RuleBasedStateMachine):
    MEMORY = "exact"
    CAPACITY = 4096

    def __init__(self):
        super().__init__()
        self.cv = _cv()
        self.sh = None
        self.corpus = [[]]  # token lists seen (prompts and committed histories) to cut prefixes from

    @initialize(hq=st.sampled_from([(4, 2), (3, 3), (6, 1)]), thr=st.sampled_from([1, 2, 3, 1 << 30]),
                seed=st.integers(0, 2**31 - 1), system=st.lists(st.integers(0, ALPHABET - 1), min_size=1,
                                                                 max_size=3 * C + 5))
    def setup(self, hq, thr, seed, system):
        self.sh = Shadow(self.cv, layers=2, q_heads=hq[0], kv_heads=hq[1], head_dim=64, chunk_size=C,
                         capacity_chunks=self.CAPACITY, share_threshold=thr, seed=seed, memory=self.MEMORY)
        # a "system prompt", prefilled, that later prompts may start with
        sid, _ = self.sh.add(system)
        self.sh.run_step([(sid, len(system))])
        self.corpus.append(list(system))

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: self.sh is not None and len(self.sh.seqs) < MAX_LIVE)
    @rule(src=st.integers(0, 10**6), cut=st.integers(0, MAX_PROMPT), tail=tokens,
          ns=st.sampled_from(["", "", "b"]), cap_reuse=st.booleans())
    def add(self, src, cut, tail, ns, cap_reuse):
        base = self.corpus[src % len(self.corpus)]
        p = (base[:cut] + tail)[:MAX_PROMPT] or [0]
        mr = len(p) - 1 if cap_reuse else None
        self._guard(lambda: self.sh.add(p, namespace=ns, max_reuse=mr), need=None)
        self.corpus.append(p)

    @precondition(lambda self: self.sh is not None and self.sh.seqs)
    @rule(data=st.data())
    def step(self, data):
        sh = self.sh
        live = sh.live()
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live), unique=True))
        entries = []
        for sid in chosen:
            pending = sh.pending_after_open(sid)
            if pending > 0:
                entries.append((sid, data.draw(st.integers(1, pending))))
            else:
                entries.append((sid, data.draw(st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=3))))
        order = data.draw(st.sampled_from(["interleaved", "append_first"]))
        if self._guard(lambda: sh.plan(entries), need=lambda: sh.slots_needed_by_plan(entries)):
            for layer in range(sh.layers) if order == "interleaved" else ():
                sh.append(layer)
                sh.attend(layer)
            if order == "append_first":
                for layer in range(sh.layers):
                    sh.append(layer)
                for layer in range(sh.layers):
                    sh.attend(layer)
            if data.draw(st.booleans()):  # step.commit(); else the next call that starts work commits it
                sh.commit()
            sh.steps_run += 1
            for sid, _ in entries:
                self.corpus.append(list(sh.seqs[sid].tokens))

    # steps are what the cache is for: give them three times the weight of the other rules
    @precondition(lambda self: self.sh is not None and self.sh.seqs)
    @rule(data=st.data())
    def step_again(self, data):
        self.step(data)

    @precondition(lambda self: self.sh is not None and self.sh.seqs)
    @rule(data=st.data())
    def step_once_more(self, data):
        self.step(data)

    @precondition(lambda self: self.sh is not None and self.sh.seqs and len(self.sh.seqs) < MAX_LIVE)
    @rule(data=st.data(), n=st.integers(1, 2))
    def fork(self, data, n):
        sid = data.draw(st.sampled_from(self.sh.live()))
        sh = self.sh
        self._guard(lambda: sh.fork(sid, n),
                    need=lambda: n * (1 if sh.seqs[sid].length % C else 0))

    @precondition(lambda self: self.sh is not None and self.sh.seqs)
    @rule(data=st.data())
    def remove(self, data):
        self.sh.remove(data.draw(st.sampled_from(self.sh.live())))

    @precondition(lambda self: self.sh is not None and self.sh.open is None)
    @rule()
    def clear(self):
        self.sh.clear()

    @precondition(lambda self: self.sh is not None and self.sh.seqs)
    @rule(data=st.data())
    def cancel(self, data):
        sh = self.sh
        sid = data.draw(st.sampled_from(sh.live()))
        entry = sh.random_entry(sid, max_new=20)
        if self._guard(lambda: sh.plan([entry]), need=lambda: sh.slots_needed_by_plan([entry])):
            for layer in range(data.draw(st.integers(0, sh.layers - 1))):
                sh.append(layer)
                sh.attend(layer)
            sh.cancel()

    # ------------------------------------------------------------------ capacity
    def _guard(self, fn, need):
        """Run fn; in the exact machine it must succeed. Returns True when it did."""
        fn()
        return True

    @invariant()
    def pool_accounting(self):
        if self.sh is not None:
            st_ = self.sh.cache.stats()
            assert st_["chunks_in_use"] + st_["chunks_free"] == st_["capacity_chunks"]
            assert 0 <= st_["chunks_in_use"] <= st_["capacity_chunks"]

    def teardown(self):
        sh = self.sh
        if sh is None:
            return
        if sh.open is not None and len(sh.open.appended) < sh.layers:
            sh.cancel()
        for sid in sh.live():
            sh.remove(sid)
        sh.clear()
        st_ = sh.check_stats("teardown")
        assert st_["chunks_in_use"] == 0 and st_["sequences"] == 0, st_


class PressureTree(TreeMachine):
    MEMORY = "bounds"
    CAPACITY = 9

    def _guard(self, fn, need):
        sh = self.sh
        op = sh.open  # a complete step is committed first, so a call that fails has no commit to make
        if op is not None and not op.committed and len(op.appended) == sh.layers:
            sh.commit()
        sh.check_stats("sync")
        snap = sh.snapshot()
        before = sh.cache.stats()
        avail = sh.available_slots()  # free + cached (evictable) + deferred copies
        try:
            fn()
            return True
        except self.cv.CapacityError as e:
            sh.restore(snap)
            assert "capacity" in str(e).lower() or "slot" in str(e).lower(), str(e)
            if need is None:  # add_sequence: at most one slot (a partial tail copy)
                assert avail <= 0, f"add_sequence raised CapacityError with {avail} free or evictable slots"
            else:
                n = need()
                assert n > avail, f"CapacityError although {n} slots were needed and {avail} free or evictable"
            assert sh.cache.stats() == before, "a call that raised CapacityError changed the cache"
            return False


_N = settings.default.max_examples  # 25 in conftest's "default" profile, 300 in "thorough"
TestExactTree = TreeMachine.TestCase
TestExactTree.settings = settings(settings.default, max_examples=6 * _N, stateful_step_count=30)
TestPressureTree = PressureTree.TestCase
TestPressureTree.settings = settings(settings.default, max_examples=6 * _N, stateful_step_count=30)
