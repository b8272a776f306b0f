"""The generation engine: continuous batching through a transformers model on a chunkvale KVCache.

The engine loop, one ``step()``: the scheduler (scheduler.py) admits waiting requests and plans
the step's batch on the cache; the model runs it once (each layer: ``cache.append`` +
``cache.attention``, hf.py); each sample that got logits draws its next token (sampling.py) and
the stop rules (requests.py) say whether it ended; requests whose prompt just completed fork
their other samples; finished requests are retired into Results. Requests join and leave at
every step. Metrics are counted in metrics.py.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from . import cache_users, hf, model_identity, requests, sampling
from .metrics import EngineCounters, EngineMetrics, RequestMetrics, request_metrics  # noqa: F401  (this module's API)
from .requests import Request, Result, Sample  # noqa: F401  (part of this module's API)
from .request_state import RequestState, SampleState
from .scheduler import Scheduler


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
        self._submitted = 0
        self._counters = EngineCounters(int(stats["chunks_in_use"]))
        # Requests' namespaces are scoped by the model's fingerprint: another model on the same
        # cache never reuses this one's K/V (model_identity.py).
        self.scheduler = Scheduler(cache, chunk_size=self.chunk_size, max_batch_size=max_batch_size,
                                   max_step_tokens=max_step_tokens, counters=self._counters,
                                   namespace_prefix=model_identity.namespace(model, ""))

    # -- public API -------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Validate a request completely and queue it; it joins the batch at the next step.
        Returns its index. Bad fields raise TypeError/ValueError naming ``request.<field>``."""
        req = self._validate(request)
        self.scheduler.queue(req)
        return req.index

    def cancel(self, index: int) -> Result | None:
        """Stop request ``index`` (waiting or running; between steps): its sequences are released
        and its Result returned at once, with the tokens generated so far and finish_reason
        "cancelled" on unfinished samples. None if it is not queued or running (e.g. finished)."""
        cache_users.claim(sys._getframe(), "Engine.cancel()", cache_users.of_kv(self.cache))
        req = self.scheduler.cancel(index)
        if req is None:
            return None
        self._note_idle()
        return self._result(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Result]:
        """Run one batched forward pass; returns the requests that finished in it, failed ones
        included (``Result.error``). A request that cannot run fails alone: the others go on.
        One thread at a time on the engine's cache (cache_users.py): another's step is refused."""
        cache_users.claim(sys._getframe(), "Engine.step()", cache_users.of_kv(self.cache))
        self._counters.stepping()
        batch = self.scheduler.schedule()
        if batch is None:  # nothing to run, everything preempted back to the queue, or failed
            return self._take_failed()
        try:
            logits = self.runner.forward(batch.step, batch.input_ids, batch.logit_rows)
        except Exception as e:
            self.scheduler.forward_failed(batch, e)
            return self._take_failed()
        except BaseException:
            self.scheduler.abandon(batch)
            raise
        self._counters.stepped()
        self.scheduler.advance(batch, logits, self._emit)
        self._counters.memory(int(self.cache.stats()["chunks_in_use"]), self.scheduler.live_lengths(),
                              self.chunk_size)
        failed = self._take_failed()
        finished = [self._result(req) for req in self.scheduler.retire()]
        self._note_idle()
        return failed + finished

    def generate(self, requests: Iterable[Request], progress: bool | None = None) -> list[Result]:
        """Serve ``requests`` to completion; results in submission order. Every request is
        validated before any is queued, so a bad one leaves the engine as it was."""
        first = self._submitted
        try:
            checked = [self._validate(r) for r in requests]
        except BaseException:
            self._submitted = first
            raise
        for req in checked:
            self.scheduler.queue(req)
        done = {r.index: r for r in self.run(progress)}
        return [done[req.index] for req in checked]

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

            bar = tqdm(total=len(self.scheduler.waiting) + len(self.scheduler.running), unit="req",
                       desc="generating", delay=0 if progress else 2.0, dynamic_ncols=True)
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
        return self._counters.snapshot(int(self.cache.stats()["chunks_in_use"]), self.bytes_per_chunk)

    def reset_metrics(self) -> None:
        """Start a new measurement window (the cache and its cached prefixes are kept)."""
        if self.has_work():
            raise RuntimeError("reset_metrics: requests are still running")
        self._counters.reset(int(self.cache.stats()["chunks_in_use"]))

    # -- internals ----------------------------------------------------------------------------

    def _validate(self, request: Request) -> RequestState:
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
            # What the cache could never hold, even alone: the cache states its own rules.
            needs = self.cache.request_needs(len(prompt), p.max_new_tokens, p.n)
            requests.refuse_unfittable(field, len(prompt), p.max_new_tokens, p.n, needs, chunk_size=self.chunk_size,
                                       budget_tokens=getattr(self.eviction, "budget_tokens", None))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        stop_ids = p.stop_ids if p.ignore_eos else p.stop_ids | self.eos_ids
        req = RequestState(request=request, index=self._submitted, prompt=prompt, submitted=time.perf_counter(),
                           params=p, stop_ids=frozenset(stop_ids))
        self._submitted += 1
        return req

    def _emit(self, s: SampleState, row_logits) -> None:
        """Sample ``s``'s next token from its logits and apply the stop rules."""
        p = s.request.params
        if s.rng is None:
            s.rng = sampling.make_generator(p.seed, s.sample_index)
        s.tokens.append(sampling.next_token(row_logits, p.temperature, p.top_p, s.rng))
        self._counters.token()
        s.finish_reason, s.text = requests.finish_reason(s.tokens, s.length, p, s.request.stop_ids,
                                                         self.max_context, self._decode)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _take_failed(self) -> list[Result]:
        failed = [self._result(req, req.ended) for req in self.scheduler.take_failed()]
        self._note_idle()
        return failed

    def _note_idle(self) -> None:
        if not self.has_work():
            self._counters.idle()

    def _result(self, req: RequestState, ended: float | None = None) -> Result:
        ended = time.perf_counter() if ended is None else ended
        samples = [Sample(token_ids=list(s.tokens), text=s.text if s.text is not None else
                          self._decode(s.tokens) if self.tokenizer is not None else "",
                          finish_reason=s.finish_reason) for s in req.samples]
        return Result(request=req.request, index=req.index, samples=samples, metrics=request_metrics(req, ended),
                      error=req.error)
