"""The prompts of bench/vllm_e2e.py's workloads, as token ids of the embedded model's tokenizer.

  shared       64 requests sharing a 2048-token system prompt, a distinct question each, 128 new
               tokens each (ignore_eos); the prefix cache starts empty
  shared_warm  the same, with the system prompt already in the prefix cache (a server whose
               system prompt was served before): decode-dominated
  demo         the `chunkvale demo` workload: 16 chats sharing a ~1.5K-token system prompt, 64 new
               tokens, stopping at EOS
  noshare      64 requests of 384 distinct tokens, 128 new tokens each: nothing to share
  multi_system 4 system prompts of 1-2K tokens (sharing nothing with each other), 16 requests
               under each, interleaved, 128 new tokens each: four trees side by side
  fewshot      one 1K-token system prompt, 4 few-shot blocks of 1K tokens under it, 16 questions
               under each block, interleaved, 128 new tokens each: a tree of depth 2
  rollouts     16 prompts of 512-1024 tokens sharing nothing, n=8 samples each, 256 new tokens,
               temperature 1: the RL-rollout / best-of-n pattern (each group shares its own
               prompt). Seeded by the engine's seed (vLLM: LLM(seed=0)), not per request: vLLM
               0.32's CPU build fails with per-request seeds whenever chunked prefill splits a
               prompt ("RuntimeError: CPU Generator does not use offset", whatever the attention)

``scale`` (for smoke runs) multiplies every token count and group size (at least 2 per group,
16 tokens per prompt part, 4 new tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("shared", "shared_warm", "demo", "noshare", "multi_system", "fewshot", "rollouts")


@dataclass
class Workload:
    prompts: list[list[int]]
    sampling: list[dict]  # vLLM SamplingParams fields, one dict per prompt
    warm_prefix: int = 0  # prefix tokens of the first prompt served (untimed) before the batch
    sampled: bool = False  # temperature > 0: outputs differ across backends wherever rounding flips a draw

    @property
    def samples(self) -> int:
        return sum(s.get("n", 1) for s in self.sampling)


def text_tokens(tok, n: int, seed: int | None = None) -> list[int]:
    """Exactly n token ids of the demo's catalogue text; with a seed, its lines shuffled under a
    header of their own, so that no two seeds share a block of tokens."""
    from chunkvale import workload

    text, _ = workload.system_prompt(tok, n + 64)
    if seed is not None:
        lines = text.splitlines()
        random.Random(seed).shuffle(lines)
        text = f"Ticket {seed}: check every line below.\n" + "\n".join(lines)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise RuntimeError(f"prompt text gave {len(ids)} tokens, wanted {n}")
    return ids[:n]


def _question(tok, i: int) -> list[int]:
    return tok(f"Question {i}: which product on the list is number {i}, and what does it cost?",
               add_special_tokens=False)["input_ids"]


def _greedy(n_prompts: int, max_tokens: int, **kw) -> list[dict]:
    return [{"temperature": 0.0, "max_tokens": max_tokens, **kw} for _ in range(n_prompts)]


def build(name: str, tok, scale: float = 1.0) -> Workload:
    def toks(n: int) -> int:
        return max(16, round(n * scale))

    def group(n: int) -> int:
        return max(2, round(n * scale))

    new = max(4, round(128 * scale))
    if name in ("shared", "shared_warm"):
        system = text_tokens(tok, toks(2048))
        ps = [system + _question(tok, i) for i in range(group(64))]
        return Workload(ps, _greedy(len(ps), new, ignore_eos=True), len(system) if name == "shared_warm" else 0)
    if name == "demo":
        from chunkvale import workload
        from chunkvale.engine import Request, encode_request

        chats = workload.chat_requests(tok, requests=group(16), system_tokens=max(64, toks(1500)))
        ps = [encode_request(tok, Request(messages=c)) for c in chats]
        return Workload(ps, _greedy(len(ps), max(4, round(64 * scale))))
    if name == "noshare":
        ps = [text_tokens(tok, toks(384), i + 1) for i in range(group(64))]
        return Workload(ps, _greedy(len(ps), new, ignore_eos=True))
    if name == "multi_system":
        systems = [text_tokens(tok, toks(1024 + 1024 * k // 3), 1000 + k) for k in range(4)]
        per = group(16)
        # Interleaved: request i under system i % 4.
        ps = [systems[i % len(systems)] + _question(tok, i) for i in range(per * len(systems))]
        return Workload(ps, _greedy(len(ps), new, ignore_eos=True))
    if name == "fewshot":
        system = text_tokens(tok, toks(1024))
        shots = [text_tokens(tok, toks(1024), 2000 + k) for k in range(4)]
        per = group(16)
        # Interleaved: question i under few-shot block i % 4.
        ps = [system + shots[i % len(shots)] + _question(tok, i) for i in range(per * len(shots))]
        return Workload(ps, _greedy(len(ps), new, ignore_eos=True))
    if name == "rollouts":
        count, n = group(16), group(8)
        lens = [toks(512 + 512 * i // max(count - 1, 1)) for i in range(count)]
        ps = [text_tokens(tok, m, 3000 + i) for i, m in enumerate(lens)]
        sampling = [{"temperature": 1.0, "n": n, "max_tokens": max(4, round(256 * scale)), "ignore_eos": True}
                    for _ in range(count)]
        return Workload(ps, sampling, sampled=True)
    raise ValueError(f"workload: expected one of {', '.join(WORKLOADS)}, got {name!r}")
