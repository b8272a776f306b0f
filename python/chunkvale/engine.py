"""A continuous-batching generation engine on a chunkvale KVCache.

Every step the scheduler (1) admits waiting requests (``add_sequence`` reuses the longest cached
prefix, so those prompt tokens are never computed), (2) packs the next slice of each prefilling
prompt and the last token of each decoding sequence into one ``cache.plan``, (3) runs the model
once for the whole step (each layer: ``cache.append`` + ``cache.attention``), (4) samples, and
(5) retires finished sequences (``cache.remove``; their full chunks stay as cached prefix).
Requests join and leave at every step; n > 1 samples fork the prompt once it is prefilled.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from . import hf, requests, sampling
from .requests import Request  # noqa: F401  (part of this module's API)


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error" (the request failed first) | "cancelled"


@dataclass
class RequestMetrics:
    prompt_tokens: int
    prefix_tokens_reused: int  # prompt tokens served from the cache (not computed)
    queue_s: float | None  # submit -> admitted (None: failed before)
    ttft_s: float | None  # submit -> first token (None: failed before)
    prefill_s: float | None  # admitted -> first token
    generated_tokens: int
    total_s: float  # submit -> last sample finished
    decode_tokens_per_s: float  # generated tokens after the first, per second, all samples


@dataclass
class Result:
    request: Request
    index: int  # order of submission
    samples: list[Sample]
    metrics: RequestMetrics
    # None, or why the request failed while running ("CapacityError: ..."): then the samples
    # hold the tokens generated until then, unfinished ones with finish_reason "error".
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EngineMetrics:
    requests: int
    prompt_tokens: int
    prefix_tokens_reused: int
    generated_tokens: int
    steps: int
    wall_s: float
    tokens_per_s: float  # generated tokens / wall time
    kv_bytes_peak: int  # what the cache's pool actually held at its peak
    kv_bytes_peak_unshared: int  # same sequences, every one holding its own chunks
    kv_bytes_in_use: int
    preemptions: int

    @property
    def kv_sharing_ratio(self) -> float:
        return self.kv_bytes_peak / self.kv_bytes_peak_unshared if self.kv_bytes_peak_unshared else 1.0


@dataclass
class _Seq:
    """One sample being generated (a cache sequence)."""

    req: "_Req"
    sample_index: int
    seq: int | None = None
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache for this sequence (committed or in the current step)
    finish_reason: str | None = None
    text: str | None = None


@dataclass
class _Req:
    request: Request
    index: int
    prompt: list[int]
    submitted: float
    admitted: float | None = None
    first_token: float | None = None
    n_cached: int = 0
    prefilled: int = 0  # prompt tokens in the cache (cached + computed)
    seqs: list[_Seq] = field(default_factory=list)
    p: requests.Checked = None  # the validated parameters
    stop_ids: frozenset = frozenset()  # p.stop_ids plus EOS unless ignored


def encode_request(tokenizer, request: Request, vocab_size: int | None = None) -> list[int]:
    """Token ids of a request's prompt, chat template applied for ``messages``."""
    return requests.encode(tokenizer, request, vocab_size if vocab_size is not None else 2**63)


