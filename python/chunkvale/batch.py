"""One step's batch: which samples take part, what each feeds, and where its logits are. The
scheduler builds it and plans it on the cache; the engine loop feeds it through the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .request_state import RequestState, SampleState


@dataclass(frozen=True)
class BatchEntry:
    """One sample's part of a step: ``new`` is what ``plan`` takes for it (a count of pending
    prompt tokens, or [the sample's last token] for a decode), ``input_ids`` the tokens fed."""

    sample: SampleState
    new: int | list[int]
    input_ids: list[int]
    wants_logits: bool  # a decode, or the last slice of a prompt (its logits give the first token)

    @property
    def prefill(self) -> bool:
        return isinstance(self.new, int)


@dataclass
class Batch:
    """The entries of one step, in row order, and the cache's plan for them."""

    entries: list[BatchEntry]
    step: object = None  # the cache's Step, once planned

    @property
    def plan_entries(self) -> list:
        return [(e.sample.seq, e.new) for e in self.entries]

    @property
    def input_ids(self) -> list[int]:
        return [t for e in self.entries for t in e.input_ids]

    @property
    def logit_rows(self) -> list[int]:
        """The packed row of each entry that wants logits: its last token."""
        rows, end = [], 0
        for e in self.entries:
            end += len(e.input_ids)
            if e.wants_logits:
                rows.append(end - 1)
        return rows

    @property
    def sampled(self) -> list[SampleState]:
        """The samples that get a token from this step: ``logits[i]`` is ``sampled[i]``'s."""
        return [e.sample for e in self.entries if e.wants_logits]

    @property
    def prefill_tokens(self) -> int:
        return sum(e.new for e in self.entries if e.prefill)

    @property
    def decoding(self) -> int:
        return sum(1 for e in self.entries if not e.prefill)


class Fork(NamedTuple):
    """A request whose prompt completed in a step, and the row of the logits its other samples
    draw their first token from."""

    request: RequestState
    row: int
