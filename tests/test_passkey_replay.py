"""bench/passkey.py prefills each prompt once and decodes every configuration from the recorded
prefill K/V. That shortcut is only honest if it gives exactly the tokens the plain Engine gives
under each configuration; checked here on a tiny random-weight Llama (fp32, GQA)."""

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkvale import hf  # noqa: E402

VOCAB = 256
CHUNK = 16


def _load_passkey():
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:  # passkey.py imports its neighbour replay.py, as when run as a script
        sys.path.insert(0, str(bench))
    path = bench / "passkey.py"
    spec = importlib.util.spec_from_file_location("bench_passkey", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


passkey = _load_passkey()


def tiny_llama():
    """2 layers, 4 query / 2 KV heads of dim 64. initializer_range 0.2 spreads the random logits,
    so greedy outputs depend on what attention sees."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024, initializer_range=0.2, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    torch.manual_seed(7)
    return transformers.LlamaForCausalLM(cfg).eval()


def configs(model, longest):
    # dense_layers=1: the second of the two layers selects. Budget 64 of ~200-token prompts.
    # Every digest under the default selection (per_kv_head: 2 KV heads here) and under shared.
    out = []
    for selection in (None, "shared"):
        for name, ev in passkey.configurations([64], ["cuboid_max", "cuboid_mean", "sphere"], CHUNK, 1, selection):
            if selection and (ev is None or ev.topk_chunks == 0):
                continue  # the full cache and sink+window have no selection to vary
            cfg = hf.cache_config(model, chunk_size=CHUNK, capacity_chunks=longest // CHUNK + 4)
            cfg.eviction = ev
            out.append((f"{name}, {ev.resolved_selection()}" if ev and ev.topk_chunks != 0 else name, cfg))
    return out


def test_fed_prefill_decodes_like_the_engine_under_every_configuration():
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (150, 203, 231)]
    new = 24
    cfgs = configs(model, max(map(len, prompts)) + new)
    dropped = {name: 0 for name, _ in cfgs}
    with torch.inference_mode():
        for prompt in prompts:
            # max_step_tokens 64: the prompt is prefilled over several steps, as 8K prompts are in the bench.
            ref, steps = passkey.engine_run(model, None, cfgs[0][1], prompt, new, record=True, max_step_tokens=64)
            assert len(steps) == -(-len(prompt) // 64)
            assert [n for n, _, _ in steps][:-1] == [64] * (len(steps) - 1)
            assert all(len(ks) == len(vs) == 2 for _, ks, vs in steps)
            for name, cfg in cfgs:
                direct = ref if name == "full cache" else passkey.engine_run(model, None, cfg, prompt, new,
                                                                             max_step_tokens=64)
                fed, stats = passkey.decode_from_prefill(model, cfg, prompt, steps, ref[0], new)
                assert fed == direct, name
                assert len(fed) == new
                dropped[name] += int(stats.get("evict_dropped_chunks", 0))
    # Every budgeted configuration really dropped chunks; the full cache never does.
    assert dropped.pop("full cache") == 0
    assert all(d > 0 for d in dropped.values()), dropped


def test_fed_path_depends_on_the_recorded_kv():
    """The comparison above is sensitive: feeding altered V of one layer changes the decode."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, VOCAB, (120,), generator=g).tolist()
    cfg = configs(model, 160)[0][1]
    with torch.inference_mode():
        ref, steps = passkey.engine_run(model, None, cfg, prompt, 16, record=True, max_step_tokens=64)
        same, _ = passkey.decode_from_prefill(model, cfg, prompt, steps, ref[0], 16)
        altered = [(n, ks, [v if layer == 0 else v.roll(1, dims=0) for layer, v in enumerate(vs)])
                   for n, ks, vs in steps]
        other, _ = passkey.decode_from_prefill(model, cfg, prompt, altered, ref[0], 16)
    assert same == ref
    assert other != ref


def test_recorder_keeps_only_prompt_rows():
    model = tiny_llama()
    prompt = list(range(40))
    cfg = configs(model, 80)[0][1]
    with torch.inference_mode():
        tokens, steps = passkey.engine_run(model, None, cfg, prompt, 10, record=True)
    assert len(tokens) == 10
    assert [n for n, _, _ in steps] == [40]
    k = steps[0][1][0]
    assert tuple(k.shape) == (40, 2, 64)
