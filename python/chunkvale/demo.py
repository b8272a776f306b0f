"""``chunkvale demo``: chat requests sharing a long system prompt, served by the engine, measured
against transformers' own generate on the same batch.

Phases: (1) one request on an empty cache: TTFT of a cold prompt; (2) a second request alone:
TTFT of a prefix hit; (3) the cache is cleared and the whole batch is served with continuous
batching (its first request prefills the system prompt, the rest reuse it): throughput and KV
memory with vs without sharing; (4) the same batch through ``model.generate``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from . import baseline, workload
from .engine import Engine, Request, encode_request


@dataclass
class DemoOptions:
    model: str | None = None
    requests: int = 16
    system_tokens: int = 1500
    max_new_tokens: int = 64
    chunk_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    ignore_eos: bool = False
    baseline: bool = True
    samples: int = 3  # answers printed
    progress: bool = True
    threads: int = 0  # chunkvale's attention threads (0 = all cores)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(opts: DemoOptions, console=None) -> dict:
    """Run the demo, print answers and the summary table; returns the numbers."""
    from rich.console import Console
    from rich.table import Table

    from .models import load_model

    # Piped output gets a fixed width rather than 80 columns, so the table never wraps its cells.
    console = console or Console(width=None if sys.stdout.isatty() else 100)
    if opts.requests < 2:
        raise ValueError(f"requests: the demo needs >= 2 (a cold prompt and a prefix hit), got {opts.requests}")
    t0 = time.perf_counter()
    with console.status("loading model (the first run converts the embedded GGUF, ~30 s)"):
        lm = load_model(opts.model, dtype=opts.dtype, device=opts.device)
    console.print(f"model: {lm.name}  [{opts.device}, {opts.dtype}]  loaded in {time.perf_counter() - t0:.1f} s")

    chats = workload.chat_requests(lm.tokenizer, requests=opts.requests, system_tokens=opts.system_tokens)
    reqs = [Request(messages=c, max_new_tokens=opts.max_new_tokens, ignore_eos=opts.ignore_eos, id=i)
            for i, c in enumerate(chats)]
    prompts = [encode_request(lm.tokenizer, r) for r in reqs]
    shared = next((i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b), len(prompts[0]))
    # Room for the shared prefix twice (the batch runs after the single-request phases) plus every
    # request's own tokens and a chunk tail; the engine preempts rather than fails if it is short.
    own = max(map(len, prompts)) - shared + opts.max_new_tokens + 2 * opts.chunk_size
    engine = Engine(lm.model, lm.tokenizer, chunk_size=opts.chunk_size,
                    capacity_tokens=2 * shared + opts.requests * own,
                    max_batch_size=max(opts.requests, 1), threads=opts.threads)
    console.print(f"workload: {opts.requests} chat requests sharing a {shared}-token prefix (system prompt), "
                  f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
                  f"up to {opts.max_new_tokens} new tokens each")

    # A few tokens through the engine first: "cold" means nothing of the prompt is cached, not a
    # cold process (torch's first forward of a model pays one-time set-up either way).
    engine.generate([Request(token_ids=prompts[0][-8:], max_new_tokens=1)], progress=False)
    engine.cache.clear()
    cold = engine.generate(reqs[:1], progress=False)[0].metrics
    hit = engine.generate(reqs[1:2], progress=False)[0].metrics
    console.print(f"TTFT cold prompt {cold.ttft_s:.2f} s ({cold.prompt_tokens} tokens computed), "
                  f"prefix hit {hit.ttft_s:.3f} s ({hit.prefix_tokens_reused} of {hit.prompt_tokens} reused)")

    engine.cache.clear()
    engine.reset_metrics()
    results = engine.generate(reqs, progress=opts.progress)
    m = engine.metrics()
    ttfts = sorted(r.metrics.ttft_s for r in results)

    for r in results[: opts.samples]:
        ids = r.samples[0].token_ids
        # With --ignore-eos the model writes on past its end-of-turn; show the answer only.
        end = next((i for i, t in enumerate(ids) if t in engine.eos_ids), len(ids))
        answer = lm.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
        console.print(f"[bold]Q{r.request.id}:[/bold] {r.request.messages[-1]['content']}")
        console.print(f"[bold]A{r.request.id}:[/bold] {answer}\n")

    base = None
    hf_forward_s = None
    if opts.baseline:
        # transformers' own forward over the cold prompt (no chunkvale): what the cold TTFT
        # costs without us, in this run.
        import torch
        with console.status("transformers forward over the cold prompt"), torch.no_grad():
            ids = torch.tensor([prompts[0]], device=lm.model.device)
            lm.model(input_ids=ids[:, -8:], use_cache=False)  # the same warm-up as the engine's
            t1 = time.perf_counter()
            lm.model(input_ids=ids, use_cache=False)
            hf_forward_s = time.perf_counter() - t1
        with console.status(f"transformers generate on the same {opts.requests} requests (one padded batch)"):
            base = baseline.hf_generate(lm.model, prompts, max_new_tokens=opts.max_new_tokens,
                                        eos_ids=engine.eos_ids, pad_id=_pad_id(lm.tokenizer),
                                        ignore_eos=opts.ignore_eos)

    table = Table(title=f"chunkvale demo: {opts.requests} requests sharing a system prompt")
    table.add_column("metric")
    table.add_column("chunkvale", justify="right")
    table.add_column("transformers" if base else "", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("KV peak, shared", _mib(m.kv_bytes_peak), "",
                  f"{100 * m.kv_sharing_ratio:.1f}% of unshared")
    table.add_row("KV peak, unshared", _mib(m.kv_bytes_peak_unshared), _mib(base.kv_bytes) if base else "", "")
    table.add_row("TTFT cold prompt", f"{cold.ttft_s:.2f} s",
                  f"{hf_forward_s:.2f} s (forward)" if hf_forward_s else "",
                  f"{cold.ttft_s / hf_forward_s:.2f}x its time" if hf_forward_s else "")
    table.add_row("TTFT prefix hit", f"{hit.ttft_s:.3f} s", "",
                  f"{cold.ttft_s / hit.ttft_s:.1f}x faster" if hit.ttft_s > 0 else "")
    table.add_row("TTFT batch median", f"{ttfts[len(ttfts) // 2]:.2f} s", f"{base.ttft_s:.2f} s" if base else "", "")
    table.add_row("prompt tokens reused", f"{m.prefix_tokens_reused:,} / {m.prompt_tokens:,}", "", "")
    table.add_row("generated tokens", f"{m.generated_tokens:,}", f"{base.generated_tokens:,}" if base else "", "")
    table.add_row("wall time", f"{m.wall_s:.1f} s", f"{base.wall_s:.1f} s" if base else "", "")
    table.add_row("throughput", f"{m.tokens_per_s:.1f} tok/s", f"{base.tokens_per_s:.1f} tok/s" if base else "",
                  f"{m.tokens_per_s / base.tokens_per_s:.2f}x" if base and base.tokens_per_s else "")
    if m.preemptions:
        table.add_row("preemptions (cache full)", f"{m.preemptions}", "", "")
    same = None
    if base:
        same = sum(r.samples[0].token_ids == o for r, o in zip(results, base.outputs))
        table.add_row("same answer as HF", f"{same} / {len(results)}", "", "")
    console.print(table)
    return {
        "kv_bytes_peak": m.kv_bytes_peak, "kv_bytes_peak_unshared": m.kv_bytes_peak_unshared,
        "ttft_cold_s": cold.ttft_s, "ttft_hit_s": hit.ttft_s, "tokens_per_s": m.tokens_per_s,
        "wall_s": m.wall_s, "generated_tokens": m.generated_tokens,
        "baseline_tokens_per_s": base.tokens_per_s if base else None,
        "baseline_wall_s": base.wall_s if base else None,
        "baseline_kv_bytes": base.kv_bytes if base else None,
        "baseline_forward_cold_s": hf_forward_s,
        "identical_answers": same,
    }


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0
