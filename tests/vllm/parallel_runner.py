"""Runs vllm.LLM under tensor or pipeline parallelism 2 in this process and writes what it generated
and each rank's chunkvale state as JSON: argv = [out.json, "tp" | "pp" | "tp_budget", model_dir] (tp_budget: TP 2 with budgeted attention, per-KV-head
selection). The environment
decides the attention backend (CHUNKVALE_VLLM) and the CPUs of each rank
(VLLM_CPU_OMP_THREADS_BIND="0|1")."""
import json
import sys

from offline_runner import prompts

# Pipeline parallelism does not run eager in vLLM 0.32's CPU build (with enforce_eager its model
# runner never warms up, so the last stage has no intermediate-tensor buffer: an AssertionError
# in sync_and_gather_intermediate_tensors, with vLLM's own attention too). One Dynamo trace with
# the eager backend warms it up without compiling anything.
SHARE_THRESHOLD = 3  # not the default: every rank must read the engine's options
SIZES = {"tp": {"tensor_parallel_size": 2, "enforce_eager": True},
         "tp_budget": {"tensor_parallel_size": 2, "enforce_eager": True},
         "pp": {"pipeline_parallel_size": 2, "enforce_eager": False,
                "compilation_config": {"mode": 2, "backend": "eager"}}}  # 2: CompilationMode.DYNAMO_TRACE_ONCE

# 32-token blocks: rows past 128 tokens attend to 1 sink + 2 window + 1 top-k block per KV head.
OPTIONS = {"tp_budget": {"eviction": {"budget_tokens": 128, "sink_chunks": 1, "window_chunks": 2, "topk_chunks": 1,
                                      "dense_layers": 0, "selection": "per_kv_head"}}}


def main():
    out_path, mode, model = sys.argv[1], sys.argv[2], sys.argv[3]
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enable_prefix_caching=True, max_model_len=512, block_size=32,
              max_num_seqs=16, seed=0, worker_extension_cls="chunkvale.vllm_stats.WorkerStats",
              additional_config={"chunkvale": dict(share_threshold=SHARE_THRESHOLD, **OPTIONS.get(mode, {}))},
              **SIZES[mode])
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first = llm.generate(prompts(), greedy, use_tqdm=False)
    again = llm.generate(prompts(), greedy, use_tqdm=False)  # from vLLM's prefix cache
    forks = llm.generate(prompts()[2:3], SamplingParams(temperature=0.8, seed=1234, max_tokens=16, n=3,
                                                        ignore_eos=True), use_tqdm=False)
    json.dump({"first": [list(o.outputs[0].token_ids) for o in first],
               "again": [list(o.outputs[0].token_ids) for o in again],
               "forks": [list(c.token_ids) for c in forks[0].outputs],
               "ranks": llm.collective_rpc("chunkvale_stats")}, open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine core and workers with spawn: keep the module importable
    main()