class Engine:
    """Continuous-batching generation through a transformers model whose attention runs in chunkvale.

    ``capacity_tokens`` sizes the KV pool (chunks of ``chunk_size`` tokens, every layer);
    ``max_batch_size`` caps concurrent sequences; ``max_step_tokens`` caps the tokens of one step
    (long prompts are prefilled over several steps while others keep decoding).
    ``eviction``: a :class:`chunkvale.Eviction` for the cache the engine builds (budgeted decode
    attention; with ``device_chunks``, the bounded device tier backed by host memory). When a step
    does not fit the cache (``CapacityError`` from ``plan``: pool or ``device_chunks``), the engine
    first prefills fewer tokens in that step (down to none), then decodes fewer sequences (down to
    one), and only then preempts the newest request. Requests are validated completely at
    ``submit`` (a prompt the pool, or with ``device_chunks`` the device tier, could not hold even
    alone is refused there); one that still cannot go on while running (e.g. its decode outgrows
    the pool alone, or the model raises on it) *fails alone*: its :class:`Result` carries
    ``error`` and the tokens generated until then, and every other request carries on.

    On CPU, start the process with ``OMP_WAIT_POLICY=PASSIVE`` (the CLI sets it): torch's spinning
    OpenMP workers otherwise hold the cores that chunkvale's attention threads need in every layer
    (2-6x slower steps measured on 2 cores).
    """

    def __init__(self, model, tokenizer=None, *, cache=None, chunk_size: int = 64, capacity_tokens: int = 32768,
                 max_batch_size: int = 64, max_step_tokens: int = 2048, threads: int = 0, eviction=None):
        import chunkvale

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected >= 1, got {max_batch_size}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens: expected >= 1, got {max_step_tokens}")
        if cache is None:
            if capacity_tokens < chunk_size:
                raise ValueError(f"capacity_tokens: expected >= chunk_size ({chunk_size}), got {capacity_tokens}")
            if eviction is not None and not isinstance(eviction, chunkvale.Eviction):
                raise TypeError(f"eviction: expected chunkvale.Eviction or None, got {type(eviction).__name__}")
            cfg = hf.cache_config(model, chunk_size=chunk_size, capacity_chunks=capacity_tokens // chunk_size,
                                  threads=threads)
            cfg.eviction = eviction
            cache = chunkvale.KVCache(cfg)
        elif eviction is not None:
            raise ValueError("eviction: the engine only configures a cache it builds; with cache=..., "
                             "give the Eviction in that cache's CacheConfig")
        self.cache = cache
        self.eviction = getattr(getattr(cache, "config", None), "eviction", None)
        self.runner = hf.ModelRunner(model, cache)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        stats = cache.stats()
        self.bytes_per_chunk = int(stats["bytes_per_chunk"])
        self.chunk_size = int(getattr(getattr(cache, "config", None), "chunk_size", chunk_size))
        self.vocab_size = int(model.config.vocab_size)
        limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "sliding_window", None)]
        # chunkvale attends to the whole context, which matches a sliding-window model only below its window.
        self.max_context = min((int(x) for x in limits if x), default=None)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(int(t) for t in eos)
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._submitted = 0
        self._failed: list[Result] = []  # failed since the last step() returned
        self._isolate: set[int] = set()  # requests to run one at a time (a shared step failed)
        self._reset_metrics()

    # -- public API -------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Validate a request completely and queue it; it joins the batch at the next step.
        Returns its index. Bad fields raise TypeError/ValueError naming ``request.<field>``."""
        return self._queue(self._validate(request))

    def cancel(self, index: int) -> Result | None:
        """Stop request ``index`` (waiting or running; between steps): its sequences are released
        and its Result returned at once, with the tokens generated so far and finish_reason
        "cancelled" on unfinished samples. None if it is not queued or running (e.g. finished)."""
        for queue in (self._waiting, self._running):
            for req in queue:
                if req.index == index:
                    queue.remove(req)
                    self._release(req, "cancelled")
                    if not self.has_work():
                        self._end = time.perf_counter()
                    return self._result(req)
        return None

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[Result]:
        """Run one batched forward pass; returns the requests that finished in it, failed ones
        included (``Result.error``). A request that cannot run fails alone: the others go on."""
        if self._start is None:
            self._start = time.perf_counter()
        self._end = None  # more work after an idle spell extends the measurement window
        self._admit()
        step = self._plan() if self._running else None
        if step is None:  # nothing to run, everything preempted back to the queue, or failed
            return self._take_failed()
        batch, entries, ids, rows = self._current
        try:
            logits = self.runner.forward(step, ids, [r for r in rows if r is not None])
        except Exception as e:
            self._drop_step(step)
            if len(self._running) == 1:
                self._fail(self._running[0], e)
            else:
                # Which request made the model fail is unknown: run these again one at a time
                # (from scratch, same seeds), so that only one that fails alone fails.
                self._isolate.update(r.index for r in self._running)
                self._requeue_running()
            return self._take_failed()
        except BaseException:
            # Leave cache and queue consistent for whoever handles the error (e.g. Ctrl-C in a
            # server loop): drop the half-done step, and restart the running requests later.
            self._drop_step(step)
            self._requeue_running()
            raise
        self._steps += 1
        self._consume(batch, entries, rows, logits)
        self._account_memory()
        return self._take_failed() + self._retire()

    def generate(self, requests: Iterable[Request], progress: bool | None = None) -> list[Result]:
        """Serve ``requests`` to completion; results in submission order. Every request is
        validated before any is queued, so a bad one leaves the engine as it was."""
        first = self._submitted
        try:
            checked = [self._validate(r) for r in requests]
        except BaseException:
            self._submitted = first
            raise
        indices = [self._queue(req) for req in checked]
        done = {r.index: r for r in self.run(progress)}
        return [done[i] for i in indices]

    def run(self, progress: bool | None = None) -> list[Result]:
        """Step until every submitted request finished; their results in submission order.
        ``progress``: True shows a tqdm bar, None shows one only if the run lasts over 2 s."""
        return sorted(self.stream(progress), key=lambda r: r.index)

    def stream(self, progress: bool | None = None) -> Iterator[Result]:
        """Like :meth:`run`, but yields each result as soon as its request finishes (or fails),
        so a caller keeps every finished result even if the loop is interrupted."""
        bar = None
        if progress is not False:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self._waiting) + len(self._running), unit="req", desc="generating",
                       delay=0 if progress else 2.0, dynamic_ncols=True)
        try:
            while self.has_work():
                finished = self.step()
                if bar is not None:
                    bar.update(len(finished))
                    bar.set_postfix(tok_s=f"{self.metrics().tokens_per_s:.1f}", refresh=False)
                yield from finished
        finally:
            if bar is not None:
                bar.close()

    def metrics(self) -> EngineMetrics:
        wall = (self._end or time.perf_counter()) - self._start if self._start is not None else 0.0
        return EngineMetrics(
            requests=self._requests,
            prompt_tokens=self._prompt_tokens,
            prefix_tokens_reused=self._reused,
            generated_tokens=self._generated,
            steps=self._steps,
            wall_s=wall,
            tokens_per_s=self._generated / wall if wall > 0 else 0.0,
            kv_bytes_peak=self._peak_chunks * self.bytes_per_chunk,
            kv_bytes_peak_unshared=self._peak_unshared_chunks * self.bytes_per_chunk,
            kv_bytes_in_use=int(self.cache.stats()["chunks_in_use"]) * self.bytes_per_chunk,
            preemptions=self._preemptions,
        )

    def reset_metrics(self) -> None:
        """Start a new measurement window (the cache and its cached prefixes are kept)."""
        if self.has_work():
            raise RuntimeError("reset_metrics: requests are still running")
        self._reset_metrics()

    # -- internals ----------------------------------------------------------------------------

    def _reset_metrics(self):
        self._start = None
        self._end = None
        self._requests = self._prompt_tokens = self._reused = self._generated = 0
        self._steps = self._preemptions = 0
        in_use = int(self.cache.stats()["chunks_in_use"])
        self._peak_chunks = in_use
        self._peak_unshared_chunks = 0

    def _validate(self, request: Request) -> _Req:
        """Every check a request can fail before it runs: field types and ranges
        (``requests.check``), the prompt's token ids, and what this engine can hold."""
        if not isinstance(request, Request):
            raise TypeError(f"request: expected chunkvale.engine.Request, got {type(request).__name__}")
        where = f"request {self._submitted}" + (f" (id={request.id!r})" if request.id is not None else "")
        try:
            p = requests.check(request, vocab_size=self.vocab_size, has_tokenizer=self.tokenizer is not None)
            prompt = requests.encode(self.tokenizer, request, self.vocab_size)
            if p.n > self.max_batch_size:
                raise ValueError(f"request.n: {p.n} samples exceed max_batch_size={self.max_batch_size}")
            field = "request." + next(f for f in ("prompt", "messages", "token_ids") if getattr(request, f) is not None)
            if self.max_context and len(prompt) >= self.max_context:
                raise ValueError(f"{field}: {len(prompt)} tokens, the model's usable context is {self.max_context}")
            self._check_capacity(field, len(prompt), p.n)
            self._check_device_tier(field, len(prompt), p.max_new_tokens, p.n)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        stop_ids = p.stop_ids if p.ignore_eos else p.stop_ids | self.eos_ids
        req = _Req(request=request, index=self._submitted, prompt=prompt, submitted=time.perf_counter(), p=p,
                   stop_ids=frozenset(stop_ids))
        self._submitted += 1
        return req

    def _queue(self, req: _Req) -> int:
        self._waiting.append(req)
        self._requests += 1
        self._prompt_tokens += len(req.prompt)
        return req.index

    def _drop_step(self, step) -> None:
        with contextlib.suppress(ValueError):  # a step appended in every layer is already committed
            self.cache.cancel(step)

    def _requeue_running(self) -> None:
        for req in reversed(self._running):
            self._requeue(req)
        self._running = []

    def _release(self, req: _Req, reason: str) -> None:
        """Give back ``req``'s sequences; samples that had not finished end with ``reason``."""
        for s in req.seqs:
            if s.seq is not None:
                self.cache.remove(s.seq)
                s.seq = None
            if s.finish_reason is None:
                s.finish_reason = reason
        self._isolate.discard(req.index)

    def _fail(self, req: _Req, error: BaseException) -> None:
        """``req`` cannot go on: release its sequences and report it with the error and what it
        generated so far; every other request carries on."""
        if req in self._running:
            self._running.remove(req)
        self._release(req, "error")
        self._failed.append(self._result(req, error=f"{type(error).__name__}: {error}"))

    def _take_failed(self) -> list[Result]:
        failed, self._failed = self._failed, []
        if not self.has_work():
            self._end = time.perf_counter()
        return failed

    def _check_capacity(self, field: str, prompt_tokens: int, n: int) -> None:
        """Refuse a prompt the pool could not hold even alone: its full chunks, plus one chunk per
        sample for the first decode step (each sample's own partial or new chunk)."""
        capacity = int(self.cache.stats()["capacity_chunks"])
        need = prompt_tokens // self.chunk_size + n
        if need > capacity:
            raise ValueError(
                f"{field}: {prompt_tokens} tokens{f' with n={n} samples' if n > 1 else ''} need {need} chunks "
                f"of {self.chunk_size} tokens to start decoding, but the KV cache holds {capacity} "
                f"({capacity * self.chunk_size} tokens); raise capacity_tokens (--kv-tokens) or shorten the prompt")

    def _live_seqs(self) -> int:
        return sum(len(r.seqs) if r.seqs else r.p.n for r in self._running)

    def _shares_inflight_prefill(self, req: _Req) -> bool:
        """True if a request still prefilling will soon cache at least one chunk of ``req``'s
        prompt: admitting ``req`` now would compute that prefix twice instead of reusing it."""
        for other in self._running:
            if other.prefilled >= len(other.prompt) or other.p.namespace != req.p.namespace:
                continue
            m = min(len(other.prompt), len(req.prompt))
            a = np.asarray(other.prompt[:m])
            b = np.asarray(req.prompt[:m])
            diff = np.flatnonzero(a != b)
            common = int(diff[0]) if diff.size else m
            if common >= self.chunk_size and common > other.prefilled:
                return True
        return False

    def _admit(self):
        import chunkvale

        still_waiting = []
        full_up = False
        for req in self._waiting:
            if (full_up or self._live_seqs() + req.p.n > self.max_batch_size
                    or (self._isolate and self._running) or self._shares_inflight_prefill(req)):
                still_waiting.append(req)
                continue
            # max_reuse: the last prompt token is always computed, its logits give the first token.
            try:
                seq, n_cached = self.cache.add_sequence(req.prompt, namespace=req.p.namespace,
                                                        max_reuse=len(req.prompt) - 1)
            except (ValueError, TypeError, KeyError) as e:
                self._fail(req, e)
                continue
            except chunkvale.CapacityError:
                # Reusing a partial chunk needs a copy in a free slot (and, with a host tier, a
                # device slot next to every live sequence's partial chunk). While others run, the
                # cache is full: wait (in order) rather than be preempted at once. Alone, reuse whole
                # chunks only and compute the rest: that needs no copy.
                if self._running:
                    full_up = True
                    still_waiting.append(req)
                    continue
                full = (len(req.prompt) - 1) // self.chunk_size * self.chunk_size
                try:
                    seq, n_cached = self.cache.add_sequence(req.prompt, namespace=req.p.namespace,
                                                            max_reuse=full)
                except (chunkvale.CapacityError, ValueError, TypeError, KeyError) as e:
                    self._fail(req, e)
                    continue
            req.admitted = time.perf_counter()
            req.n_cached = req.prefilled = int(n_cached)
            self._reused += req.n_cached
            req.seqs = [_Seq(req=req, sample_index=0, seq=seq, length=req.n_cached,
                             generator=sampling.make_generator(req.p.seed, 0))]
            self._running.append(req)
        self._waiting = still_waiting

    def _build_batch(self, prefill_limit: int | None = None, decode_limit: int | None = None):
        """The step's entries: every decoding sequence, then prompt slices up to the step's token
        budget. A smaller step, when the full one does not fit: at most ``decode_limit`` decoding
        sequences (the oldest) and ``prefill_limit`` prompt tokens."""
        batch, entries, ids, rows = [], [], [], []
        budget = self.max_step_tokens
        decoding = 0
        # Decoding sequences first: one token each, so prefill never starves generation.
        for req in self._running:
            if req.prefilled < len(req.prompt):
                continue
            for s in req.seqs:
                if s.finish_reason is None and budget > 0 and (decode_limit is None or decoding < decode_limit):
                    decoding += 1
                    batch.append(s)
                    entries.append((s.seq, [s.tokens[-1]]))
                    rows.append(len(ids))
                    ids.append(s.tokens[-1])
                    budget -= 1
        if prefill_limit is not None:
            budget = min(budget, prefill_limit)
        for req in self._running:
            pending = len(req.prompt) - req.prefilled
            if pending <= 0 or budget <= 0:
                continue
            take = min(pending, budget)
            s = req.seqs[0]
            batch.append(s)
            entries.append((s.seq, take))
            ids.extend(req.prompt[req.prefilled:req.prefilled + take])
            rows.append(len(ids) - 1 if take == pending else None)  # logits only once the prompt is done
            budget -= take
        self._current = (batch, entries, ids, rows)
        return batch, entries, ids, rows

    def _plan(self):
        import chunkvale

        prefill_limit = decode_limit = None
        _, entries, _, _ = self._build_batch()
        error = None
        while True:
            if entries:
                try:
                    return self.cache.plan(entries)
                except chunkvale.CapacityError as e:
                    error = e
                # The step does not fit (the pool, or with a host tier the device slots of an
                # evicting layer). Cheapest first: (1) prefill fewer prompt tokens (halving, down
                # to none), (2) decode fewer sequences (halving, down to one), (3) preempt.
                prefill = sum(what for _, what in entries if isinstance(what, int))
                decoding = sum(1 for _, what in entries if not isinstance(what, int))
                if prefill:
                    prefill_limit = prefill // 2
                    _, entries, _, _ = self._build_batch(prefill_limit, decode_limit)
                    continue
                if decoding > 1:
                    decode_limit = decoding // 2
                    _, entries, _, _ = self._build_batch(prefill_limit, decode_limit)
                    continue
            elif error is None:
                return None
            if len(self._running) <= 1:
                what = ("raise eviction.device_chunks" if "eviction." in str(error)
                        else "raise capacity_tokens (now {} chunks of {} tokens)".format(
                            self.cache.stats()["capacity_chunks"], self.chunk_size))
                self._fail(self._running[0], chunkvale.CapacityError(
                    f"KV cache too small for this request, even one prefill/decode step of it alone; "
                    f"{what}. The cache said: {error}"))
                return None
            # Recompute-preemption: send the newest request back to the queue (its cache
            # sequences are released; its prefix stays cached, so re-admission is cheap).
            self._requeue(self._running.pop())
            self._preemptions += 1
            prefill_limit = decode_limit = None
            _, entries, _, _ = self._build_batch()
            if not entries:
                return None

    def _check_device_tier(self, field: str, prompt_tokens: int, max_new_tokens: int, n: int) -> None:
        """With a host tier, refuse a request that could not take a step even alone: every chunk
        of a prefill step, and of a decode step of a sequence within ``budget_tokens``, must be
        on the device at once (in each evicting layer), next to the partial chunk of every other
        live sequence (the request's other samples)."""
        ev = self.eviction
        if ev is None or not ev.device_chunks or ev.dense_layers >= self.cache.config.layers:
            return
        # The longest sequence a step of this request attends in full: the prompt (prefill),
        # or a decode step's context (prompt + generated tokens but the last) while within budget.
        longest = max(prompt_tokens, min(prompt_tokens + max_new_tokens - 1, ev.budget_tokens))
        need = -(-longest // self.chunk_size) + n - 1
        if n > 1:  # fork: the parent's partial chunk, one copy per other sample, and the copy source
            need = max(need, n + 1)
        if need > ev.device_chunks:
            raise ValueError(
                f"{field}: {prompt_tokens} tokens (+ up to {max_new_tokens} new"
                f"{f', n={n} samples' if n > 1 else ''}) need up to {need} chunks of {self.chunk_size} tokens "
                f"on the device at once (prefill, and decode within budget_tokens={ev.budget_tokens}, "
                f"attend to every chunk{'; each other sample keeps its partial chunk there' if n > 1 else ''}), but "
                f"eviction.device_chunks={ev.device_chunks}; raise device_chunks, lower budget_tokens, "
                f"or shorten the request")

    def _requeue(self, req: _Req) -> None:
        """Release a running request's sequences and queue it again from scratch (front of the
        queue). Its RNGs restart from the seed, so a seeded request gives the same samples."""
        for s in req.seqs:
            if s.seq is not None:
                self.cache.remove(s.seq)
        self._reused -= req.n_cached
        self._generated -= sum(len(s.tokens) for s in req.seqs)
        self._waiting.insert(0, _Req(request=req.request, index=req.index, prompt=req.prompt,
                                     submitted=req.submitted, p=req.p, stop_ids=req.stop_ids))

    def _consume(self, batch, entries, rows, logits) -> None:
        import chunkvale

        now = time.perf_counter()
        forks = []
        li = 0
        for s, (_, what), row in zip(batch, entries, rows):
            req = s.req
            if isinstance(what, int):
                req.prefilled += what
                s.length += what
            else:
                s.length += 1
            if row is None:
                continue
            row_logits = logits[li]
            li += 1
            if req.first_token is None:
                req.first_token = now
                if req.p.n > 1:
                    forks.append((req, row_logits))
            self._emit(s, sampling.next_token(row_logits, req.p.temperature, req.p.top_p, s.generator))
        for req, row_logits in forks:
            if req not in self._running:  # preempted to make room for an earlier fork
                continue
            # The prompt is in the cache now: the other samples share all its full chunks.
            parent = req.seqs[0]
            try:
                children = self._fork(req)
            except chunkvale.CapacityError as e:
                self._fail(req, e)
                continue
            for i, child in enumerate(children, start=1):
                s = _Seq(req=req, sample_index=i, seq=child, length=parent.length,
                         generator=sampling.make_generator(req.p.seed, i))
                req.seqs.append(s)
                self._emit(s, sampling.next_token(row_logits, req.p.temperature, req.p.top_p,
                                                  s.generator))

    def _fork(self, req: _Req) -> list[int]:
        """Fork ``req``'s prompt for its other samples; preempts newer requests while the copies of
        its partial chunk do not fit (pool or device slots)."""
        import chunkvale

        while True:
            try:
                return self.cache.fork(req.seqs[0].seq, req.p.n - 1)
            except chunkvale.CapacityError as e:
                # Samples that finished in this very step give their chunks back first (_retire
                # would release them right after): that preempts nothing complete.
                # Not a parent still to be forked (this one or a later one of this step: its
                # first token may have finished it), which the fork copies.
                finished = [s for r in self._running for s in r.seqs
                            if s.finish_reason is not None and s.seq is not None and len(r.seqs) == r.p.n]
                for s in finished:
                    self.cache.remove(s.seq)
                    s.seq = None
                if finished:
                    continue
                others = [r for r in self._running
                          if r is not req and any(s.seq is not None for s in r.seqs)]
                if not others:
                    raise chunkvale.CapacityError(
                        f"request {req.index}: its n={req.p.n} samples do not fit the KV cache even alone; "
                        f"lower n or raise the cache's capacity. The cache said: {e}") from None
                victim = others[-1]
                self._running.remove(victim)
                self._requeue(victim)
                self._preemptions += 1

    def _emit(self, s: _Seq, token: int):
        req = s.req
        s.tokens.append(token)
        self._generated += 1
        if token in req.stop_ids:
            s.finish_reason = "stop"
        elif req.p.stop_strings:
            text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
            cut = min((text.find(x) for x in req.p.stop_strings if x in text), default=-1)
            if cut >= 0:
                s.finish_reason, s.text = "stop", text[:cut]
        if s.finish_reason is None:
            if len(s.tokens) >= req.p.max_new_tokens:
                s.finish_reason = "length"
            elif self.max_context and s.length >= self.max_context:
                # The next step would feed this token at position s.length, past what the model
                # (or its sliding window, which chunkvale does not apply) supports.
                s.finish_reason = "length"

    def _retire(self) -> list[Result]:
        finished, keep = [], []
        for req in self._running:
            for s in req.seqs:
                if s.finish_reason is not None and s.seq is not None:
                    self.cache.remove(s.seq)
                    s.seq = None
            if len(req.seqs) == req.p.n and all(s.finish_reason for s in req.seqs):
                self._isolate.discard(req.index)
                finished.append(self._result(req))
            else:
                keep.append(req)
        self._running = keep
        if not self.has_work():
            self._end = time.perf_counter()
        return finished

    def _result(self, req: _Req, error: str | None = None) -> Result:
        now = time.perf_counter()
        samples = []
        for s in req.seqs:
            text = s.text
            if text is None:
                text = self.tokenizer.decode(s.tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
            samples.append(Sample(token_ids=list(s.tokens), text=text, finish_reason=s.finish_reason))
        generated = sum(len(s.tokens) for s in req.seqs)
        first, admitted = req.first_token, req.admitted
        decode_s = now - first if first is not None else 0.0
        metrics = RequestMetrics(
            prompt_tokens=len(req.prompt),
            prefix_tokens_reused=req.n_cached,
            queue_s=admitted - req.submitted if admitted is not None else None,
            ttft_s=first - req.submitted if first is not None else None,
            prefill_s=first - admitted if first is not None and admitted is not None else None,
            generated_tokens=generated,
            total_s=now - req.submitted,
            decode_tokens_per_s=(generated - len(req.seqs)) / decode_s if decode_s > 0 else 0.0,
        )
        return Result(request=req.request, index=req.index, samples=samples, metrics=metrics, error=error)

    def _account_memory(self):
        # Sampled after the forward pass and before finished sequences are removed: the step's
        # room is reserved and every sequence that took part is still live.
        in_use = int(self.cache.stats()["chunks_in_use"])
        self._peak_chunks = max(self._peak_chunks, in_use)
        # Without sharing every live sequence would hold ceil(length / C) chunks of its own.
        unshared = sum(math.ceil(s.length / self.chunk_size)
                       for req in self._running for s in req.seqs if s.seq is not None)
        self._peak_unshared_chunks = max(self._peak_unshared_chunks, unshared)
