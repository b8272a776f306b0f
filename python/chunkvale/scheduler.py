"""The continuous-batching scheduler: which requests run, and what each step computes.

It owns the requests' state (waiting and running queues, each sample's cache sequence and
tokens) and every cache call that changes them: admission (``add_sequence`` reuses the longest
cached prefix), the step's batch (``plan``: each decoding sample's last token, then prompt
slices up to the step's token budget), backing off when a step does not fit, recompute
preemption, forking a request's samples once its prompt is in the cache, and releasing what
finished. It runs no model and imports no torch: the engine loop (engine.py) feeds a planned
:class:`Batch` through the model and passes ``advance`` the logits and its sampler.
"""

from __future__ import annotations

import time

import numpy as np

from .batch import Batch, BatchEntry, Fork
from .metrics import EngineCounters
from .request_state import RequestState, SampleState


class Scheduler:
    """Request state and the cache calls that change it (module docstring). ``counters``: the
    engine's metrics counters, told of admissions, restarts and preemptions. ``namespace_prefix``:
    put before every request's namespace in the cache (the engine's model's, so that models
    sharing a cache never share prefixes)."""

    def __init__(self, cache, *, chunk_size: int, max_batch_size: int, max_step_tokens: int,
                 counters: EngineCounters, namespace_prefix: str = ""):
        self.cache = cache
        self.namespace_prefix = namespace_prefix
        self.chunk_size = chunk_size
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.counters = counters
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self.isolate: set[int] = set()  # requests to run one at a time (a shared step failed)
        self._failed: list[RequestState] = []  # failed since take_failed()

    # -- queue ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queue(self, req: RequestState) -> None:
        self.waiting.append(req)
        self.counters.queued(req)

    def cancel(self, index: int) -> RequestState | None:
        """Take request ``index`` out (waiting or running) and release it; None if it is neither."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.index == index:
                    queue.remove(req)
                    self._release(req, "cancelled")
                    return req
        return None

    def take_failed(self) -> list[RequestState]:
        failed, self._failed = self._failed, []
        return failed

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """Admit what can start, then plan the step. None: nothing to run (idle, everything
        preempted back to the queue, or the one request that could run failed)."""
        self._admit()
        return self._plan() if self.running else None

    def advance(self, batch: Batch, logits, emit) -> None:
        """The model ran ``batch``; ``logits[i]`` belong to ``batch.sampled[i]``. Each of those
        samples gets its next token from ``emit(sample, row_logits)`` (the engine samples and
        applies the stop rules); then requests whose prompt just completed fork, and their other
        samples draw their first token from the same logits."""
        batch.step.commit()  # every layer was appended: the step's tokens are cached from here on
        forks = self._commit(batch)
        for s, row_logits in zip(batch.sampled, logits):
            emit(s, row_logits)
        for fork in forks:
            for child in self._fork(fork.request):
                emit(child, logits[fork.row])

    def _commit(self, batch: Batch) -> list[Fork]:
        """Count ``batch``'s tokens as in the cache, and note first tokens. Returns the requests
        to fork (n > 1, the prompt just completed), each with its row of ``batch.sampled``."""
        now = time.perf_counter()
        forks, row = [], 0
        for e in batch.entries:
            s, req = e.sample, e.sample.request
            if e.prefill:
                req.prefilled += e.new
                s.length += e.new
            else:
                s.length += 1
            if not e.wants_logits:
                continue
            if req.first_token is None:
                req.first_token = now
                if req.params.n > 1:
                    forks.append(Fork(req, row))
            row += 1
        return forks

    def _fork(self, req: RequestState) -> list[SampleState]:
        """Fork ``req``'s prompt for its other samples (they share all its full chunks) and return
        them. Preempts newer requests while the copies of its partial chunk do not fit (pool or
        device slots); fails ``req`` if it cannot fork even alone. [] when it failed, or was
        preempted itself by an earlier fork of this step."""
        import chunkvale

        if req not in self.running:
            return []
        parent = req.samples[0]
        while True:
            try:
                seqs = self.cache.fork(parent.seq, req.params.n - 1)
                break
            except chunkvale.CapacityError as e:
                # Samples that finished in this very step give their chunks back first (retire()
                # would release them right after): that preempts nothing complete.
                # Not a parent still to be forked (this one or a later one of this step: its
                # first token may have finished it), which the fork copies.
                finished = [s for r in self.running for s in r.samples
                            if s.finish_reason is not None and s.seq is not None and len(r.samples) == r.params.n]
                for s in finished:
                    self.cache.remove(s.seq)
                    s.seq = None
                if finished:
                    continue
                others = [r for r in self.running if r is not req and any(s.seq is not None for s in r.samples)]
                if not others:
                    self._fail(req, chunkvale.CapacityError(
                        f"request {req.index}: its n={req.params.n} samples do not fit the KV cache even alone; "
                        f"lower n or raise the cache's capacity. The cache said: {e}"))
                    return []
                victim = others[-1]
                self.running.remove(victim)
                self._preempt(victim)
        children = [SampleState(request=req, sample_index=i, seq=seq, length=parent.length)
                    for i, seq in enumerate(seqs, start=1)]
        req.samples.extend(children)
        return children

    def retire(self) -> list[RequestState]:
        """Release the sequences of finished samples; returns the requests all of whose samples
        finished (their full chunks stay in the cache as prefix for later requests)."""
        finished, keep = [], []
        for req in self.running:
            for s in req.samples:
                if s.finish_reason is not None and s.seq is not None:
                    self.cache.remove(s.seq)
                    s.seq = None
            if len(req.samples) == req.params.n and all(s.finish_reason for s in req.samples):
                self.isolate.discard(req.index)
                finished.append(req)
            else:
                keep.append(req)
        self.running = keep
        return finished

    def forward_failed(self, batch: Batch, error: Exception) -> None:
        """The model raised on ``batch``. Alone, its request fails. Which of several made it fail
        is unknown: run them again one at a time (from scratch, same seeds), so that only one that
        fails alone fails."""
        self._drop(batch)
        if len(self.running) == 1:
            self._fail(self.running[0], error)
        else:
            self.isolate.update(r.index for r in self.running)
            self._restart_running()

    def abandon(self, batch: Batch) -> None:
        """Something else interrupted ``batch`` (e.g. Ctrl-C in a server loop): leave the cache and
        the queue consistent for whoever handles it; the running requests restart later."""
        self._drop(batch)
        self._restart_running()

    def live_lengths(self) -> list[int]:
        return [s.length for req in self.running for s in req.samples if s.seq is not None]

    # -- internals --------------------------------------------------------------------------

    def _live_samples(self) -> int:
        return sum(len(r.samples) if r.samples else r.params.n for r in self.running)

    def _shares_inflight_prefill(self, req: RequestState) -> bool:
        """True if a request still prefilling will soon cache at least one chunk of ``req``'s
        prompt: admitting ``req`` now would compute that prefix twice instead of reusing it."""
        for other in self.running:
            if not other.prefilling or other.params.namespace != req.params.namespace:
                continue
            m = min(len(other.prompt), len(req.prompt))
            diff = np.flatnonzero(np.asarray(other.prompt[:m]) != np.asarray(req.prompt[:m]))
            common = int(diff[0]) if diff.size else m
            if common >= self.chunk_size and common > other.prefilled:
                return True
        return False

    def _admit(self) -> None:
        """Start waiting requests, in order, while the batch has room."""
        import chunkvale

        still_waiting = []
        full_up = False
        for req in self.waiting:
            if (full_up or self._live_samples() + req.params.n > self.max_batch_size
                    or (self.isolate and self.running) or self._shares_inflight_prefill(req)):
                still_waiting.append(req)
                continue
            # max_reuse: the last prompt token is always computed, its logits give the first token.
            try:
                seq, n_cached = self.cache.add_sequence(req.prompt, namespace=self.namespace_prefix + req.params.namespace,
                                                        max_reuse=len(req.prompt) - 1)
            except (ValueError, TypeError, KeyError) as e:
                self._fail(req, e)
                continue
            except chunkvale.CapacityError:
                # Reusing a partial chunk needs a copy in a free slot (and, with a host tier, a
                # device slot next to every live sequence's partial chunk). While others run, the
                # cache is full: wait (in order) rather than be preempted at once. Alone, reuse whole
                # chunks only and compute the rest: that needs no copy.
                if self.running:
                    full_up = True
                    still_waiting.append(req)
                    continue
                full = (len(req.prompt) - 1) // self.chunk_size * self.chunk_size
                try:
                    seq, n_cached = self.cache.add_sequence(req.prompt, namespace=self.namespace_prefix + req.params.namespace,
                                                            max_reuse=full)
                except (chunkvale.CapacityError, ValueError, TypeError, KeyError) as e:
                    self._fail(req, e)
                    continue
            req.admitted = time.perf_counter()
            req.n_cached = req.prefilled = int(n_cached)
            self.counters.admitted(req)
            req.samples = [SampleState(request=req, sample_index=0, seq=seq, length=req.n_cached)]
            self.running.append(req)
        self.waiting = still_waiting

    def _batch(self, prefill_limit: int | None = None, decode_limit: int | None = None) -> Batch:
        """The step's entries: every decoding sample, then prompt slices up to the step's token
        budget. A smaller step, when the full one does not fit: at most ``decode_limit`` decoding
        samples (the oldest) and ``prefill_limit`` prompt tokens."""
        entries = []
        budget = self.max_step_tokens
        decoding = 0
        # Decoding samples first: one token each, so prefill never starves generation.
        for req in self.running:
            if req.prefilling:
                continue
            for s in req.samples:
                if s.finish_reason is None and budget > 0 and (decode_limit is None or decoding < decode_limit):
                    decoding += 1
                    entries.append(BatchEntry(s, [s.tokens[-1]], [s.tokens[-1]], wants_logits=True))
                    budget -= 1
        if prefill_limit is not None:
            budget = min(budget, prefill_limit)
        for req in self.running:
            pending = len(req.prompt) - req.prefilled
            if pending <= 0 or budget <= 0:
                continue
            take = min(pending, budget)
            entries.append(BatchEntry(req.samples[0], take, req.prompt[req.prefilled:req.prefilled + take],
                                      wants_logits=take == pending))  # logits once the prompt is done
            budget -= take
        return Batch(entries)

    def _plan(self) -> Batch | None:
        """Plan the largest step that fits the cache. When one does not (the pool, or with a host
        tier the device slots of an evicting layer), cheapest first: (1) prefill fewer prompt
        tokens (halving, down to none), (2) decode fewer samples (halving, down to one), (3)
        preempt the newest request; alone, the request fails."""
        import chunkvale

        prefill_limit = decode_limit = None
        batch = self._batch()
        error = None
        while True:
            if batch.entries:
                try:
                    batch.step = self.cache.plan(batch.plan_entries)
                    return batch
                except chunkvale.CapacityError as e:
                    error = e
                if batch.prefill_tokens:
                    prefill_limit = batch.prefill_tokens // 2
                    batch = self._batch(prefill_limit, decode_limit)
                    continue
                if batch.decoding > 1:
                    decode_limit = batch.decoding // 2
                    batch = self._batch(prefill_limit, decode_limit)
                    continue
            elif error is None:
                return None
            if len(self.running) <= 1:
                # The field to raise: the engine sizes the pool in tokens; the host tier's fields are
                # the Eviction's own.
                what = (f"raise {error.resource}" if error.resource in ("eviction.device_chunks", "eviction.host_bytes")
                        else "raise capacity_tokens (now {} chunks of {} tokens)".format(
                            self.cache.stats()["capacity_chunks"], self.chunk_size))
                self._fail(self.running[0], chunkvale.CapacityError(
                    f"KV cache too small for this request, even one prefill/decode step of it alone; "
                    f"{what}. The cache said: {error}"))
                return None
            # Recompute preemption: the newest request goes back to the queue (its cache sequences
            # are released; its prefix stays cached, so re-admission is cheap).
            self._preempt(self.running.pop())
            prefill_limit = decode_limit = None
            batch = self._batch()
            if not batch.entries:
                return None

    def _preempt(self, req: RequestState) -> None:
        self._restart(req)
        self.counters.preempted()

    def _restart(self, req: RequestState) -> None:
        """Release a running request's sequences and queue it again from scratch (front of the
        queue). Its RNGs restart from the seed, so a seeded request gives the same samples."""
        for s in req.samples:
            if s.seq is not None:
                self.cache.remove(s.seq)
        self.counters.requeued(req)
        self.waiting.insert(0, req.restarted())

    def _restart_running(self) -> None:
        for req in reversed(self.running):
            self._restart(req)
        self.running = []

    def _drop(self, batch: Batch) -> None:
        batch.step.cancel()  # idempotent; a committed step stays committed (batch.step.committed)

    def _release(self, req: RequestState, reason: str) -> None:
        """Give back ``req``'s sequences; samples that had not finished end with ``reason``."""
        for s in req.samples:
            if s.seq is not None:
                self.cache.remove(s.seq)
                s.seq = None
            if s.finish_reason is None:
                s.finish_reason = reason
        self.isolate.discard(req.index)

    def _fail(self, req: RequestState, error: BaseException) -> None:
        """``req`` cannot go on: release its sequences and report it (take_failed) with the error
        and what it generated so far; every other request carries on."""
        if req in self.running:
            self.running.remove(req)
        self._release(req, "error")
        req.error, req.ended = f"{type(error).__name__}: {error}", time.perf_counter()
        self._failed.append(req)
