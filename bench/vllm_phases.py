"""Where a vLLM step's time goes, vLLM's own CPU attention against chunkvale's plugin: one workload
of bench/vllm_e2e.py per backend, each in a fresh process running vLLM's engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), with wall-clock timers around the model runner's phases and
the attention backend's three calls:

  step            GPUModelRunner.execute_model + sample_tokens (one engine step, runner side)
  model forward   GPUModelRunner._model_forward (every layer, attention included)
  attention       the backend's forward (vLLM: its CPU kernel; chunkvale: PagedAttention.run)
  kv write        the backend's do_kv_cache_update (vLLM: its packing op; chunkvale: write_kv)
  metadata        the backend's metadata builder (chunkvale: PagedAttention.plan)
  sampling        GPUModelRunner.sample_tokens
  rest of forward model forward - attention - kv write: the linear layers, norms, rotary, ...

Times are totals over the timed batch divided by the engine steps it took, so a difference in
a phase between the two columns is what that backend costs there. The timers add a few
microseconds per call (two perf_counter reads).

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_phases.py --workload noshare --dtype bfloat16 [--mode eager]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("step", "model forward", "attention", "kv write", "metadata", "sampling")
BACKENDS = (("vllm", "0"), ("chunkvale", "1"))  # label, CHUNKVALE_VLLM


def _timed(totals: dict, counts: dict, phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - t0
            counts[phase] += 1
    return wrapper


def _instrument(totals: dict, counts: dict) -> None:
    """Wraps the phases' methods on their classes (before the engine makes its objects)."""
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap(cls, name, phase):
        if name in cls.__dict__:  # only where the class defines it (a subclass calling super() is timed once)
            setattr(cls, name, _timed(totals, counts, phase, cls.__dict__[name]))

    wrap(GPUModelRunner, "execute_model", "step")
    wrap(GPUModelRunner, "sample_tokens", "sampling")
    wrap(GPUModelRunner, "_model_forward", "model forward")
    classes = [(cpu_attn.CPUAttentionBackendImpl, cpu_attn.CPUAttentionMetadataBuilder)]
    if os.environ.get("CHUNKVALE_VLLM", "1") != "0":
        from chunkvale import vllm_backend
        classes.append((vllm_backend.ChunkvaleAttentionImpl, vllm_backend.ChunkvaleMetadataBuilder))
    for impl, builder in classes:
        wrap(impl, "forward", "attention")
        wrap(impl, "do_kv_cache_update", "kv write")
        wrap(builder, "build", "metadata")


def worker(spec_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its classes are ours to time
    spec = json.load(open(spec_path))
    import torch

    amx = bool(getattr(torch.cpu, "_init_amx", lambda: False)())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    totals: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    _instrument(totals, counts)
    ps = spec["prompts"]
    samples = sum(sp.get("n", 1) for sp in spec["sampling"])
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=True, max_model_len=4096,
              max_num_seqs=min(samples, 256), seed=0, enforce_eager=spec["mode"] == "eager")
    llm.generate([TokensPrompt(prompt_token_ids=ps[0][-16:])], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    if spec.get("warm_prefix"):
        llm.generate([TokensPrompt(prompt_token_ids=ps[0][: spec["warm_prefix"]])],
                     SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    totals.clear()
    counts.clear()
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                        [SamplingParams(**sp) for sp in spec["sampling"]], use_tqdm=False)
    wall = time.perf_counter() - t0
    json.dump({"wall_s": wall, "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
               "totals": dict(totals), "counts": dict(counts), "amx": amx}, open(out_path, "w"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="noshare")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--mode", default="eager", choices=("eager", "compiled"))
    ap.add_argument("--requests", type=int, default=None, help="only the workload's first N requests (a quick look)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    sys.path.insert(0, str(HERE))
    from machine import cpu_flags, describe
    from transformers import AutoTokenizer
    from e2e_workloads import WORKLOADS, build
    from vllm_e2e import run_command

    import chunkvale
    from chunkvale.models import embedded_model_dir

    if args.workload not in WORKLOADS:
        ap.error(f"--workload: expected one of {', '.join(WORKLOADS)}, got {args.workload!r}")
    model = str(embedded_model_dir())
    w = build(args.workload, AutoTokenizer.from_pretrained(model))
    n = args.requests or len(w.prompts)
    ps, sampling, warm = w.prompts[:n], w.sampling[:n], w.warm_prefix
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"prompts": ps, "sampling": sampling, "model": model, "mode": args.mode,
                                    "dtype": args.dtype, "warm_prefix": warm}))
        for label, flag in BACKENDS:
            out = Path(tmp) / f"{label}.json"
            print(f"[vllm_phases] {args.workload} / {args.mode} / {args.dtype} / {label} ...", flush=True)
            run_command([sys.executable, __file__, "--worker", str(spec), str(out)], dict(env, CHUNKVALE_VLLM=flag))
            res[label] = json.loads(out.read_text())
    print(f"\n{describe(os.cpu_count() or 1)}; CPU flags {cpu_flags()}; chunkvale {chunkvale.kernel_isa()} kernels; "
          f"workload {args.workload}, {args.mode}, {args.dtype}\n")
    steps = {k: max(r["counts"].get("step", 1), 1) for k, r in res.items()}
    print("| phase | vLLM ms per step | vLLM + chunkvale ms per step | difference |")
    print("|---|---|---|---|")
    rows = list(PHASES) + ["rest of forward"]
    for phase in rows:
        vals = []
        for label, _ in BACKENDS:
            t = res[label]["totals"]
            x = (t.get("model forward", 0) - t.get("attention", 0) - t.get("kv write", 0)
                 if phase == "rest of forward" else t.get(phase, 0))
            vals.append(1e3 * x / steps[label])
        print(f"| {phase} | {vals[0]:.2f} | {vals[1]:.2f} | {vals[1] - vals[0]:+.2f} |")
    for label, _ in BACKENDS:
        r = res[label]
        print(f"{label}: {r['generated_tokens'] / r['wall_s']:.1f} tok/s, {steps[label]} steps, wall {r['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
