"""Runs vllm.LLM on the embedded SmolLM2 in this process and writes what it generated as JSON:
argv = [out.json, block_size]. The environment decides the attention backend (CHUNKVALE_VLLM)."""
import json
import sys


def prompts():
    system = ("You are a careful assistant for a small bakery. You answer questions about bread, "
              "opening hours and prices, briefly and politely. " * 6)
    shots = ("Q: Do you sell rye bread? A: Yes, every day but Sunday.\n"
             "Q: When do you open? A: At seven in the morning.\n" * 3)
    qs = ["How much is a baguette?", "Are you open on Monday?", "Do you bake croissants?",
          "Can I order a cake?", "Is there gluten-free bread?"]
    out = [system + q for q in qs[:2]]            # the system prompt under everyone
    out += [system + shots + q for q in qs[2:]]    # system + few-shot under three
    out += [qs[0]]                                 # one that shares nothing
    return out


def main():
    out_path, block_size = sys.argv[1], int(sys.argv[2])
    from vllm import LLM, SamplingParams

    from chunkvale.models import embedded_model_dir

    llm = LLM(model=str(embedded_model_dir()), dtype="float32", enable_prefix_caching=True, max_model_len=2048,
              block_size=block_size, max_num_seqs=16, seed=0, enforce_eager=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    first = llm.generate(prompts(), greedy, use_tqdm=False)
    # Again, now that vLLM's prefix cache holds the prompts: decode-time sharing and cache hits.
    again = llm.generate(prompts(), greedy, use_tqdm=False)
    # n > 1 forks a request (vLLM: sampled only); seeded, so both backends draw the same.
    forks = llm.generate(prompts()[2:3], SamplingParams(temperature=0.8, seed=1234, max_tokens=32, n=3),
                         use_tqdm=False)
    json.dump({"first": [list(o.outputs[0].token_ids) for o in first],
               "again": [list(o.outputs[0].token_ids) for o in again],
               "forks": [list(c.token_ids) for c in forks[0].outputs],
               "text": [o.outputs[0].text for o in first]}, open(out_path, "w"))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the module importable
    main()
