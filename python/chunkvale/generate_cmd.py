"""``chunkvale generate``: JSONL requests in, JSONL completions out, each written (and flushed)
as soon as its request finishes, so nothing finished is lost if another request or the run fails."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from .engine import Engine, Request

_FIELDS = {"prompt", "messages", "token_ids", "max_new_tokens", "temperature", "top_p", "seed", "n", "stop",
           "namespace", "ignore_eos", "id"}


def read_requests(path: str, *, max_new_tokens: int, temperature: float) -> list[tuple[int, Request]]:
    """Parse a JSONL file into (line number, request) pairs; errors name the file, the line
    and the field (or the byte that is not UTF-8)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: no such file: {path}")
    requests = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"--prompts {path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            unknown = sorted(set(obj) - _FIELDS)
            if unknown:
                raise ValueError(f"{where}{_id_of(obj)}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
            obj.setdefault("max_new_tokens", max_new_tokens)
            obj.setdefault("temperature", temperature)
            obj.setdefault("id", lineno)
            requests.append((lineno, Request(**obj)))
    if not requests:
        raise ValueError(f"--prompts {path}: no requests in the file")
    return requests


def _id_of(obj: dict) -> str:
    return f" (id={obj['id']!r})" if "id" in obj else ""


def check_writable(path: str) -> bool:
    """Fail before loading the model if ``--out`` cannot be written. Returns whether this
    created the file (to remove it again if the run stops before writing anything)."""
    if path == "-":
        return False
    if os.path.isdir(path):
        raise ValueError(f"--out: {path} is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):  # appending truncates nothing
            pass
    except OSError as e:
        raise ValueError(f"--out: cannot write {path}: {e.strerror}") from None
    return not existed


def _record(res, line: int) -> dict:
    record = {"id": res.request.id, "line": line}
    if res.error is not None:
        record["error"] = res.error
    record.update({
        "text": res.samples[0].text if res.samples else "",
        "finish_reason": res.samples[0].finish_reason if res.samples else "error",
        "samples": [asdict(s) for s in res.samples],
        "metrics": asdict(res.metrics),
    })
    return record


def run(args) -> int:
    from .models import load_model

    requests = read_requests(args.prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    created = check_writable(args.out)
    try:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        engine = Engine(lm.model, lm.tokenizer, chunk_size=args.chunk_size, capacity_tokens=args.kv_tokens,
                        max_batch_size=args.max_batch, threads=args.threads,
                        eviction=getattr(args, "eviction", None))
    except BaseException:
        if created:
            os.remove(args.out)
        raise
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    failed = written = 0

    def write(record):
        nonlocal written
        out.write(json.dumps(record) + "\n")
        out.flush()
        written += 1

    try:
        line_of = {}
        for lineno, req in requests:
            try:
                line_of[engine.submit(req)] = lineno
            except (TypeError, ValueError) as e:
                # Refused: an error record in its place, the others still run.
                message = f"--prompts {args.prompts}, line {lineno}: {e}"
                print(f"chunkvale generate: error: {message}", file=sys.stderr)
                failed += 1
                write({"id": req.id, "line": lineno, "error": f"{type(e).__name__}: {message}", "text": "",
                       "finish_reason": "error", "samples": [], "metrics": None})
        for res in engine.stream(progress=False if args.no_progress else None):  # None: a bar only past 2 s
            line = line_of[res.index]
            if res.error is not None:
                failed += 1
                print(f"chunkvale generate: error: --prompts {args.prompts}, line {line} (id={res.request.id!r}): "
                      f"{res.error}", file=sys.stderr)
            write(_record(res, line))
    except KeyboardInterrupt:
        print(f"chunkvale generate: interrupted; {written} results written to {args.out}", file=sys.stderr)
        return 130
    finally:
        if out is not sys.stdout:
            out.close()
    m = engine.metrics()
    print(f"chunkvale generate: {m.requests} requests, {m.generated_tokens} tokens in {m.wall_s:.1f} s "
          f"({m.tokens_per_s:.1f} tok/s), {m.prefix_tokens_reused} prompt tokens reused from the cache"
          f"{eviction_summary(engine)}{f'; {failed} of {len(requests)} requests FAILED' if failed else ''}",
          file=sys.stderr)
    return 1 if failed else 0


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
