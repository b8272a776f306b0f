"""Budgeted attention inside vLLM (``--additional-config`` chunkvale.eviction): the plugin keeps
block digests beside vLLM's KV cache and lets decode rows over budget attend to their sinks,
window and top-k blocks, the policy chunkvale's own Engine runs. Both on the same prompts give
the same greedy tokens (the short prompt under budget attends densely in both)."""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(tmp_path, which):
    out = tmp_path / f"budget-{which}.json"
    env = dict(os.environ, CHUNKVALE_VLLM="1")
    env.pop("CHUNKVALE_VLLM_EVICTION", None)
    proc = subprocess.run([sys.executable, str(HERE / "budget_runner.py"), str(out), which], env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{which} failed:\n{log[-6000:]}"
    return json.loads(out.read_text()), log


def test_budgeted_vllm_matches_chunkvale_engine(tmp_path):
    ours, log = run(tmp_path, "vllm")
    engine, _ = run(tmp_path, "engine")
    assert "chunkvale budgeted attention: decode rows over 256 tokens" in log
    (rank,) = ours["ranks"]
    budgeted = [r for r in rank["runners"] if r["budgeted"]]
    assert budgeted, f"no budgeted runner: {rank['runners']}"
    assert all(r["selection_counts"]["dropped_blocks"] > 0 for r in budgeted), "no decode row dropped a block"
    assert all(r["selection_counts"]["scored_blocks"] >= r["selection_counts"]["dropped_blocks"] for r in budgeted)
    assert ours["prompt_lens"][0] > 600 and ours["prompt_lens"][2] < 32
    assert ours["tokens"] == engine["tokens"], "vLLM's budgeted tokens differ from chunkvale's Engine"


def test_options_are_checked_by_name(monkeypatch):
    import pytest

    from chunkvale.vllm_options import options

    class Cfg:
        additional_config = {"chunkvale": {"eviction": {"budget_tokens": 512, "device_chunks": 64}}}

    with pytest.raises(ValueError, match=r"\['eviction'\]\.device_chunks: expected None \(vLLM owns residency"):
        options(Cfg())
    Cfg.additional_config = {"chunkvale": {"evictions": {}}}
    with pytest.raises(ValueError, match="expected keys among share_threshold, eviction, got evictions"):
        options(Cfg())
    Cfg.additional_config = {"chunkvale": {"eviction": {"budget_tokens": 512, "topk": 3}}}
    with pytest.raises(ValueError, match="expected chunkvale.Eviction fields .*got topk"):
        options(Cfg())
    monkeypatch.setenv("CHUNKVALE_VLLM_EVICTION", "{budget")
    with pytest.raises(ValueError, match="CHUNKVALE_VLLM_EVICTION: expected a JSON object"):
        options(None)
    monkeypatch.setenv("CHUNKVALE_VLLM_EVICTION", '{"budget_tokens": 512}')
    Cfg.additional_config = {"chunkvale": {"eviction": {"budget_tokens": 1024}}}
    with pytest.raises(ValueError, match="given both in additional_config"):
        options(Cfg())
    assert options(None).eviction.budget_tokens == 512
    monkeypatch.setenv("CHUNKVALE_VLLM_SHARE_THRESHOLD", "x")
    with pytest.raises(ValueError, match="CHUNKVALE_VLLM_SHARE_THRESHOLD: expected an integer"):
        options(None)
