"""The same batch through transformers' own ``generate`` (dense per-request KV, left padding):
the comparison point for the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class BaselineResult:
    outputs: list[list[int]]  # generated ids per prompt, up to and including a stop token
    wall_s: float
    ttft_s: float  # until the first token of the batch (prefill of every prompt)
    generated_tokens: int
    kv_bytes: int  # the dense cache at the end: batch x (padded prompt + generated) tokens

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0


class _FirstCall:
    """A logits processor that only records when generate produced its first logits."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


def hf_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids=(), pad_id: int = 0,
                ignore_eos: bool = False) -> BaselineResult:
    """Greedy ``model.generate`` over all ``prompts`` as one left-padded batch."""
    from transformers import LogitsProcessorList

    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    eos = None if ignore_eos or not eos_ids else sorted(eos_ids)
    first = _FirstCall()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
            eos_token_id=eos, pad_token_id=pad_id, logits_processor=LogitsProcessorList([first]),
            # The defaults of a model's generation_config (e.g. temperature) must not turn this
            # into sampling.
            temperature=None, top_p=None, top_k=None,
        )
    wall = time.perf_counter() - start
    new = out[:, width:].tolist()
    outputs = []
    for row in new:
        cut = next((j + 1 for j, t in enumerate(row) if eos and t in eos), len(row))
        outputs.append(row[:cut])
    generated = sum(len(o) for o in outputs)
    kv = len(prompts) * (width + out.shape[1] - width - 1) * kv_bytes_per_token(model)
    return BaselineResult(outputs=outputs, wall_s=wall, ttft_s=(first.at or time.perf_counter()) - start,
                          generated_tokens=generated, kv_bytes=kv)
