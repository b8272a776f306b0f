"""What chunkvale's vLLM backend did in one process: how its plans shared block reads, and how its
attention runs there (threads, CPUs, heads), for benchmarks and tests.

Every vLLM rank (tensor, pipeline or data parallel) is its own process with its own counts. Read
them through vLLM's worker extension hook:

    llm = LLM(..., worker_extension_cls="chunkvale.vllm_stats.WorkerStats")
    per_rank = llm.collective_rpc("chunkvale_stats")   # one dict per worker, in rank order

Block reads are counted per layer and KV head, once per planned step (a step plans once for
all its layers): a sequence-by-sequence walk, as vLLM's own kernel makes, reads every block of
every sequence (``seq_blocks``); chunkvale reads a shared block once for all its sequences
(``chunk_first_blocks`` reads serving ``chunk_first_seq_blocks`` of them), so
``saved_block_reads = chunk_first_seq_blocks - chunk_first_blocks``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass


@dataclass
class PlanCounts:
    """Running totals over the plans this process built (``add``: O(1) per plan)."""

    plans: int = 0
    seq_blocks: int = 0
    chunk_first_units: int = 0
    chunk_first_blocks: int = 0
    chunk_first_seq_blocks: int = 0
    chunk_first_row_blocks: int = 0

    def add(self, plan) -> None:
        self.plans += 1
        self.seq_blocks += plan.seq_blocks
        self.chunk_first_units += plan.chunk_first_units
        self.chunk_first_blocks += plan.chunk_first_blocks
        self.chunk_first_seq_blocks += plan.chunk_first_seq_blocks
        self.chunk_first_row_blocks += plan.chunk_first_row_blocks

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["saved_block_reads"] = self.chunk_first_seq_blocks - self.chunk_first_blocks
        return d


COUNTS = PlanCounts()  # this process's; the backend's metadata builders add every plan


def process_stats() -> dict:
    """This process's view: whether chunkvale's backend ran here, its runners and its counts."""
    backend = sys.modules.get("chunkvale.vllm_backend")  # imported only where vLLM picked it
    out = {"pid": os.getpid(), "affinity": sorted(os.sched_getaffinity(0)), "backend": backend is not None,
           "counts": COUNTS.as_dict()}
    if backend is not None:
        out.update(backend.runner_state())
    return out


class WorkerStats:
    """A vLLM worker extension (``worker_extension_cls``): adds ``chunkvale_stats`` to every
    worker, callable through ``collective_rpc``; ``chunkvale_reset_counts`` zeroes the counts
    (before a timed batch)."""

    def chunkvale_stats(self) -> dict:
        out = process_stats()
        pc = self.parallel_config
        out.update(rank=self.rank, tp=pc.tensor_parallel_size, pp=pc.pipeline_parallel_size,
                   dp_rank=pc.data_parallel_rank, dp=pc.data_parallel_size)
        return out

    def chunkvale_reset_counts(self) -> None:
        COUNTS.reset()
