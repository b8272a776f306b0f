"""The plugin's entry point and refusals, in vLLM's environment without starting an engine."""
import pytest
import torch


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("chunkvale") == "chunkvale.vllm_plugin:register"


def test_register_overrides_cpu_attention(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from chunkvale import vllm_plugin

    monkeypatch.setenv("CHUNKVALE_VLLM", "1")
    vllm_plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_plugin.BACKEND_PATH
    from chunkvale.vllm_backend import ChunkvaleAttentionBackend

    assert ChunkvaleAttentionBackend.forward_includes_kv_cache_update is False
    assert ChunkvaleAttentionBackend.get_name() == "CPU_ATTN"


def test_bad_switch_is_named(monkeypatch):
    from chunkvale import vllm_plugin

    monkeypatch.setenv("CHUNKVALE_VLLM", "maybe")
    with pytest.raises(ValueError, match="CHUNKVALE_VLLM: expected 0 or 1, got 'maybe'"):
        vllm_plugin.register()


def test_unsupported_vllm_version_is_refused(monkeypatch):
    import vllm

    from chunkvale import vllm_plugin

    monkeypatch.setenv("CHUNKVALE_VLLM", "1")
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="supports vllm 0.32.x, found 0.99.0"):
        vllm_plugin.register()


BASE = dict(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None, sliding_window=None,
            kv_cache_dtype="auto")


@pytest.mark.parametrize("change, what", [
    (dict(sliding_window=4096), "a sliding window"),
    (dict(alibi_slopes=[0.5] * 9), "ALiBi"),
    (dict(logits_soft_cap=30.0), "logit soft-capping"),
    (dict(sinks=torch.zeros(9)), "attention sinks"),
    (dict(attn_type="encoder_only"), "attention type"),
    (dict(attn_type="encoder_decoder"), "attention type"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8'"),
    (dict(head_size=72), "head_size=72"),
])
def test_unsupported_features_are_refused(change, what):
    from chunkvale.vllm_backend import ChunkvaleAttentionImpl

    args = dict(BASE)
    args.update(change)
    with pytest.raises(NotImplementedError, match=f"does not support {what}"):
        ChunkvaleAttentionImpl(**args)


@pytest.mark.parametrize("parallel, eviction, what", [
    (dict(decode_context_parallel_size=2), None, r"decode context parallelism \(decode_context_parallel_size=2"),
    (dict(prefill_context_parallel_size=2), None, r"prefill context parallelism \(prefill_context_parallel_size=2"),
    (dict(tensor_parallel_size=2), {"budget_tokens": 512, "selection": "shared"},
     r"budgeted attention with selection='shared' under tensor parallelism \(tensor_parallel_size=2"),
])
def test_unsupported_parallel_modes_are_refused(parallel, eviction, what):
    from types import SimpleNamespace

    import chunkvale
    from chunkvale.vllm_backend import _check_parallel
    from chunkvale.vllm_options import Options

    opts = Options(eviction=chunkvale.Eviction(**eviction) if eviction else None)
    with pytest.raises(NotImplementedError, match=f"does not support {what}"):
        _check_parallel(SimpleNamespace(**parallel), opts)


def test_supported_parallel_modes_pass():
    """TP, PP and DP 2 as such; budgeted attention under all three with per-KV-head selection (the
    default), and with shared selection without TP (each rank holds whole layers and heads)."""
    from types import SimpleNamespace

    import chunkvale
    from chunkvale.vllm_backend import _check_parallel
    from chunkvale.vllm_options import Options

    modes = SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2,
                            decode_context_parallel_size=1, prefill_context_parallel_size=1)
    _check_parallel(modes, Options())
    _check_parallel(modes, Options(eviction=chunkvale.Eviction(budget_tokens=512)))  # per_kv_head: any slice
    _check_parallel(modes, Options(eviction=chunkvale.Eviction(budget_tokens=512, selection="per_kv_head")))
    modes.tensor_parallel_size = 1
    _check_parallel(modes, Options(eviction=chunkvale.Eviction(budget_tokens=512, selection="shared")))
