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

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_e2e.py [--workloads shared,demo,noshare]
        [--eager] [--json out.json]
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
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ps = spec["prompts"]
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", enable_prefix_caching=True, max_model_len=4096,
              max_num_seqs=len(ps), seed=0, enforce_eager=spec["eager"])
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
    json.dump({"wall_s": wall, "start_s": start_s, "generated_tokens": sum(map(len, toks)),
               "prompt_tokens": sum(map(len, ps)), "outputs": toks, "vllm": vllm.__version__}, open(out_path, "w"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile of the model)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        ap.error(f"--workloads: expected a comma-separated subset of {', '.join(WORKLOADS)}, got {', '.join(bad)}")

    sys.path.insert(0, str(HERE))
    from machine import describe
    from transformers import AutoTokenizer

    import chunkvale
    from chunkvale.models import embedded_model_dir

    model = str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ps, sampling, warm = prompts(name, tok)
            spec = Path(tmp) / f"{name}.json"
            spec.write_text(json.dumps({"prompts": ps, "sampling": sampling, "model": model, "eager": args.eager,
                                        "warm_prefix": warm}))
            for label, flag in BACKENDS:
                out = Path(tmp) / f"{name}-{label}.json"
                print(f"[vllm_e2e] {name} / {label} ...", flush=True)
                subprocess.run([sys.executable, __file__, "--worker", str(spec), str(out)],
                               env=dict(env, CHUNKVALE_VLLM=flag), check=True)
                results.setdefault(name, {})[label] = json.loads(out.read_text())

    print(f"\n{describe(os.cpu_count() or 1)}; chunkvale {chunkvale.__version__} ({chunkvale.kernel_isa()} "
          f"kernels); vllm-cpu {next(iter(next(iter(results.values())).values()))['vllm']}, "
          f"{'eager' if args.eager else 'compiled (torch.compile, the default)'}, fp32\n")
    print("| workload | requests | prompt tokens | generated | vLLM CPU_ATTN tok/s | chunkvale tok/s | speed-up | "
          "same greedy outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        v, c = r["vllm"], r["chunkvale"]
        same = sum(a == b for a, b in zip(v["outputs"], c["outputs"]))
        tv, tc = v["generated_tokens"] / v["wall_s"], c["generated_tokens"] / c["wall_s"]
        print(f"| {name} | {len(v['outputs'])} | {v['prompt_tokens']} | {v['generated_tokens']} | {tv:.1f} | "
              f"{tc:.1f} | {tc / tv:.2f}x | {same} / {len(v['outputs'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the module importable
    sys.exit(main())
