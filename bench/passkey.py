"""Passkey retrieval with budgeted attention on the embedded SmolLM2-135M-Instruct.

A random 5-digit pass key is hidden at a relative position inside filler text of about
CONTEXT tokens; the model is asked to repeat it (greedy). Every configuration runs the same
prompts in one process: the full cache, budgeted attention at each budget for each digest
kind, and a sink + window only baseline (StreamingLLM-style) at the same budget.

    python bench/passkey.py --contexts 2048 --budgets 512 1024 --positions 5 --seeds 1

Prints a markdown table: accuracy per configuration and context, and the share of the full
cache's accuracy.
"""

from __future__ import annotations

import argparse
import random
import time

import chunkvale
from chunkvale import hf
from chunkvale.engine import Engine, Request
from chunkvale.models import load_model

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
TASK = ("There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it; you will be asked about it.\n")


def passkey_prompt(tokenizer, context: int, position: float, key: str) -> list[int]:
    """Token ids of a prompt of about `context` tokens with the key at relative `position`."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer(TASK + needle + question)["input_ids"])
    per = len(tokenizer(FILLER)["input_ids"])
    n = max(1, (context - fixed) // per)
    before = int(round(n * position))
    text = TASK + FILLER * before + needle + FILLER * (n - before) + question
    return tokenizer(text)["input_ids"]


def configurations(budgets, digests, chunk):
    yield "full cache", None
    for b in budgets:
        for d in digests:
            yield f"budget {b}, {d}", chunkvale.Eviction(budget_tokens=b, digest=d)
        # Same budget, no top-k: sinks + a window filling the rest of it.
        yield f"budget {b}, sink+window", chunkvale.Eviction(
            budget_tokens=b, sink_chunks=1, window_chunks=max(1, b // chunk - 1), topk_chunks=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048])
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--digests", nargs="+", default=["cuboid_max", "cuboid_mean", "sphere"])
    ap.add_argument("--positions", type=int, default=5, help="key positions, evenly from 0.05 to 0.95")
    ap.add_argument("--seeds", type=int, default=1, help="random keys per position")
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args(argv)

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    rng = random.Random(0)
    cases = []
    for ctx in args.contexts:
        for p in range(args.positions):
            pos = 0.05 + 0.9 * p / max(1, args.positions - 1)
            for _ in range(args.seeds):
                key = str(rng.randint(10000, 99999))
                cases.append((ctx, pos, key, passkey_prompt(tok, ctx, pos, key)))

    rows = []
    for name, ev in configurations(args.budgets, args.digests, args.chunk):
        longest = max(len(c[3]) for c in cases) + 16
        cfg = hf.cache_config(model, chunk_size=args.chunk, capacity_chunks=longest // args.chunk + 4)
        cfg.eviction = ev
        t0 = time.perf_counter()
        hits = {ctx: 0 for ctx in args.contexts}
        for ctx, pos, key, ids in cases:
            engine = Engine(model, tok, cache=chunkvale.KVCache(cfg))
            out = engine.generate([Request(token_ids=ids, max_new_tokens=8)], progress=False)[0]
            hits[ctx] += key in out.samples[0].text
        rows.append((name, hits, time.perf_counter() - t0))
        print(f"{name}: {hits} ({rows[-1][2]:.0f} s)", flush=True)

    per_ctx = len(cases) // len(args.contexts)
    full = rows[0][1]
    print("\n| configuration | " + " | ".join(f"{c} tokens" for c in args.contexts) + " | vs full cache |")
    print("|---|" + "---|" * (len(args.contexts) + 1))
    for name, hits, _ in rows:
        acc = [hits[c] / per_ctx for c in args.contexts]
        total_full = sum(full.values())
        share = sum(hits.values()) / total_full if total_full else float("nan")
        print(f"| {name} | " + " | ".join(f"{a:.0%}" for a in acc) + f" | {share:.0%} |")
    print(f"\n{per_ctx} prompts per context ({args.positions} positions x {args.seeds} keys), greedy, "
          f"chunk {args.chunk}, dense_layers 2, SmolLM2-135M-Instruct (embedded).")


if __name__ == "__main__":
    main()
