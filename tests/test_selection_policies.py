"""bench/selection_policies.py: the explorer's policies are what they claim. The documented rule
against tests/reference.py's kept chunks; per-KV-head selection as the documented rule run on each
KV head alone; round robin against a loop; per-layer top-k keeps the total."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference import kept_chunks_reference  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


sp = _load("selection_policies")

CHUNK, KVH, G, D = 8, 2, 3, 16


def random_rows(seed, S=200, T=40):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(KVH, S, D, generator=g, dtype=torch.float64)
    q = torch.randn(KVH * G, T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(S - T, S)
    return q, K, pos


def kept_chunks(mask_row, pos, chunk):
    """Chunk indices a row's key mask [S] attends to (whole or, for the last, partial)."""
    attended = np.flatnonzero(mask_row[:pos + 1].numpy())
    return sorted(set((attended // chunk).tolist()))


@pytest.mark.parametrize("kind", ["cuboid_max", "cuboid_mean", "sphere"])
@pytest.mark.parametrize("budget", [64, 120, 250])
def test_documented_rule_matches_the_reference(kind, budget):
    q, K, pos = random_rows(1)
    policy = sp.Policy("doc", digest=kind, dense_layers=0)
    sink, window, topk = policy.split(budget, CHUNK)
    mask = sp.keep_mask(policy, 0, topk, q, K, pos, CHUNK, budget, 0.25)
    assert mask.shape == (1, len(pos), K.shape[1])
    for t, p in enumerate(pos.tolist()):
        ref = kept_chunks_reference(K[:, :p + 1].permute(1, 0, 2).numpy(), q[:, t].numpy(), p + 1, kind, budget,
                                    topk, chunk=CHUNK, sink=sink, window=window)
        assert kept_chunks(mask[0, t], p, CHUNK) == ref, (t, p)
        if p + 1 > budget:  # the budget bounds what a selecting row attends
            assert int(mask[0, t].sum()) <= budget


def test_per_kv_head_is_the_rule_on_each_kv_head_alone():
    q, K, pos = random_rows(2)
    budget = 96
    policy = sp.Policy("kv", scope="kv_head", dense_layers=0)
    sink, window, topk = policy.split(budget, CHUNK)
    mask = sp.keep_mask(policy, 0, topk, q, K, pos, CHUNK, budget, 0.25)
    assert mask.shape[0] == KVH
    differs = 0
    for g in range(KVH):
        for t, p in enumerate(pos.tolist()):
            ref = kept_chunks_reference(K[g:g + 1, :p + 1].permute(1, 0, 2).numpy(), q[g * G:(g + 1) * G, t].numpy(),
                                        p + 1, "cuboid_max", budget, topk, chunk=CHUNK, sink=sink, window=window)
            assert kept_chunks(mask[g, t], p, CHUNK) == ref
        differs += int((mask[g] != mask[0]).any())
    assert differs  # the heads really chose differently


def test_round_robin_takes_each_heads_picks_in_turn():
    q, K, pos = random_rows(3)
    budget = 96
    policy = sp.Policy("rr", pool="rr_kv", dense_layers=0)
    sink, window, topk = policy.split(budget, CHUNK)
    mask = sp.keep_mask(policy, 0, topk, q, K, pos, CHUNK, budget, 0.25)
    per_head = sp.head_bounds(q, K, "cuboid_max", CHUNK).reshape(KVH, G, len(pos), -1).sum(1)
    for t, p in enumerate(pos.tolist()):
        nch = p // CHUNK + 1
        cands = list(range(sink, nch - window))
        ranked = [sorted(cands, key=lambda c: (-float(per_head[g, t, c]), -c)) for g in range(KVH)]
        picks = []
        for r in range(len(cands)):
            for g in range(KVH):
                if ranked[g][r] not in picks and len(picks) < topk:
                    picks.append(ranked[g][r])
        want = sorted(list(range(sink)) + picks + list(range(nch - window, nch)))
        assert kept_chunks(mask[0, t], p, CHUNK) == want


def test_rows_within_budget_and_dense_layers_attend_everything():
    q, K, pos = random_rows(4)
    policy = sp.Policy("doc", dense_layers=1)
    causal = torch.arange(K.shape[1])[None, :] <= pos[:, None]
    assert torch.equal(sp.keep_mask(policy, 0, 5, q, K, pos, CHUNK, 64, 0.25)[0], causal)
    assert torch.equal(sp.keep_mask(policy, 1, 5, q, K, pos, CHUNK, 10_000, 0.25)[0], causal)
    assert not torch.equal(sp.keep_mask(policy, 1, 5, q, K, pos, CHUNK, 64, 0.25)[0], causal)


def test_layer_topk_keeps_the_total_and_leans_the_way_asked():
    early = sp.Policy("e", layer_slope=0.5).layer_topk(1024, 16, 30)
    late = sp.Policy("l", layer_slope=-0.5).layer_topk(1024, 16, 30)
    flat = sp.Policy("f").layer_topk(1024, 16, 30)
    assert early[:2] == late[:2] == flat[:2] == [0, 0]
    assert sum(early) == sum(late) == sum(flat) == 61 * 28
    assert early[2] > flat[2] > early[-1] and late[2] < flat[2] < late[-1]
    assert early[2:] == sorted(early[2:], reverse=True) and late[2:] == sorted(late[2:])
    assert sp.Policy("sw", window_fill=True).layer_topk(1024, 16, 30) == [0] * 30  # no top-k: none added


def test_sink_window_attends_the_budget_and_no_more():
    q, K, pos = random_rows(5)
    policy = sp.Policy("sw", window_fill=True, dense_layers=0)
    mask = sp.keep_mask(policy, 0, policy.layer_topk(64, CHUNK, 1)[0], q, K, pos, CHUNK, 64, 0.25)
    for t, p in enumerate(pos.tolist()):
        nch = p // CHUNK + 1
        assert kept_chunks(mask[0, t], p, CHUNK) == [0] + list(range(nch - 7, nch))


def test_budget_without_room_for_top_k_is_refused():
    with pytest.raises(ValueError, match="budget"):
        sp.Policy("doc").split(40, 16)
    with pytest.raises(ValueError, match="Policy.scope"):
        sp.Policy("bad", scope="row")
