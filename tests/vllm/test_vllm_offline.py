"""vllm.LLM with chunkvale's attention backend against vLLM's own CPU backend, each engine in its own
process: identical greedy outputs on prompts sharing prefixes at several depths, with prefix
caching on, and shared blocks really planned chunk-first inside vLLM (the backend's log)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_engine(tmp_path, chunkvale_on: bool, block_size: int):
    out = tmp_path / f"out-{int(chunkvale_on)}-{block_size}.json"
    env = dict(os.environ, CHUNKVALE_VLLM="1" if chunkvale_on else "0")
    proc = subprocess.run([sys.executable, str(HERE / "offline_runner.py"), str(out), str(block_size)], env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"engine failed (CHUNKVALE_VLLM={int(chunkvale_on)}):\n{log[-6000:]}"
    return json.loads(out.read_text()), log


@pytest.mark.parametrize("block_size", [32, 128])
def test_greedy_outputs_identical_to_vllm_cpu_backend(tmp_path, block_size):
    ours, our_log = run_engine(tmp_path, True, block_size)
    theirs, their_log = run_engine(tmp_path, False, block_size)
    assert "chunkvale attention backend:" in our_log, "the plugin did not take over CPU attention"
    assert "chunkvale attention backend:" not in their_log, "CHUNKVALE_VLLM=0 still ran chunkvale"
    assert "chunkvale: first step with shared blocks" in our_log, "no step shared a block chunk-first"
    if (os.cpu_count() or 1) > 1:  # vLLM pins its threads; chunkvale's workers must not all share one CPU
        assert "(workers on CPUs [" in our_log, "chunkvale's attention workers were not spread over vLLM's CPUs"
    for key in ("first", "again", "forks"):
        assert ours[key] == theirs[key], f"{key}: chunkvale's tokens differ from vLLM's own backend"
    assert all(len(t) > 0 for t in ours["first"])
    assert len(ours["forks"]) == 3
    assert ours["first"] == ours["again"]  # served from vLLM's prefix cache, same tokens
