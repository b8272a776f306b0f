"""chunkvale's backend under vLLM's tensor, pipeline and data parallelism, two ranks with one CPU each
(VLLM_CPU_OMP_THREADS_BIND="0|1"), against vLLM's own CPU backend under the same parallelism: the
same greedy tokens (fp32, prompts sharing prefixes at several depths, prefix caching on) and the
same seeded n=3 forks. Every rank is its own process: each must run chunkvale's attention (its
slice of the heads under TP, of the layers under PP) on its own CPU and plan shared blocks
chunk-first. (The modes refused at start-up are checked in test_vllm_plugin.py, without engines.)

The model is a small random-weights Llama (tiny_llama.py): SmolLM2's 9 / 3 heads do not split in
two. Each mode starts one engine (or server) per backend, the two side by side."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offline_runner import prompts
from parallel_runner import SHARE_THRESHOLD
from tiny_llama import HEADS, KV_HEADS, save_tiny_llama

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks on one CPU each need 2 CPUs")
NEW_TOKENS = 16


def rank_env(chunkvale_on: bool) -> dict:
    env = dict(os.environ, CHUNKVALE_VLLM="1" if chunkvale_on else "0", VLLM_CPU_OMP_THREADS_BIND="0|1",
               VLLM_CPU_KVCACHE_SPACE="1")
    for option in ("CHUNKVALE_VLLM_EVICTION", "CHUNKVALE_VLLM_SHARE_THRESHOLD"):  # the runner gives its own
        env.pop(option, None)
    return env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def run_offline_both(tmp_path, mode: str, model: str) -> tuple[dict, dict]:
    """chunkvale's and vLLM's backend under `mode`, side by side (two engines of two ranks each on
    the two CPUs: slower each, sooner both; batches, so outputs, are the same as one at a time)."""
    procs = {}
    for on in (True, False):
        out, log = tmp_path / f"{mode}-{int(on)}.json", tmp_path / f"{mode}-{int(on)}.log"
        with open(log, "w") as f:
            procs[on] = (out, log, subprocess.Popen([sys.executable, str(HERE / "parallel_runner.py"), str(out), mode,
                                                     model], env=rank_env(on), stdout=f, stderr=subprocess.STDOUT))
    results = {}
    for on, (out, log, proc) in procs.items():
        proc.wait(timeout=1200)
        assert proc.returncode == 0, f"{mode} failed (CHUNKVALE_VLLM={int(on)}):\n{log.read_text()[-6000:]}"
        results[on] = json.loads(out.read_text())
    return results[True], results[False]


def check_ranks(ranks: list, q_heads: int, kv_heads: int) -> None:
    """Each rank ran chunkvale on its own CPU, one thread, with the heads it holds and the engine's
    options, and planned shared blocks chunk-first."""
    assert len(ranks) == 2, ranks
    for i, r in enumerate(sorted(ranks, key=lambda r: r["rank"])):
        assert r["backend"], f"rank {i} did not run chunkvale's backend"
        assert r["share_threshold"] == SHARE_THRESHOLD, f"rank {i} missed additional_config: {r['share_threshold']}"
        assert r["affinity"] == [i], f"rank {i} runs on CPUs {r['affinity']}, expected [{i}]"
        shapes = {(x["q_heads"], x["kv_heads"], x["threads"], tuple(x["cpus"])) for x in r["runners"]}
        assert shapes == {(q_heads, kv_heads, 1, ())}, f"rank {i}: runners {r['runners']}"
        assert r["counts"]["chunk_first_blocks"] > 0, f"rank {i} planned no shared block chunk-first: {r['counts']}"
        assert r["counts"]["saved_block_reads"] > 0


@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_ranks_give_vllm_backends_tokens(tmp_path, tiny_model, mode):
    ours, theirs = run_offline_both(tmp_path, mode, tiny_model)
    assert not any(r["backend"] for r in theirs["ranks"]), "CHUNKVALE_VLLM=0 still ran chunkvale in a rank"
    split = 2 if mode == "tp" else 1
    check_ranks(ours["ranks"], HEADS // split, KV_HEADS // split)
    for key in ("first", "again", "forks"):
        assert ours[key] == theirs[key], f"{mode} {key}: chunkvale's tokens differ from vLLM's own backend"
    assert all(len(t) == NEW_TOKENS for t in ours["first"]) and len(ours["forks"]) == 3


def test_budgeted_attention_runs_under_tensor_parallelism(tmp_path, tiny_model):
    """Per-KV-head selection under TP 2: each rank keeps digests for its heads and drops blocks
    (that a head slice selects as the whole does is checked exactly in tests/test_paged_budget.py;
    vLLM's own backend has no budget to compare tokens with)."""
    out, log = tmp_path / "tp_budget.json", tmp_path / "tp_budget.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "parallel_runner.py"), str(out), "tp_budget", tiny_model],
                              env=rank_env(True), stdout=f, stderr=subprocess.STDOUT, timeout=1200)
    assert proc.returncode == 0, f"tp_budget failed:\n{log.read_text()[-6000:]}"
    res = json.loads(out.read_text())
    assert len(res["ranks"]) == 2
    for r in res["ranks"]:
        (runner,) = r["runners"]
        assert runner["budgeted"] and (runner["q_heads"], runner["kv_heads"]) == (HEADS // 2, KV_HEADS // 2), runner
        assert r["eviction"]["selection"] == "per_kv_head"
        assert runner["selection_counts"]["dropped_blocks"] > 0, f"rank {r['rank']} dropped no block: {runner}"
    assert all(len(t) == NEW_TOKENS for t in res["first"] + res["again"])


def complete(client, prompt: str, rank: int, **kw) -> list[list[int]]:
    """One completion request routed to one DP rank; the token ids of each choice."""
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS,
                                  extra_headers={"X-data-parallel-rank": str(rank)},
                                  extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    return [list(c.token_ids) for c in r.choices]


def dp_server(tmp_path, model: str, chunkvale_on: bool):
    from chunkvale.vllm_server import VllmServer

    args = [model, "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512", "--block-size",
            "32", "--enforce-eager", "--enable-prefix-caching", "--seed", "0", "--data-parallel-size", "2",
            "--api-server-count", "1"]
    return VllmServer(args, env=rank_env(chunkvale_on), log_path=tmp_path / f"dp-{int(chunkvale_on)}.log")


def requests_to_ranks(srv) -> dict:
    """Each prompt sent alone (a batch of one, so both backends see the same batches) to a fixed
    rank; a seeded n=3 fork per rank, whose samples share their prompt's blocks chunk-first."""
    from openai import OpenAI

    client = OpenAI(base_url=srv.base_url, api_key="unused")
    ps = prompts()
    return {"greedy": [complete(client, p, i % 2, temperature=0.0) for i, p in enumerate(ps)],
            "forks": [complete(client, ps[2], rank, temperature=0.8, seed=1234, n=3) for rank in (0, 1)]}


def pids_logging(log: str, text: str) -> set:
    """The processes ("(Worker pid=N)" prefixes) whose log lines contain text."""
    return {line.split("pid=", 1)[1].split(")", 1)[0] for line in log.splitlines() if text in line and "pid=" in line}


def test_data_parallel_ranks_give_vllm_backends_tokens(tmp_path, tiny_model):
    """`vllm serve --data-parallel-size 2` (vLLM refuses offline DP for dense models): each DP rank
    is an engine of its own, its worker a process of its own, which must run chunkvale."""
    servers = {on: dp_server(tmp_path, tiny_model, on).launch() for on in (True, False)}  # side by side
    try:
        out = {on: requests_to_ranks(srv.wait_ready()) for on, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
    log, their_log = (servers[on].log_path.read_text() for on in (True, False))
    assert "chunkvale attention backend:" not in their_log, "CHUNKVALE_VLLM=0 still ran chunkvale"
    assert len(pids_logging(log, "chunkvale attention backend:")) == 2, "not both DP ranks ran chunkvale"
    assert len(pids_logging(log, "chunkvale: first step with shared blocks")) == 2, \
        "not both DP ranks planned shared blocks chunk-first"
    assert out[True] == out[False], "chunkvale's tokens differ from vLLM's own backend under data parallelism"
    assert all(len(t[0]) == NEW_TOKENS for t in out[True]["greedy"])
