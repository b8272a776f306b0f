"""What the engine measures: per-request timings (RequestMetrics) and the engine's totals over a
measurement window (EngineMetrics), and the counters the scheduler and the engine loop keep for
them (EngineCounters). Plain Python: no torch, no cache calls (callers pass the cache's numbers)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


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


def request_metrics(req, ended: float) -> RequestMetrics:
    """The metrics of a scheduler ``RequestState`` whose last sample ended at ``ended``."""
    generated = sum(len(s.tokens) for s in req.samples)
    first, admitted = req.first_token, req.admitted
    decode_s = ended - first if first is not None else 0.0
    return RequestMetrics(
        prompt_tokens=len(req.prompt),
        prefix_tokens_reused=req.n_cached,
        queue_s=admitted - req.submitted if admitted is not None else None,
        ttft_s=first - req.submitted if first is not None else None,
        prefill_s=first - admitted if first is not None and admitted is not None else None,
        generated_tokens=generated,
        total_s=ended - req.submitted,
        decode_tokens_per_s=(generated - len(req.samples)) / decode_s if decode_s > 0 else 0.0,
    )


class EngineCounters:
    """The running totals behind :class:`EngineMetrics`, over one measurement window.

    A preempted request starts again from scratch, so what it had counted (reused prefix,
    generated tokens) is taken back when it is requeued and counted again when it reruns."""

    def __init__(self, chunks_in_use: int):
        self.reset(chunks_in_use)

    def reset(self, chunks_in_use: int) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.requests = self.prompt_tokens = self.reused = self.generated = 0
        self.steps = self.preemptions = 0
        self.peak_chunks = chunks_in_use
        self.peak_unshared_chunks = 0

    # -- the measurement window: from the first step to the moment no work is left --

    def stepping(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.end = None  # more work after an idle spell extends the window

    def idle(self) -> None:
        self.end = time.perf_counter()

    # -- events --

    def queued(self, req) -> None:
        self.requests += 1
        self.prompt_tokens += len(req.prompt)

    def admitted(self, req) -> None:
        self.reused += req.n_cached

    def requeued(self, req) -> None:
        self.reused -= req.n_cached
        self.generated -= sum(len(s.tokens) for s in req.samples)

    def preempted(self) -> None:
        self.preemptions += 1

    def token(self) -> None:
        self.generated += 1

    def stepped(self) -> None:
        self.steps += 1

    def memory(self, chunks_in_use: int, live_lengths, chunk_size: int) -> None:
        """Called after a step's tokens are sampled and before finished sequences are removed: the
        step's room is reserved and every sequence that took part is still live. ``live_lengths``:
        the tokens of each live sequence (without sharing each would hold ceil(length / chunk_size)
        chunks of its own)."""
        self.peak_chunks = max(self.peak_chunks, chunks_in_use)
        unshared = sum(math.ceil(n / chunk_size) for n in live_lengths)
        self.peak_unshared_chunks = max(self.peak_unshared_chunks, unshared)

    def snapshot(self, chunks_in_use: int, bytes_per_chunk: int) -> EngineMetrics:
        wall = (self.end or time.perf_counter()) - self.start if self.start is not None else 0.0
        return EngineMetrics(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            prefix_tokens_reused=self.reused,
            generated_tokens=self.generated,
            steps=self.steps,
            wall_s=wall,
            tokens_per_s=self.generated / wall if wall > 0 else 0.0,
            kv_bytes_peak=self.peak_chunks * bytes_per_chunk,
            kv_bytes_peak_unshared=self.peak_unshared_chunks * bytes_per_chunk,
            kv_bytes_in_use=chunks_in_use * bytes_per_chunk,
            preemptions=self.preemptions,
        )
