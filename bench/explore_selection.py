"""Selection policies of budgeted attention measured before any kernel is written.

bench/fidelity.py's setup (the text, the embedded SmolLM2-135M-Instruct, fp32, a prefill then
POSITIONS teacher-forced positions, KL / top-1 against the full cache), with the attention done by
transformers through an attention function of ours: dense attention over the recorded prefill's
K/V and the rows' own, restricted by the key mask a policy (bench/selection_policies.py) builds.

Teacher forcing makes the decode one forward pass: a decode row's hidden state depends only on the
rows before it and on what each row attended, so the POSITIONS rows run together, each with its
own keys, exactly as one token a step would (the K/V of decoded rows are the budgeted run's own).

    python bench/explore_selection.py --budgets 256 512 1024 2048 --chunks 16 32 --json out.json
    python bench/explore_selection.py --check 16:1024:cuboid_max   # the current rule vs chunkvale's KVCache

``--check CHUNK:BUDGET:DIGEST[:SELECTION]`` decodes the same prefill through chunkvale's KVCache
(bench/fidelity.py's teacher_forced) with that Eviction and compares it with the explorer's policy
of the same name: per-position KL between the two and their top-1 agreement, so the explorer is
trusted only where it reproduces the core.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import chunkvale
from chunkvale import hf
from fidelity import compare, teacher_forced  # bench/: the script's directory
import teacher_text
from selection_policies import Policy, keep_mask

ATTN = "chunkvale_policy"


def policies() -> list[Policy]:
    """The candidates, each at the budget's attended tokens (``layer_slope`` moves them between layers)."""
    P = Policy
    return [
        P("current: cuboid_max, shared, sum"),
        P("cuboid_mean, shared, sum", digest="cuboid_mean"),
        P("sphere, shared, sum", digest="sphere"),
        P("sink+window", window_fill=True),
        P("cuboid_max, shared, max", pool="max"),
        P("cuboid_max, shared, softmax", pool="softmax"),
        P("cuboid_max, shared, round robin KV heads", pool="rr_kv"),
        P("cuboid_max, shared, round robin q heads", pool="rr_q"),
        P("cuboid_max, per KV head, sum", scope="kv_head"),
        P("cuboid_max, per KV head, max", scope="kv_head", pool="max"),
        P("cuboid_max, per KV head, softmax", scope="kv_head", pool="softmax"),
        P("cuboid_mean, per KV head, sum", digest="cuboid_mean", scope="kv_head"),
        P("cuboid_max, per q head (ceiling)", scope="q_head"),
        P("cuboid_max 8-token sub-blocks, shared", sub_block=8),
        P("cuboid_max 8-token sub-blocks, per KV head", sub_block=8, scope="kv_head"),
        P("cuboid_max, 2 sink chunks", sink=2),
        P("cuboid_max, window 1 chunk", window=1),
        P("cuboid_max, window 4 chunks", window=4),
        P("cuboid_max, dense_layers 4", dense_layers=4),
        P("cuboid_max, per-layer top-k, early +50%", layer_slope=0.5),
        P("cuboid_max, per-layer top-k, late +50%", layer_slope=-0.5),
        P("oracle mass, shared (ceiling)", digest="oracle"),
        P("oracle mass, per KV head (ceiling)", digest="oracle", scope="kv_head"),
    ]


