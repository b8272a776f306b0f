"""Budgeted attention inside vLLM and in chunkvale's own Engine, on the same prompts and the same
selection policy (blocks = chunks of 32 tokens): argv = [out.json, "vllm" | "engine"]. Writes the
greedy tokens (and, for vLLM, the plugin's per-rank state: chunkvale.vllm_stats)."""
import json
import sys

BLOCK = 32
EVICTION = {"budget_tokens": 256, "sink_chunks": 1, "window_chunks": 2, "topk_chunks": 3, "digest": "cuboid_max",
            "dense_layers": 2}
NEW_TOKENS = 24


def prompts(tokenizer):
    """Two long prompts sharing a system prompt (decode rows far over budget) and a short one
    (under budget: attends densely)."""
    from chunkvale import workload

    system, _ = workload.system_prompt(tokenizer, 700)
    ids = tokenizer(system, add_special_tokens=False)["input_ids"]
    return [ids + tokenizer(q, add_special_tokens=False)["input_ids"]
            for q in ("\nWhich tent is the cheapest?", "\nList three products that ship in 2 days.")] + \
           [tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]]


def run_vllm(model_dir):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ps = prompts(AutoTokenizer.from_pretrained(model_dir))
    llm = LLM(model=model_dir, dtype="float32", enable_prefix_caching=True, max_model_len=2048, block_size=BLOCK,
              max_num_seqs=8, seed=0, enforce_eager=True, additional_config={"chunkvale": {"eviction": EVICTION}},
              worker_extension_cls="chunkvale.vllm_stats.WorkerStats")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [len(p) for p in ps], llm.collective_rpc("chunkvale_stats")


def run_engine(model_dir):
    import chunkvale
    from chunkvale.engine import Engine, Request
    from chunkvale.models import load_model

    lm = load_model(model_dir)
    ps = prompts(lm.tokenizer)
    engine = Engine(lm.model, lm.tokenizer, chunk_size=BLOCK, capacity_tokens=8192, max_batch_size=8,
                    eviction=chunkvale.Eviction(**EVICTION))
    res = engine.generate([Request(token_ids=p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in ps],
                          progress=False)
    return [r.samples[0].token_ids for r in res], [len(p) for p in ps], None


def main():
    out_path, which = sys.argv[1], sys.argv[2]
    from chunkvale.models import embedded_model_dir

    model_dir = str(embedded_model_dir())
    tokens, lens, ranks = (run_vllm if which == "vllm" else run_engine)(model_dir)
    json.dump({"tokens": tokens, "prompt_lens": lens, "ranks": ranks}, open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the module importable
    main()
