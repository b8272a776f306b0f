"""Passkey retrieval with budgeted attention on the embedded SmolLM2-135M-Instruct.

A random 5-digit pass key is hidden at a relative position inside filler text of about
CONTEXT tokens; the model is asked to repeat it (greedy). Every configuration runs the same
prompts in one process: the full cache, budgeted attention at each budget for each digest
kind, and a sink + window only baseline (StreamingLLM-style) at the same budget: every budgeted
configuration attends to the same number of tokens, ``budget_tokens`` in whole chunks.

    python bench/passkey.py --contexts 2048 4096 8184 --positions 10 --seeds 2

Each prompt is prefilled once. Budgeted attention only budgets decode steps (prefill rows
attend to everything), so the prompt's K/V and the first answer token are the same under
every configuration: the full-cache run goes through the plain Engine, which records each
prefill step's K/V per layer, and every configuration then starts from a fresh KVCache with
its own Eviction config, fed those K/V in the same steps, and decodes greedily through the
model. The full cache is also decoded that way for every prompt and must give the Engine's
tokens exactly (counted and printed); ``--check`` additionally runs the plain Engine under
every configuration for the first prompts and compares tokens.

Prints a markdown table: accuracy per configuration and context, and the share of the full
cache's accuracy.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import chunkvale
from chunkvale import hf, sampling
from chunkvale.engine import Engine
from replay import PrefillRecorder, engine_run, feed_prefill  # noqa: F401  (bench/: the script's directory)

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
TASK = ("There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it; you will be asked about it.\n")


def passkey_prompt(tokenizer, context: int, position: float, key: str) -> list[int]:
    """Token ids of the longest prompt of at most `context` tokens (whole filler sentences)
    with the key at relative `position`."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"

    def build(n):
        before = int(round(n * position))
        return tokenizer(TASK + FILLER * before + needle + FILLER * (n - before) + question)["input_ids"]

    fixed = len(build(0))
    per = len(tokenizer(FILLER * 16)["input_ids"]) / 16  # repeated filler merges across its seams
    n = max(1, int((context - fixed) / per))
    ids = build(n)
    while len(ids) > context and n > 1:
        n -= 1
        ids = build(n)
    while len(longer := build(n + 1)) <= context:
        n, ids = n + 1, longer
    return ids