class PolicyAttention:
    """The attention function: ``record`` stores each layer's K/V of a dense causal prefill;
    ``run`` attends the decode rows over the stored K/V and their own, keys chosen by ``policy``
    (None: every earlier key, the full cache)."""

    def __init__(self):
        self.k, self.v = [], []  # per layer [KVH, S, D] of the prefill
        self.mode = "record"
        self.policy, self.chunk, self.budget, self.topk = None, 0, 0, []
        self.attended = []  # per selecting layer: mean keys per (unit, row) of rows over budget

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        q, k, v = query[0], key[0], value[0]  # [H, T, D], [KVH, T, D]
        H, KVH = q.shape[0], k.shape[0]
        if self.mode == "record":
            if layer == 0:
                self.k, self.v = [], []
            self.k.append(k.clone())
            self.v.append(v.clone())
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                   enable_gqa=True)
            return out.transpose(0, 1)[None], None
        K = torch.cat([self.k[layer], k], dim=1)
        V = torch.cat([self.v[layer], v], dim=1)
        n0 = self.k[layer].shape[1]
        pos = torch.arange(n0, n0 + q.shape[1])
        if self.policy is None:
            mask = (torch.arange(K.shape[1])[None, :] <= pos[:, None])[None]
        else:
            mask = keep_mask(self.policy, layer, self.topk[layer], q, K, pos, self.chunk, self.budget, scaling)
            if layer >= self.policy.dense_layers and bool((pos + 1 > self.budget).any()):
                over = pos + 1 > self.budget
                self.attended.append(float(mask[:, over].sum(-1).double().mean()))
        mask = mask.repeat_interleave(H // mask.shape[0], dim=0) if mask.shape[0] > 1 else mask
        s = (q @ K.repeat_interleave(H // KVH, dim=0).transpose(1, 2)) * scaling
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        out = p @ V.repeat_interleave(H // KVH, dim=0)
        return out.transpose(0, 1)[None], None


def forward(model, ids, first_pos):
    """Log-probabilities [len(ids), vocab] of the rows ``ids`` at positions first_pos.. (float32)."""
    n = len(ids)
    out = model(input_ids=torch.as_tensor([ids]), position_ids=torch.arange(first_pos, first_pos + n)[None],
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), use_cache=False)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def run_policy(model, attn, policy, chunk, budget, fed, n_prompt):
    attn.mode = "run"
    attn.policy, attn.chunk, attn.budget, attn.attended = policy, chunk, budget, []
    attn.topk = policy.layer_topk(budget, chunk, model.config.num_hidden_layers) if policy else []
    return forward(model, fed, n_prompt)


def check(model, attn, spec, prompt, fed, targets, n_prompt, dense_layers):
    """The explorer against chunkvale's KVCache on the same prefill K/V: one Eviction."""
    chunk, budget, digest, *selection = spec.split(":")
    chunk, budget = int(chunk), int(budget)
    kw = {"selection": selection[0]} if selection else {}
    if digest == "sink+window":
        ev = chunkvale.Eviction(budget_tokens=budget, sink_chunks=1, window_chunks=budget // chunk - 1,
                                topk_chunks=0, dense_layers=dense_layers, **kw)
        policy = Policy("sink+window", window_fill=True, dense_layers=dense_layers)
    else:
        ev = chunkvale.Eviction(budget_tokens=budget, digest=digest, dense_layers=dense_layers, **kw)
        # The core's selections as policies: per_kv_head ranks by the largest bound of a head's group.
        per_head = ev.resolved_selection() == "per_kv_head"
        policy = Policy(spec, digest=digest, scope="kv_head" if per_head else "shared",
                        pool="max" if per_head else "sum", dense_layers=dense_layers)
    cfg = hf.cache_config(model, chunk_size=chunk, capacity_chunks=(n_prompt + len(fed)) // chunk + 4)
    steps = [(n_prompt, [k.transpose(0, 1).contiguous() for k in attn.k],
              [v.transpose(0, 1).contiguous() for v in attn.v])]
    t0 = time.perf_counter()
    full_cv, _ = teacher_forced(model, cfg, prompt, steps, fed)
    cfg.eviction = ev
    ours_cv, stats = teacher_forced(model, cfg, prompt, steps, fed)
    full_ex = run_policy(model, attn, None, chunk, budget, fed, n_prompt)
    ours_ex = run_policy(model, attn, policy, chunk, budget, fed, n_prompt)
    same = compare(ours_cv, ours_ex, targets)
    same_full = compare(full_cv, full_ex, targets)
    m_cv, m_ex = compare(full_cv, ours_cv, targets), compare(full_ex, ours_ex, targets)
    print(f"check {spec} ({time.perf_counter() - t0:.0f} s, {int(stats['evict_dropped_chunks'])} chunks dropped):\n"
          f"  full cache, chunkvale vs explorer: KL mean {same_full['kl_mean']:.2e}, top-1 {same_full['top1']:.2%}\n"
          f"  budgeted,   chunkvale vs explorer: KL mean {same['kl_mean']:.2e} p99 {same['kl_p99']:.2e}, "
          f"top-1 {same['top1']:.2%}\n"
          f"  vs full: chunkvale top-1 {m_cv['top1']:.2%} KL {m_cv['kl_mean']:.4f} p99 {m_cv['kl_p99']:.4f} | "
          f"explorer top-1 {m_ex['top1']:.2%} KL {m_ex['kl_mean']:.4f} p99 {m_ex['kl_p99']:.4f}", flush=True)
    return {"spec": spec, "chunkvale_vs_explorer": same, "full_chunkvale_vs_explorer": same_full,
            "chunkvale": m_cv, "explorer": m_ex}


def print_rows(rows, header=False):
    if header:
        print("| policy | chunk | budget | attended (mean per row, head unit) | top-1 | mean KL | p99 KL |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        print(f"| {r['policy']} | {r['chunk']} | {r['budget']} | {r['attended']:.0f} | {m['top1']:.2%} | "
              f"{m['kl_mean']:.4f} | {m['kl_p99']:.4f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_text.add_arguments(ap, positions=256)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--only", nargs="*", default=None, help="policy names (substrings) to run; default all")
    ap.add_argument("--check", nargs="*", default=[], metavar="CHUNK:BUDGET:DIGEST[:SELECTION]")
    ap.add_argument("--dense-layers", type=int, default=2, help="for --check")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    teacher_text.check_arguments(ap, args)

    from transformers import AttentionInterface

    from chunkvale.models import load_model

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    text = teacher_text.split(tok, args)
    prompt, fed, targets, n_prompt = text.prompt, text.fed, text.targets, text.n_prompt
    attn = PolicyAttention()
    AttentionInterface.register(ATTN, attn)
    model.set_attn_implementation(ATTN)
    started = time.perf_counter()
    out = {"machine": {"kernel_isa": chunkvale.kernel_isa()}, "args": vars(args), "rows": [], "checks": []}
    with torch.inference_mode():
        attn.mode = "record"
        forward(model, prompt, 0)
        print(f"prefill {n_prompt} tokens: {time.perf_counter() - started:.0f} s", flush=True)
        for spec in args.check:
            out["checks"].append(check(model, attn, spec, prompt, fed, targets, n_prompt, args.dense_layers))
        chosen = [p for p in policies() if args.only is None or any(s in p.name for s in args.only)]
        first = True
        for chunk in args.chunks if chosen else []:
            full = run_policy(model, attn, None, chunk, 0, fed, n_prompt)
            for budget in args.budgets:
                for policy in chosen:
                    try:
                        policy.split(budget, chunk)
                    except ValueError:
                        continue
                    lp = run_policy(model, attn, policy, chunk, budget, fed, n_prompt)
                    layers = max(len(attn.attended), 1)
                    row = {"policy": policy.name, "chunk": chunk, "budget": budget,
                           "attended": sum(attn.attended) / layers, "metrics": compare(full, lp, targets)}
                    out["rows"].append(row)
                    print_rows([row], header=first)
                    first = False
    out["wall_s"] = time.perf_counter() - started
    print(f"\nwall time {out['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
