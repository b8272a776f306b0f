"""Where a request is while the engine serves it: its samples' cache sequences and tokens, how much
of its prompt is in the cache, its timestamps. The scheduler changes these; the engine loop adds
tokens; metrics and results are read from them. Plain data: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from .requests import Checked, Request


@dataclass
class SampleState:
    """One sample being generated: a cache sequence and its tokens."""

    request: "RequestState"
    sample_index: int
    seq: int | None = None  # its cache sequence; None once released
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache for this sequence (committed or in the current step)
    finish_reason: str | None = None
    text: str | None = None  # the output when a stop string cut it, else None (decode the tokens)
    rng: object = None  # the engine's RNG for this sample, made at its first token


@dataclass
class RequestState:
    """A validated request and where it is: queued, prefilling, decoding, failed or done."""

    request: Request
    index: int  # order of submission
    prompt: list[int]
    submitted: float
    params: Checked
    stop_ids: frozenset  # params.stop_ids plus EOS unless ignored
    admitted: float | None = None
    first_token: float | None = None
    n_cached: int = 0  # prompt tokens the cache had (reused, not computed)
    prefilled: int = 0  # prompt tokens in the cache (cached + computed)
    samples: list[SampleState] = field(default_factory=list)  # [] until admitted; n once forked
    error: str | None = None  # why it failed ("CapacityError: ...")
    ended: float | None = None  # when it failed

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def restarted(self) -> RequestState:
        """The same request from scratch (after preemption): nothing computed, nothing sampled."""
        return RequestState(request=self.request, index=self.index, prompt=self.prompt, submitted=self.submitted,
                            params=self.params, stop_ids=self.stop_ids)
