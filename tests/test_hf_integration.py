"""transformers models running their attention through chunkvale (tiny random-weight configs).

The contract: greedy generation is token-identical to transformers' own generate (fp32), for
Llama, Qwen2 and Mistral with GQA, through prefill, chunked prefill, prefix hits and decode.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chunkvale  # noqa: E402
from chunkvale import hf  # noqa: E402
from chunkvale.engine import Engine, Request  # noqa: E402

VOCAB = 256


def tiny_model(arch: str, **overrides):
    """2 layers, hidden 64, 4 query / 2 KV heads of dim 64 (GQA). initializer_range 0.2 makes
    the random logits spread out, so greedy outputs vary and a wrong attention shows."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    common.update(overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[arch])
    return cls[1](cls[0](**common)).eval()


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prompts_with_shared_prefix(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, VOCAB, (53,), generator=g).tolist()  # 3 full chunks of 16 + a partial one
    return [
        shared + torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in (4, 9, 17)
    ] + [shared[:40], torch.randint(0, VOCAB, (23,), generator=g).tolist()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_is_token_identical_to_transformers(arch):
    model = tiny_model(arch)
    prompts = prompts_with_shared_prefix()
    # Small step budget: long prompts are prefilled over several steps next to decoding ones.
    engine = Engine(model, chunk_size=16, capacity_tokens=2048, max_step_tokens=24)
    results = engine.generate([Request(token_ids=p, max_new_tokens=20) for p in prompts], progress=False)
    for prompt, res in zip(prompts, results):
        assert res.samples[0].token_ids == hf_greedy(model, prompt, 20)
        assert res.samples[0].finish_reason == "length"
    # The prefix path was really exercised: the requests after the first reused its chunks.
    assert [r.metrics.prefix_tokens_reused >= 32 for r in results[1:4]] == [True] * 3
    # Outside a step the model runs its own attention again.
    assert model.config._attn_implementation != hf.ATTN_IMPLEMENTATION


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_logits_match_dense_forward(arch):
    model = tiny_model(arch)
    prompt = prompts_with_shared_prefix(5)[2]
    cache = chunkvale.KVCache(hf.cache_config(model, chunk_size=16, capacity_chunks=64))
    runner = hf.ModelRunner(model, cache)
    seq, _ = cache.add_sequence(prompt)
    step = cache.plan([(seq, len(prompt))])
    rows = list(range(len(prompt)))
    got = runner.forward(step, prompt, rows)
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # A decode step over the cached prompt matches the dense forward of prompt + token.
    step = cache.plan([(seq, [7])])
    got = runner.forward(step, [7], [0])
    with torch.inference_mode():
        want = model(torch.tensor([prompt + [7]])).logits[0, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cache_config_follows_the_model():
    model = tiny_model("qwen2")
    cfg = hf.cache_config(model, chunk_size=32, capacity_chunks=8)
    assert (cfg.layers, cfg.q_heads, cfg.kv_heads, cfg.head_dim) == (2, 4, 2, 64)
    assert cfg.dtype == "float32"
    assert cfg.sm_scale == pytest.approx(64 ** -0.5)
    with pytest.raises(ValueError, match="capacity"):
        hf.cache_config(model)


def test_attention_outside_a_runner_step_is_a_clear_error():
    model = tiny_model("llama")
    hf.register()
    model.config._attn_implementation = hf.ATTN_IMPLEMENTATION
    with pytest.raises(RuntimeError, match="ModelRunner"):
        model(torch.tensor([[1, 2, 3]]))


def test_unsupported_models_are_rejected():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=32))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        hf.check_model(gpt2)
    with pytest.raises(TypeError, match="model"):
        hf.check_model(object())


def test_forward_validates_inputs():
    model = tiny_model("llama")
    cache = chunkvale.KVCache(hf.cache_config(model, chunk_size=16, capacity_chunks=8))
    runner = hf.ModelRunner(model, cache)
    seq, _ = cache.add_sequence([1, 2, 3])
    step = cache.plan([(seq, 3)])
    with pytest.raises(ValueError, match="input_ids: expected 3"):
        runner.forward(step, [1, 2], [1])
    with pytest.raises(ValueError, match="logit_rows"):
        runner.forward(step, [1, 2, 3], [3])


def test_sliding_window_beyond_reach_is_refused():
    # chunkvale attends to the whole context: exact for a windowed model only below its window.
    model = tiny_model("mistral", sliding_window=24)
    engine = Engine(model, chunk_size=16, capacity_tokens=512)
    with pytest.raises(ValueError, match="usable context is 24"):
        engine.submit(Request(token_ids=list(range(30)), max_new_tokens=2))
    res = engine.generate([Request(token_ids=list(range(10)), max_new_tokens=50)], progress=False)[0]
    # Generation stops at the window instead of silently diverging from the model.
    assert res.samples[0].finish_reason == "length"
    assert len(res.samples[0].token_ids) == 24 - 10 + 1
    assert res.samples[0].token_ids == hf_greedy(model, list(range(10)), 15)
    cache = chunkvale.KVCache(hf.cache_config(model, chunk_size=16, capacity_chunks=8))
    seq, _ = cache.add_sequence(list(range(30)))
    step = cache.plan([(seq, 30)])
    with pytest.raises(ValueError, match="sliding_window=24"):
        hf.ModelRunner(model, cache).forward(step, list(range(30)), [29])
