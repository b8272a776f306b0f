"""End to end through vLLM: offline ``vllm.LLM`` with prefix caching on the embedded SmolLM2,
chunkvale's attention backend (the plugin) against vLLM's own CPU backend (CHUNKVALE_VLLM=0), on
the same prompts, in vLLM's environment (scripts/test_vllm.sh makes one; the checkout installed
there); optionally chunkvale's own Engine on the same prompts (``--backends ...,engine``). Each
(workload, backend) runs in a fresh process (bench/e2e_workers.py); the engine start and one
warm-up request are not timed, the prefix cache is reset before the timed batch.

Workloads (bench/e2e_workloads.py): shared, shared_warm, demo, noshare (one shared prefix or
none) and the prefix trees multi_system (4 system prompts, 16 requests each), fewshot (system ->
4 few-shot blocks -> 16 questions each) and rollouts (16 prompts, n=8 seeded samples each, 256
new tokens at temperature 1).

Greedy everywhere but rollouts; the table says whether every output is token-identical across
backends. rollouts samples at temperature 1 from the engine's seeded generator: with the same
batches both backends draw the same token wherever their probabilities agree, and a float
rounding difference near a tie sends a sample down another path from there on (and, the
generator being shared, the samples drawn after it in that step): its "same outputs" cell counts
the samples that stayed identical throughout (information, not a check).

Block reads (chunkvale's plan, per layer and KV head, over the timed batch's steps): a
sequence-by-sequence walk, as vLLM's own kernel makes, reads every block of every sequence;
chunkvale reads a block that several sequences share once for all their query rows. "saved" is
the difference, "rows per block" the query rows each chunk-first block read served.

Each dtype (--dtypes; bfloat16 is what vLLM serves by default on CPUs that have it) and mode
(--modes: compiled is vLLM's default, torch.compile of the model; eager is enforce_eager) is a
separate row. Every vLLM worker asks the kernel for AMX tile state first (torch.cpu._init_amx(),
as vLLM's own CPU worker does), without which vLLM's AMX attention kernels die with SIGILL.

bf16 accuracy (when float32 runs too, same mode): both bf16 backends are approximations of the
fp32 model, so each is compared with vLLM's own fp32 greedy tokens: the mean number of tokens
before the first divergence per request, and at that step the gap between the log-probability
the bf16 run gave its own token and the one it gave the fp32 token (an untimed second pass with
logprobs over the same batch; "> x" when the fp32 token was not among its top 5).

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_e2e.py [--workloads shared,fewshot,rollouts]
        [--dtypes bfloat16,float32] [--modes compiled,eager] [--eager] [--backends vllm,chunkvale,engine]
        [--scale 0.1 (a smoke run: every token count and group size scaled)] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from e2e_workloads import WORKLOADS, build  # noqa: E402

BACKENDS = {"vllm": ("vllm", "0"), "chunkvale": ("vllm", "1"), "engine": ("engine", "1")}  # worker, CHUNKVALE_VLLM
DTYPES = ("bfloat16", "float32")
MODES = ("compiled", "eager")


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


def block_reads(counts: dict | None) -> str:
    """The plan's block reads as the table shows them: saved of all (share), rows per chunk-first block."""
    if not counts or not counts["seq_blocks"]:
        return "-"
    saved, total = counts["saved_block_reads"], counts["seq_blocks"]
    rows = counts["chunk_first_row_blocks"] / counts["chunk_first_blocks"] if counts["chunk_first_blocks"] else 0.0
    return f"{saved:,} of {total:,} ({100 * saved / total:.0f}%), {rows:.1f} rows/block"


def run_command(cmd: list[str], env: dict) -> None:
    """Runs a worker command in a process group of its own; vLLM's engine-core and worker
    processes are stopped with it however this run ends (an interrupted run would otherwise leave
    them spinning on the cores the next run measures)."""
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


