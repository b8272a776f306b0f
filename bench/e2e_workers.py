"""One timed batch of bench/vllm_e2e.py, each in its own process: ``vllm_worker`` (offline
vllm.LLM; the environment's CHUNKVALE_VLLM picks vLLM's own CPU attention or chunkvale's plugin)
and ``engine_worker`` (chunkvale's own Engine on the transformers model). Engine start and one
warm-up request are untimed; the prefix cache starts empty (or holds ``warm_prefix``)."""

from __future__ import annotations

import json
import os
import time

TOP_LOGPROBS = 5


def _outputs(outs) -> list[list[int]]:
    """Every sample's tokens, request by request."""
    return [list(c.token_ids) for o in outs for c in o.outputs]


def vllm_worker(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch

    amx = bool(getattr(torch.cpu, "_init_amx", lambda: False)())  # AMX tile state, before any kernel
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ps = spec["prompts"]
    t0 = time.perf_counter()
    # The worker extension lets this process read each rank's plan counts (chunkvale.vllm_stats);
    # with vLLM's own backend they stay empty.
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enable_prefix_caching=True, max_model_len=4096,
              max_num_seqs=min(spec["samples"], 256), seed=0, enforce_eager=spec["mode"] == "eager",
              worker_extension_cls="chunkvale.vllm_stats.WorkerStats")
    start_s = time.perf_counter() - t0
    sps = [SamplingParams(**s) for s in spec["sampling"]]
    llm.generate([TokensPrompt(prompt_token_ids=ps[0][-16:])], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    if spec.get("warm_prefix"):  # the shared prefix served once before (untimed)
        llm.generate([TokensPrompt(prompt_token_ids=ps[0][: spec["warm_prefix"]])],
                     SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    llm.collective_rpc("chunkvale_reset_counts")
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sps, use_tqdm=False)
    wall = time.perf_counter() - t0
    counts = llm.collective_rpc("chunkvale_stats")[0]["counts"]
    toks = _outputs(outs)
    logprobs = logprob_tokens = None
    if spec.get("logprobs"):  # untimed: the same batch again, with each step's top log-probabilities
        llm.reset_prefix_cache()
        again = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                             [SamplingParams(logprobs=TOP_LOGPROBS, **s) for s in spec["sampling"]], use_tqdm=False)
        logprobs = [[{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
                    for o in again for c in o.outputs]
        logprob_tokens = _outputs(again)
        if logprob_tokens != toks:  # bf16 batches need not repeat themselves exactly
            print(f"[vllm_e2e] note: the logprobs pass gave other tokens than the timed pass in "
                  f"{sum(a != b for a, b in zip(logprob_tokens, toks))} of {len(toks)} requests", flush=True)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    import chunkvale

    cfg = llm.llm_engine.vllm_config
    attn = (f"chunkvale {chunkvale.kernel_isa()}" if os.environ.get("CHUNKVALE_VLLM", "1") != "0" else
            f"vLLM {_get_attn_isa(getattr(torch, spec['dtype']), cfg.cache_config.block_size, cfg.model_config.get_head_size(), 'auto')}")
    json.dump({"wall_s": wall, "start_s": start_s, "generated_tokens": sum(map(len, toks)), "requests": len(ps),
               "prompt_tokens": sum(map(len, ps)), "outputs": toks, "logprobs": logprobs,
               "logprob_tokens": logprob_tokens, "vllm": vllm.__version__,
               "amx": amx, "attention": attn, "counts": counts,
               "block_size": cfg.cache_config.block_size}, open(out_path, "w"))


def engine_worker(spec_path: str, out_path: str) -> None:
    """chunkvale's Engine on the same prompts and sampling (its own sampler: sampled outputs are
    not comparable with vLLM's draw for draw)."""
    spec = json.load(open(spec_path))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see chunkvale.engine.Engine
    import chunkvale
    from chunkvale.engine import Engine, Request
    from chunkvale.models import load_model

    ps = spec["prompts"]
    t0 = time.perf_counter()
    lm = load_model(spec["model"], dtype=spec["dtype"])
    # Sampled requests get a seed each (the Engine draws per request).
    reqs = [Request(token_ids=p, max_new_tokens=s["max_tokens"], temperature=s.get("temperature", 0.0),
                    seed=i if s.get("temperature") else None, n=s.get("n", 1), ignore_eos=s.get("ignore_eos", False))
            for i, (p, s) in enumerate(zip(ps, spec["sampling"]))]
    # Room for every sample's own tokens plus every prompt once (shared prefixes are held once).
    capacity = sum(map(len, ps)) + sum(r.n * (r.max_new_tokens + 2 * 64) for r in reqs)
    engine = Engine(lm.model, lm.tokenizer, chunk_size=64, capacity_tokens=capacity,
                    max_batch_size=min(spec["samples"], 256))
    start_s = time.perf_counter() - t0
    engine.generate([Request(token_ids=ps[0][-16:], max_new_tokens=4)], progress=False)  # warm-up
    engine.cache.clear()
    if spec.get("warm_prefix"):
        engine.generate([Request(token_ids=ps[0][: spec["warm_prefix"]], max_new_tokens=1)], progress=False)
    engine.reset_metrics()
    t0 = time.perf_counter()
    results = engine.generate(reqs, progress=False)
    wall = time.perf_counter() - t0
    toks = [s.token_ids for r in results for s in r.samples]
    json.dump({"wall_s": wall, "start_s": start_s, "generated_tokens": sum(map(len, toks)), "requests": len(ps),
               "prompt_tokens": sum(map(len, ps)), "outputs": toks, "logprobs": None,
               "attention": f"chunkvale Engine {chunkvale.kernel_isa()}", "counts": None,
               "kv_sharing_ratio": engine.metrics().kv_sharing_ratio}, open(out_path, "w"))
