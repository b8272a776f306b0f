"""Fidelity of budgeted attention: how far its next-token distributions drift from the full cache's.

Long natural text (default: the GNU GPL version 3 that Debian's base-files package ships as
/usr/share/common-licenses/GPL-3), teacher-forced on the embedded SmolLM2-135M-Instruct: the
first CONTEXT - POSITIONS tokens are prefilled, then the last POSITIONS tokens are decoded one at
a time, each step fed the text's true token. At every decoded position the budgeted run's
next-token distribution is compared with the full cache's: mean and p99 KL(full || budgeted),
top-1 agreement, and the perplexity of both on the text.

    python bench/fidelity.py --context 4096 --positions 512 --budgets 256 512 1024 2048 --chunks 16 32 64

Rows: per chunk size, per budget, each digest kind and a sink + window (StreamingLLM) baseline,
every one attending to the same ``budget`` tokens in whole chunks (``Eviction.attended_tokens``),
per selection asked for (``--selections``: per_kv_head, Eviction's default, and/or shared).
The prompt is prefilled once, by the plain Engine with the full cache, which records its K/V
(bench/replay.py, as bench/passkey.py does); every configuration is fed those K/V in a fresh
KVCache and decodes from there. The full cache is decoded the same way once per chunk size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import chunkvale
from chunkvale import hf
from passkey import configurations  # bench/: the script's directory
from replay import engine_run, feed_prefill
import teacher_text

def teacher_forced(model, cfg, prompt, steps, fed):
    """Log-probabilities [len(fed), vocab] (float32) of the next token after each of ``fed``, decoded
    one token a step after the recorded prefill ``steps`` of ``prompt``; and the cache's stats."""
    import torch

    cache = chunkvale.KVCache(cfg)
    runner = hf.ModelRunner(model, cache)
    seq = feed_prefill(cache, prompt, steps)
    rows = []
    for token in fed:
        step = cache.plan([(seq, [token])])
        rows.append(torch.log_softmax(runner.forward(step, [token], [0])[0].float(), dim=-1))
    stats = cache.stats()
    cache.remove(seq)
    return torch.stack(rows), stats


def compare(full, other, targets) -> dict:
    """KL(full || other) per position (mean, p99), top-1 agreement, and the perplexity of each on
    ``targets`` (the true next tokens). ``full``, ``other``: log-probabilities [positions, vocab]."""
    import torch

    full, other = full.double(), other.double()
    kl = (full.exp() * (full - other)).sum(dim=-1).clamp_min(0.0)  # >= 0 up to rounding
    rows = torch.arange(len(targets))
    t = torch.as_tensor(targets)
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1": float((full.argmax(-1) == other.argmax(-1)).double().mean()),
        "ppl_full": float(torch.exp(-full[rows, t].mean())),
        "ppl": float(torch.exp(-other[rows, t].mean())),
    }


def selection_configurations(args, chunk):
    """passkey.configurations per selection asked for, the full cache and sink+window once."""
    seen = set()
    for selection in args.selections:
        for name, ev in configurations(args.budgets, args.digests, chunk, args.dense_layers, selection):
            key = name if ev is None or name.endswith("sink+window") else (name, selection)
            if key not in seen:
                seen.add(key)
                yield name, ev


def print_table(rows, context):
    print("| chunk | budget (share of context) | digest | selection | attended tokens | top-1 agreement | mean KL | "
          "p99 KL | perplexity (full cache) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        print(f"| {r['chunk']} | {r['budget']} ({r['budget'] / context:.1%}) | {r['digest']} | {r['selection']} | "
              f"{r['attended']} | {m['top1']:.2%} | {m['kl_mean']:.4f} | {m['kl_p99']:.4f} | "
              f"{m['ppl']:.3f} ({m['ppl_full']:.3f}) |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_text.add_arguments(ap, positions=512)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--digests", nargs="+", default=["cuboid_max", "cuboid_mean", "sphere"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--selections", nargs="+", default=["per_kv_head"], choices=["per_kv_head", "shared"],
                    help="the digest rows' selections (sink+window runs once: without a top-k both are the same)")
    ap.add_argument("--json", help="also write the rows here, as they come")
    args = ap.parse_args(argv)
    teacher_text.check_arguments(ap, args)

    import torch

    from chunkvale.models import load_model

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    if args.context > model.config.max_position_embeddings:
        ap.error(f"--context: the model's window is {model.config.max_position_embeddings} tokens")
    text = teacher_text.split(tok, args)
    prompt, fed, targets, n_prompt = text.prompt, text.fed, text.targets, text.n_prompt
    print(f"text {args.text}: prefill {n_prompt} tokens, then {args.positions} positions teacher-forced "
          f"({loaded.name}, kernels {chunkvale.kernel_isa()})", flush=True)

    started = time.perf_counter()
    with torch.inference_mode():
        full_cfg = hf.cache_config(model, chunk_size=64, capacity_chunks=args.context // 16 + 4)
        _, steps = engine_run(model, tok, full_cfg, prompt, 1, record=True)
        print(f"prefill (Engine, full cache, recorded): {time.perf_counter() - started:.0f} s", flush=True)
        rows = []
        for chunk in args.chunks:
            capacity = args.context // chunk + 4
            full = None
            for name, ev in selection_configurations(args, chunk):
                cfg = hf.cache_config(model, chunk_size=chunk, capacity_chunks=capacity)
                cfg.eviction = ev
                t0 = time.perf_counter()
                logprobs, stats = teacher_forced(model, cfg, prompt, steps, fed)
                if ev is None:
                    full = logprobs
                    m = compare(full, full, targets)
                    print(f"chunk {chunk}, full cache: perplexity {m['ppl']:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                    continue
                budget, digest = name.removeprefix("budget ").split(", ")
                selection = "-" if digest == "sink+window" else ev.resolved_selection()
                row = {"chunk": chunk, "budget": int(budget), "digest": digest, "selection": selection,
                       "attended": ev.attended_tokens(chunk), "metrics": compare(full, logprobs, targets),
                       "dropped": int(stats["evict_dropped_chunks"])}
                if row["dropped"] == 0:
                    raise RuntimeError(f"chunk {chunk}, {name}: no chunk was dropped; the budget never applied")
                rows.append(row)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
                print_table([row], args.context)
                print(f"  ({time.perf_counter() - t0:.0f} s, {row['dropped']} chunks dropped)", flush=True)
    print(f"\nwall time {time.perf_counter() - started:.0f} s\n")
    print_table(rows, args.context)
    print(f"\n{args.positions} teacher-forced positions after a {n_prompt}-token prefill of {Path(args.text).name}; "
          f"dense_layers {args.dense_layers}; {loaded.name}; fp32; KL(full || budgeted) in nats.")


if __name__ == "__main__":
    main()
