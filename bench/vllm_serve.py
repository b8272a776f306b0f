"""`vllm serve` under load, with and without chunkvale's attention, driven by vLLM's own load
generator (`vllm bench serve`), in vLLM's environment (scripts/test_vllm.sh makes one; the
checkout installed there).

For each dtype (--dtypes) and backend (vLLM's own CPU attention, CHUNKVALE_VLLM=0; chunkvale's
plugin, CHUNKVALE_VLLM=1) one server starts with the same flags (the embedded SmolLM2, prefix
caching, chunkvale.vllm_server: `vllm serve` through chunkvale.vllm_cli), serves a small untimed
warm-up, then `vllm bench serve` runs once per request rate (--rates; "inf" sends every request
at once: the saturation throughput), and the server is stopped (SIGTERM; SIGKILL of its process
group after 60 s).

Dataset: vLLM's `prefix_repetition` (random token ids: --num-prefixes prefixes of --prefix-len
tokens, --num-prompts / --num-prefixes requests under each with their own --suffix-len tokens,
shuffled; --output-len new tokens each, ignore_eos). Each rate draws its own prompts (seed = the
rate's index, the same for both backends), so no run finds the previous run's prompts in the
prefix cache.

Bounded: --max-seconds for the whole sweep; a bench run gets what is left (at most
--run-timeout), one that overruns is killed and its row prints "-", and once the time is spent
the remaining runs are skipped (still "-").

    VLLM_CPU_OMP_THREADS_BIND=0-1 python bench/vllm_serve.py [--dtypes bfloat16,float32]
        [--rates 0.25,0.5,1,inf] [--num-prompts 64] [--prefix-len 1024 --suffix-len 128
        --num-prefixes 4 --output-len 128] [--eager] [--max-seconds 5400] [--json out.json]

Smoke run (a few minutes): --dtypes float32 --rates 2,inf --num-prompts 8 --prefix-len 256
--suffix-len 32 --num-prefixes 2 --output-len 16 --eager
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = (("vllm", "0"), ("chunkvale", "1"))  # label, CHUNKVALE_VLLM
DTYPES = ("bfloat16", "float32")
SERVED_NAME = "smollm2"
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms", "completed")


def server_args(model: str, dtype: str, args) -> list[str]:
    out = [model, "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(args.max_model_len),
           "--enable-prefix-caching", "--seed", "0"]
    return out + (["--enforce-eager"] if args.eager else [])


def bench_args(url: str, model: str, rate: float, num_prompts: int, seed: int, result: Path, args) -> list[str]:
    """`vllm bench serve` over the shared-prefix dataset at one request rate."""
    return ["bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", SERVED_NAME, "--tokenizer", model, "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_len),
            "--prefix-repetition-suffix-len", str(args.suffix_len),
            "--prefix-repetition-num-prefixes", str(args.num_prefixes),
            "--prefix-repetition-output-len", str(args.output_len),
            "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--ignore-eos", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]


class Clock:
    """The sweep's time budget."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_bench(cmd: list[str], env: dict, result: Path, timeout: float, log) -> dict | None:
    """One `vllm bench serve` run; its metrics, or None when it failed or ran out of time."""
    if timeout <= 0:
        return None
    try:
        proc = subprocess.run([sys.executable, "-m", "chunkvale.vllm_cli", *cmd], env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[vllm_serve]   killed after {timeout:.0f} s (the time bound)", flush=True)
        return None
    if proc.returncode != 0 or not result.exists():
        print(f"[vllm_serve]   vllm bench serve exited with {proc.returncode} (log: {log.name})", flush=True)
        return None
    data = json.loads(result.read_text())
    return {k: data.get(k) for k in METRICS}


def serve_and_sweep(label: str, flag: str, dtype: str, model: str, rates: list[float], args, env: dict,
                    clock: Clock, tmp: Path) -> dict:
    """One server, every rate; {rate: metrics or None}."""
    from chunkvale.vllm_server import ServerError, VllmServer

    out: dict = {rate: None for rate in rates}
    if clock.left() < 60:
        print(f"[vllm_serve] {dtype} / {label}: skipped (the time bound is spent)", flush=True)
        return out
    srv = VllmServer(server_args(model, dtype, args), env=dict(env, CHUNKVALE_VLLM=flag),
                     log_path=tmp / f"server-{dtype}-{label}.log", start_timeout_s=min(900, clock.left()))
    print(f"[vllm_serve] {dtype} / {label}: starting vllm serve (log {srv.log_path})", flush=True)
    try:
        srv.start()
    except ServerError as e:
        print(f"[vllm_serve] {dtype} / {label}: {e}", flush=True)
        return out
    try:
        with open(tmp / f"bench-{dtype}-{label}.log", "w") as log:
            # One request per prefix (prefix_repetition needs at least as many prompts as prefixes).
            warm = tmp / f"warm-{dtype}-{label}.json"
            if run_bench(bench_args(srv.url, model, math.inf, max(2, args.num_prefixes), 1000, warm, args), env, warm,
                         min(300, clock.left()), log) is None:
                print(f"[vllm_serve] {dtype} / {label}: the warm-up failed; no rates run on a cold server", flush=True)
                return out
            for i, rate in enumerate(rates):
                result = tmp / f"{dtype}-{label}-{i}.json"
                print(f"[vllm_serve] {dtype} / {label}: request rate {rate:g} ...", flush=True)
                out[rate] = run_bench(bench_args(srv.url, model, rate, args.num_prompts, i, result, args), env,
                                      result, min(args.run_timeout, clock.left()), log)
    finally:
        code = srv.stop()
        print(f"[vllm_serve] {dtype} / {label}: server stopped (exit status {code})", flush=True)
    ran = "chunkvale attention backend:" in srv.log_tail(None)
    if ran != (flag == "1"):  # the rows would be mislabelled: drop them
        print(f"[vllm_serve] {dtype} / {label}: the server {'ran' if ran else 'did not run'} chunkvale's attention "
              f"with CHUNKVALE_VLLM={flag} (log {srv.log_path}); its rows are dropped", flush=True)
        return {rate: None for rate in rates}
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def table(results: dict, rates: list[float]) -> str:
    lines = ["| dtype | request rate (req/s) | backend | completed | req/s | output tok/s | TTFT p50 (ms) | "
             "TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | chunkvale / vLLM: tok/s, TTFT p50, TPOT p50 |",
             "|---" * 11 + "|"]
    for dtype, by_backend in results.items():
        for rate in rates:
            base = by_backend["vllm"][rate]
            for label, _ in BACKENDS:
                m = by_backend[label][rate]
                if m is None:
                    lines.append(f"| {dtype} | {rate:g} | {label} | - | - | - | - | - | - | - | |")
                    continue
                ratio = ""
                if label == "chunkvale" and base:
                    ratio = (f"{m['output_throughput'] / base['output_throughput']:.2f}x, "
                             f"{m['median_ttft_ms'] / base['median_ttft_ms']:.2f}x, "
                             f"{m['median_tpot_ms'] / base['median_tpot_ms']:.2f}x")
                lines.append(f"| {dtype} | {rate:g} | {label} | {m['completed']} | {m['request_throughput']:.2f} | "
                             f"{m['output_throughput']:.1f} | {_ms(m['median_ttft_ms'])} | {_ms(m['p99_ttft_ms'])} | "
                             f"{_ms(m['median_tpot_ms'])} | {_ms(m['p99_tpot_ms'])} | {ratio} |")
    return "\n".join(lines)


def parse_rates(ap, value: str) -> list[float]:
    try:
        rates = [float(r) for r in value.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or any(not r > 0 for r in rates):
        ap.error(f"--rates: expected comma-separated request rates > 0 (inf: all at once), got {value!r}")
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rates", default="0.25,0.5,1,inf", help="request rates, req/s; inf sends all at once")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=128)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile: starts in seconds)")
    ap.add_argument("--max-seconds", type=float, default=5400, help="bound on the whole sweep")
    ap.add_argument("--run-timeout", type=float, default=1200, help="bound on one `vllm bench serve` run")
    ap.add_argument("--logs", default=None, help="keep the server and bench logs in this folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: expected a comma-separated subset of {', '.join(DTYPES)}, got {args.dtypes!r}")
    rates = parse_rates(ap, args.rates)
    if args.num_prompts < args.num_prefixes or args.num_prefixes < 1:
        ap.error(f"--num-prompts: expected >= --num-prefixes ({args.num_prefixes}) >= 1, got {args.num_prompts}")
    if args.prefix_len + args.suffix_len + args.output_len > args.max_model_len:
        ap.error(f"--max-model-len: expected >= prefix + suffix + output tokens "
                 f"({args.prefix_len + args.suffix_len + args.output_len}), got {args.max_model_len}")

    sys.path.insert(0, str(HERE))
    from machine import cpu_flags, describe

    import vllm

    import chunkvale
    from chunkvale.models import embedded_model_dir

    model = str(embedded_model_dir())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    clock = Clock(args.max_seconds)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vllm-serve-") as tmp:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for dtype in dtypes:
            for label, flag in BACKENDS:
                results.setdefault(dtype, {})[label] = serve_and_sweep(label, flag, dtype, model, rates, args, env,
                                                                       clock, logs)
    print(f"\n{describe(os.cpu_count() or 1)}; CPU flags {cpu_flags()}; chunkvale {chunkvale.__version__}; "
          f"vllm-cpu {vllm.__version__}; `vllm serve` SmolLM2-135M, prefix caching, "
          f"{'eager' if args.eager else 'compiled'}; `vllm bench serve` prefix_repetition: {args.num_prompts} "
          f"requests, {args.num_prefixes} prefixes of {args.prefix_len} tokens + {args.suffix_len} own, "
          f"{args.output_len} new tokens each\n")
    print(table(results, rates))
    if args.json:
        Path(args.json).write_text(json.dumps({d: {b: {str(r): m for r, m in by.items()} for b, by in v.items()}
                                               for d, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