def configurations(budgets, digests, chunk, dense_layers, selection=None):
    """(name, Eviction or None): the full cache, then per budget each digest kind and a sink + window
    baseline, every one attending to the same ``budget`` tokens (whole chunks) once it selects.
    ``selection``: the digest configurations' (None: Eviction's default)."""
    yield "full cache", None
    for b in budgets:
        for d in digests:
            yield f"budget {b}, {d}", chunkvale.Eviction(budget_tokens=b, digest=d, dense_layers=dense_layers,
                                                         selection=selection)
        # Same budget, no top-k: sinks + a window filling the rest of it.
        yield f"budget {b}, sink+window", chunkvale.Eviction(
            budget_tokens=b, sink_chunks=1, window_chunks=max(1, b // chunk - 1), topk_chunks=0,
            dense_layers=dense_layers)


def decode_from_prefill(model, cfg, prompt, steps, first_token, max_new_tokens, eos_ids=frozenset(),
                        max_context=None):
    """Greedy tokens when ``steps`` (a :class:`PrefillRecorder`'s) are fed into a fresh cache made from
    ``cfg`` and the rest is decoded through ``model``; the same stop rules as the Engine. Returns the
    tokens and the cache's stats."""
    cache = chunkvale.KVCache(cfg)
    runner = hf.ModelRunner(model, cache)
    seq = feed_prefill(cache, prompt, steps)
    tokens = [first_token]
    length = len(prompt)
    while True:
        if tokens[-1] in eos_ids or len(tokens) >= max_new_tokens or (max_context and length >= max_context):
            break
        step = cache.plan([(seq, [tokens[-1]])])
        logits = runner.forward(step, [tokens[-1]], [0])
        length += 1
        tokens.append(sampling.next_token(logits[0], 0.0, 1.0, None))
    stats = cache.stats()
    cache.remove(seq)
    return tokens, stats


def print_table(configs, hits, counts, args, model_name):
    full = hits["full cache"]
    total_full = sum(full.values())
    print("| configuration | " + " | ".join(f"{c} tokens" for c in args.contexts) + " | vs full cache |")
    print("|---|" + "---|" * (len(args.contexts) + 1))
    for name, _ in configs:
        acc = [f"{hits[name][c] / counts[c]:.0%}" if counts[c] else "-" for c in args.contexts]
        share = f"{sum(hits[name].values()) / total_full:.0%}" if total_full else "-"
        print(f"| {name} | " + " | ".join(acc) + f" | {share} |")
    print("\nprompts per context: " + ", ".join(f"{c}: {counts[c]}" for c in args.contexts)
          + f" ({args.positions} positions x {args.seeds} keys planned), greedy, chunk {args.chunk}, "
          f"dense_layers {args.dense_layers}, {model_name}.", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048])
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--digests", nargs="+", default=["cuboid_max", "cuboid_mean", "sphere"])
    ap.add_argument("--positions", type=int, default=5, help="key positions, evenly from 0.05 to 0.95")
    ap.add_argument("--seeds", type=int, default=1, help="random keys per position")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--interim", type=int, default=5, metavar="R",
                    help="print the table so far after every R prompts per context (0: only at the end)")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="also run the plain Engine under every configuration for the first N prompts "
                         "and require the same tokens as the fed path")
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from chunkvale.models import load_model

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    window = int(model.config.max_position_embeddings)
    rng = random.Random(0)
    cases = []
    # Contexts interleaved (one prompt of each in turn), so the interim tables cover them evenly.
    for p in range(args.positions):
        pos = 0.05 + 0.9 * p / max(1, args.positions - 1)
        for _ in range(args.seeds):
            for ctx in args.contexts:
                key = str(rng.randint(10000, 99999))
                ids = passkey_prompt(tok, ctx, pos, key)
                if len(ids) + args.max_new_tokens > window:
                    sys.exit(f"context {ctx}: a prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens "
                             f"exceeds the model's {window}-token window; use a smaller context")
                cases.append((ctx, pos, key, ids))
    for ctx in args.contexts:
        lens = [len(c[3]) for c in cases if c[0] == ctx]
        print(f"context {ctx}: prompt tokens {min(lens)}..{max(lens)} (+{args.max_new_tokens} new, window {window})",
              flush=True)

    longest = max(len(c[3]) for c in cases) + args.max_new_tokens + 16
    configs = list(configurations(args.budgets, args.digests, args.chunk, args.dense_layers))
    cfgs = {}
    for name, ev in configs:
        cfg = hf.cache_config(model, chunk_size=args.chunk, capacity_chunks=longest // args.chunk + 4)
        cfg.eviction = ev
        cfgs[name] = cfg
    probe = Engine(model, tok, cache=chunkvale.KVCache(cfgs["full cache"]))
    eos_ids, max_context = probe.eos_ids, probe.max_context
    del probe

    hits = {name: {ctx: 0 for ctx in args.contexts} for name, _ in configs}
    seconds = {name: 0.0 for name, _ in configs}
    dropped = {name: 0 for name, _ in configs}
    prefill_s = {ctx: 0.0 for ctx in args.contexts}
    counts = {ctx: 0 for ctx in args.contexts}
    fed_mismatch = 0
    started = time.perf_counter()
    check_mismatch = []
    bar = tqdm(cases, desc="prompts", unit="prompt", dynamic_ncols=True, file=sys.stdout, mininterval=10)
    for i, (ctx, pos, key, ids) in enumerate(bar):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref, steps = engine_run(model, tok, cfgs["full cache"], ids, args.max_new_tokens, record=True)
        prefill_s[ctx] += time.perf_counter() - t0  # prefill + decode of the full cache through the Engine
        for name, _ in configs:
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens, stats = decode_from_prefill(model, cfgs[name], ids, steps, ref[0], args.max_new_tokens,
                                                    eos_ids, max_context)
            seconds[name] += time.perf_counter() - t0
            dropped[name] += int(stats.get("evict_dropped_chunks", 0))
            if name == "full cache" and tokens != ref:
                fed_mismatch += 1
                print(f"MISMATCH fed full cache vs Engine, prompt {i}: {ref} vs {tokens}", flush=True)
            if i < args.check:
                with torch.inference_mode():
                    direct = engine_run(model, tok, cfgs[name], ids, args.max_new_tokens)
                if direct != tokens:
                    check_mismatch.append((i, name))
                    print(f"CHECK MISMATCH prompt {i}, {name}: Engine {direct} vs fed {tokens}", flush=True)
            hits[name][ctx] += key in tok.decode(tokens, skip_special_tokens=True)
        del steps
        counts[ctx] += 1
        bar.set_postfix(ctx=ctx, full=sum(hits["full cache"].values()), refresh=False)
        if args.interim and (i + 1) % (args.interim * len(args.contexts)) == 0 and i + 1 < len(cases):
            print(f"\ninterim after {i + 1} prompts:", flush=True)
            print_table(configs, hits, counts, args, loaded.name)
    bar.close()
    print(f"\nwall time {time.perf_counter() - started:.0f} s for {len(cases)} prompts x {len(configs)} configurations")

    print(f"\nfed full cache vs Engine: {len(cases) - fed_mismatch}/{len(cases)} prompts token-identical")
    if args.check:
        n = min(args.check, len(cases))
        print(f"--check: {n} prompts x {len(configs)} configurations, "
              f"{n * len(configs) - len(check_mismatch)} token-identical to the plain Engine")
    print("\nprefill (Engine, full cache, incl. its decode), per context: "
          + ", ".join(f"{c}: {prefill_s[c]:.0f} s" for c in args.contexts))
    print("decode from the shared prefill, per configuration (all prompts):")
    for name, _ in configs:
        print(f"  {name}: {seconds[name]:.1f} s, dropped chunks (sum of stats over prompts) {dropped[name]}")

    print()
    print_table(configs, hits, counts, args, loaded.name)
    if fed_mismatch or check_mismatch:
        sys.exit("equivalence check failed (see MISMATCH lines)")


if __name__ == "__main__":
    main()