def run_worker(kind: str, spec: Path, out: Path, env: dict) -> dict:
    run_command([sys.executable, __file__, "--worker", kind, str(spec), str(out)], env)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16 (vLLM's CPU default), float32")
    ap.add_argument("--modes", default="compiled", help="comma-separated: compiled (vLLM's default), eager")
    ap.add_argument("--eager", action="store_true", help="the same as --modes eager")
    ap.add_argument("--backends", default="vllm,chunkvale",
                    help="comma-separated: vllm (its own CPU attention), chunkvale (the plugin), engine "
                         "(chunkvale's own Engine); vllm and chunkvale always run")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies every token count and group size (smoke runs: 0.1)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import e2e_workers

        kind, spec, out = args.worker
        (e2e_workers.vllm_worker if kind == "vllm" else e2e_workers.engine_worker)(spec, out)
        return 0
    names = _csv(ap, "--workloads", args.workloads, WORKLOADS)
    dtypes = _csv(ap, "--dtypes", args.dtypes, DTYPES)
    modes = ["eager"] if args.eager else _csv(ap, "--modes", args.modes, MODES)
    backends = ["vllm", "chunkvale"] + [b for b in _csv(ap, "--backends", args.backends, tuple(BACKENDS))
                                        if b not in ("vllm", "chunkvale")]
    if not 0 < args.scale <= 1:
        ap.error(f"--scale: expected a number in (0, 1], got {args.scale}")
    with_accuracy = "float32" in dtypes and len(dtypes) > 1

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
    sampled: set = set()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for dtype in dtypes:
                for name in names:
                    w = build(name, tok, args.scale)
                    if w.sampled:
                        sampled.add(name)
                    spec = Path(tmp) / f"{name}-{mode}-{dtype}.json"
                    spec.write_text(json.dumps({"prompts": w.prompts, "sampling": w.sampling, "model": model,
                                                "mode": mode, "dtype": dtype, "warm_prefix": w.warm_prefix,
                                                "samples": w.samples,
                                                "logprobs": with_accuracy and dtype != "float32" and not w.sampled}))
                    for label in backends:
                        if label == "engine" and mode != modes[0]:
                            continue  # the Engine has no modes: it runs once per dtype
                        kind, flag = BACKENDS[label]
                        out = Path(tmp) / f"{name}-{mode}-{dtype}-{label}.json"
                        print(f"[vllm_e2e] {name} / {mode} / {dtype} / {label} ...", flush=True)
                        results.setdefault((mode, dtype), {}).setdefault(name, {})[label] = run_worker(
                            kind, spec, out, dict(env, CHUNKVALE_VLLM=flag))

    any_run = next(iter(next(iter(results.values())).values()))
    print(f"\n{describe(os.cpu_count() or 1)}; CPU flags {cpu_flags()}; chunkvale {chunkvale.__version__}; "
          f"vllm-cpu {any_run['vllm']['vllm']}; AMX tile state granted: {any_run['vllm']['amx']}; "
          f"block size {any_run['vllm']['block_size']}; scale {args.scale:g}\n")
    engine_cols = "engine" in backends
    print("| workload | mode | dtype | requests | samples | prompt tokens | generated | vLLM tok/s | "
          "vLLM + chunkvale tok/s | speed-up | " + ("chunkvale Engine tok/s | " if engine_cols else "") +
          "same outputs | block reads saved by chunkvale's plan | attention (vLLM / chunkvale) |")
    print("|---" * (13 + engine_cols) + "|")
    for (mode, dtype), by_name in results.items():
        for name, r in by_name.items():
            v, c = r["vllm"], r["chunkvale"]
            same = sum(a == b for a, b in zip(v["outputs"], c["outputs"]))
            tv, tc = v["generated_tokens"] / v["wall_s"], c["generated_tokens"] / c["wall_s"]
            eng = ""
            if engine_cols:
                e = r.get("engine")
                eng = "- | " if e is None else f"{e['generated_tokens'] / e['wall_s']:.1f}" + (
                    "" if name in sampled else
                    f" ({sum(a == b for a, b in zip(v['outputs'], e['outputs']))} same as vLLM)") + " | "
            print(f"| {name} | {mode} | {dtype} | {v['requests']} | {len(v['outputs'])} | {v['prompt_tokens']} | {v['generated_tokens']} "
                  f"| {tv:.1f} | {tc:.1f} | {tc / tv:.2f}x | {eng}{same} / {len(v['outputs'])}"
                  f"{' (sampled)' if name in sampled else ''} | {block_reads(c['counts'])} "
                  f"| {v['attention']} / {c['attention']} |")
    if sampled:
        print("\n(sampled) seeded sampling at temperature 1: a sample stays identical across backends until a "
              "rounding difference flips one draw; the count is information, not a check.")
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
                    if name not in ref or name in sampled:
                        continue
                    base = ref[name]["vllm"]
                    cells = []
                    for label in ("vllm", "chunkvale"):
                        span, gap, same = accuracy(base, r[label])
                        cells.append(f"{span:.1f} / {gap} / {same} of {len(base['outputs'])}")
                    per = base["generated_tokens"] / len(base["outputs"])
                    print(f"| {name} | {mode} | {per:.0f} | {cells[0]} | {cells[1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{d}": v for (m, d), v in results.items()}))
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the module importable
    sys.exit(main())
