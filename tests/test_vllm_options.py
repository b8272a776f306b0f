"""chunkvale.vllm_options without vLLM (the module imports only chunkvale): every option is checked
when it is read, by the rules PagedAttention applies, and each error names the environment
variable or the additional_config key the value came from. tests/vllm runs the plugin itself."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import chunkvale
from chunkvale.vllm_options import options

CFG = "additional_config\\['chunkvale'\\]"
ENV_EV, ENV_T = "CHUNKVALE_VLLM_EVICTION", "CHUNKVALE_VLLM_SHARE_THRESHOLD"


def vllm_config(chunkvale_options=None, block_size=16):
    return SimpleNamespace(additional_config={"chunkvale": chunkvale_options} if chunkvale_options is not None else {},
                           cache_config=SimpleNamespace(block_size=block_size))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_EV, raising=False)
    monkeypatch.delenv(ENV_T, raising=False)


EV = {"budget_tokens": 512}


@pytest.mark.parametrize("env, config, block_size, exc, match", [
    # share_threshold: an int in [1, 2^31-1] (PagedAttention's range)
    ({ENV_T: "2147483648"}, None, 16, ValueError, f"^{ENV_T}: expected an integer in \\[1, 2\\^31-1\\], got 2147483648"),
    ({ENV_T: "0"}, None, 16, ValueError, f"^{ENV_T}: expected an integer in \\[1, 2\\^31-1\\], got 0"),
    ({ENV_T: "2.0"}, None, 16, ValueError, f"^{ENV_T}: expected an integer in \\[1, 2\\^31-1\\], got '2.0'"),
    ({}, {"share_threshold": 2**31}, 16, ValueError, f"^{CFG}\\['share_threshold'\\]: expected an integer in"),
    ({}, {"share_threshold": 0}, 16, ValueError, f"^{CFG}\\['share_threshold'\\]: expected an integer in"),
    ({}, {"share_threshold": 2.0}, 16, TypeError, f"^{CFG}\\['share_threshold'\\]: expected an int, got float"),
    ({}, {"share_threshold": True}, 16, TypeError, f"^{CFG}\\['share_threshold'\\]: expected an int, got bool"),
    ({}, {"share_threshold": "2"}, 16, TypeError, f"^{CFG}\\['share_threshold'\\]: expected an int, got str"),
    ({}, {"share_threshold": None}, 16, TypeError, f"^{CFG}\\['share_threshold'\\]: expected an int, got None"),
    # eviction: every field, with the budget against vLLM's block size
    ({}, {"eviction": {"budget_tokens": 8}}, 16, ValueError,
     f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected at least .* = 64, got 8 \\(vLLM's block_size=16"),
    ({}, {"eviction": {"budget_tokens": 256}}, 128, ValueError,
     f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected at least .* = 512, got 256 \\(vLLM's block_size=128"),
    ({ENV_EV: {"budget_tokens": 8}}, None, None, ValueError, f"^{ENV_EV}\\.budget_tokens: expected at least .* = 64, got 8$"),
    ({ENV_EV: {**EV, "sink_chunks": 2**31 - 1}}, None, 16, ValueError, f"^{ENV_EV}\\.budget_tokens: expected at least"),
    ({ENV_EV: {**EV, "sink_chunks": 2**31}}, None, 16, ValueError, f"^{ENV_EV}\\.sink_chunks: expected an integer in"),
    ({ENV_EV: {**EV, "window_chunks": 0}}, None, 16, ValueError, f"^{ENV_EV}\\.window_chunks"),
    ({ENV_EV: {**EV, "digest": "cube"}}, None, 16, ValueError, f"^{ENV_EV}\\.digest"),
    ({ENV_EV: {**EV, "digest": 3}}, None, 16, TypeError, f"^{ENV_EV}\\.digest"),
    ({}, {"eviction": {"budget_tokens": 512.0}}, 16, TypeError, f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected an int"),
    ({}, {"eviction": {"budget_tokens": True}}, 16, TypeError, f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected an int"),
    ({}, {"eviction": {"budget_tokens": "512"}}, 16, TypeError, f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected an int"),
    ({}, {"eviction": {"budget_tokens": None}}, 16, TypeError, f"^{CFG}\\['eviction'\\]\\.budget_tokens: expected an int"),
    ({ENV_EV: {**EV, "sink_chunks": None}}, None, 16, TypeError, f"^{ENV_EV}\\.sink_chunks: expected an int"),
    ({ENV_EV: {**EV, "dense_layers": 2.0}}, None, 16, TypeError, f"^{ENV_EV}\\.dense_layers: expected an int"),
    ({ENV_EV: {**EV, "topk_chunks": "8"}}, None, 16, TypeError, f"^{ENV_EV}\\.topk_chunks: expected an int or None"),
    ({ENV_EV: {**EV, "device_chunks": 64}}, None, 16, ValueError, f"^{ENV_EV}\\.device_chunks: expected None"),
])
def test_bad_options_are_refused_when_read_naming_their_source(monkeypatch, env, config, block_size, exc, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(exc, match=match):
        options(vllm_config(config, block_size) if config is not None or block_size is not None else None)


def test_good_options_are_what_paged_attention_takes(monkeypatch):
    assert options(None) == options(vllm_config()) and options(None).share_threshold == 2
    monkeypatch.setenv(ENV_EV, json.dumps({"budget_tokens": 512, "topk_chunks": None, "device_chunks": None}))
    monkeypatch.setenv(ENV_T, "2147483647")
    got = options(vllm_config(block_size=128))
    assert got.share_threshold == 2**31 - 1 and got.eviction == chunkvale.Eviction(budget_tokens=512)
    chunkvale.PagedAttention(4, 2, 64, 128, share_threshold=got.share_threshold, eviction=got.eviction)
    monkeypatch.delenv(ENV_EV)
    got = options(vllm_config({"eviction": {"budget_tokens": 64, "sink_chunks": 0, "window_chunks": 1,
                                            "topk_chunks": 0}}, block_size=64))
    chunkvale.PagedAttention(4, 2, 64, 64, share_threshold=got.share_threshold, eviction=got.eviction)


def test_the_check_is_paged_attentions_own(cv):
    """check_paged_options and PagedAttention refuse the same values with the same message."""
    for kwargs in ({"share_threshold": 2**31}, {"share_threshold": 0}, {"share_threshold": 1.0},
                   {"eviction": cv.Eviction(budget_tokens=32)}, {"eviction": cv.Eviction(budget_tokens=512, window_chunks=0)}):
        args = {"share_threshold": 2, "eviction": None} | kwargs
        with pytest.raises((TypeError, ValueError)) as direct:
            cv.PagedAttention(4, 2, 64, 16, **args)
        with pytest.raises(direct.type) as checked:
            cv._native.check_paged_options(args["share_threshold"], args["eviction"], 16)
        assert str(checked.value) == str(direct.value)
