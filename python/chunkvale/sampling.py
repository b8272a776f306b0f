"""Choosing the next token from logits: greedy, or temperature + top-p with a per-sample RNG."""

from __future__ import annotations

import torch


def make_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """One RNG per sample so a request's samples do not depend on what else shares the batch."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        # Distinct, reproducible streams for the n samples of one seeded request.
        gen.manual_seed((int(seed) * 1_000_003 + sample_index) % (2**63))
    return gen


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """``logits``: float32 [vocab] on any device. Greedy when ``temperature == 0``."""
    if temperature == 0.0:
        # argmax takes the first maximum, as transformers' greedy search does.
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (cumulative - sorted_probs) < top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
