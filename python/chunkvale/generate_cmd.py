"""``chunkvale generate``: JSONL requests in, JSONL completions out (same order)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from .engine import Engine, Request

_FIELDS = {"prompt", "messages", "token_ids", "max_new_tokens", "temperature", "top_p", "seed", "n", "stop",
           "namespace", "ignore_eos", "id"}


def read_requests(path: str, *, max_new_tokens: int, temperature: float) -> list[Request]:
    """Parse a JSONL file; errors name the file, the line and the field."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: no such file: {path}")
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"--prompts {path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            unknown = sorted(set(obj) - _FIELDS)
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
            obj.setdefault("max_new_tokens", max_new_tokens)
            obj.setdefault("temperature", temperature)
            obj.setdefault("id", lineno)
            requests.append(Request(**obj))
    if not requests:
        raise ValueError(f"--prompts {path}: no requests in the file")
    return requests


def run(args) -> int:
    from .models import load_model

    requests = read_requests(args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(lm.model, lm.tokenizer, chunk_size=args.chunk_size, capacity_tokens=args.kv_tokens,
                    max_batch_size=args.max_batch, threads=args.threads, eviction=getattr(args, "eviction", None))
    # Validate every request before generating anything, so a bad line fails fast.
    for r in requests:
        engine.submit(r)
    results = engine.run(progress=False if args.no_progress else None)  # None: a bar only past 2 s
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    try:
        for res in results:
            record = {
                "id": res.request.id,
                "text": res.samples[0].text,
                "finish_reason": res.samples[0].finish_reason,
                "samples": [asdict(s) for s in res.samples],
                "metrics": asdict(res.metrics),
            }
            out.write(json.dumps(record) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    m = engine.metrics()
    print(f"chunkvale generate: {m.requests} requests, {m.generated_tokens} tokens in {m.wall_s:.1f} s "
          f"({m.tokens_per_s:.1f} tok/s), {m.prefix_tokens_reused} prompt tokens reused from the cache"
          f"{eviction_summary(engine)}", file=sys.stderr)
    return 0


def eviction_summary(engine) -> str:
    """The eviction part of the summary line ('' when eviction is off)."""
    ev = engine.eviction
    if ev is None:
        return ""
    st = engine.cache.stats()
    text = (f"; eviction (budget {ev.budget_tokens} tokens): {st['evict_dropped_chunks']} of "
            f"{st['evict_scored_chunks']} scored chunks left out of attention")
    if ev.device_chunks:
        text += (f"; host tier ({st['evict_device_chunks']} device chunks per evicting layer): "
                 f"{st['evict_recalls']} recalls, {st['evict_evictions']} evictions, "
                 f"{st['evict_bytes_to_host']} B to host, {st['evict_bytes_from_host']} B from host, "
                 f"{engine.metrics().preemptions} preemptions")
    return text
