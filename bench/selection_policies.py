"""Candidate selection policies of budgeted attention, written exactly in torch: for one layer,
which keys each decode row attends to, as a boolean mask over the keys.

A policy is what the core would decide; here it is applied to dense attention by masking, so its
fidelity can be measured (bench/explore_selection.py) before any kernel is written. The rule of
docs/API.md is ``Policy("cuboid_max")``: sinks, the window (the chunk being written included) and
the top-k candidate chunks by digest bound, the bound of every query head against its KV head's
digest summed over all query heads, ties to the later chunk; a row within budget, or with no more
candidates than top-k, attends to everything. tests/test_selection_policies.py checks that rule
against tests/reference.py.

Variants (each at the same attended tokens per row unless ``layer_slope`` moves them between layers):
- ``scope``: "shared" (one set of chunks per row), "kv_head" (each KV head its own top-k),
  "q_head" (each query head its own: not shareable by a KV head's keys, a ceiling only);
- ``pool``, how the heads of a scope unit make one score: "sum" of bounds, "max" of bounds,
  "softmax" (each head's bounds turned into shares of one over the candidates, then summed: every
  head gets an equal vote), "rr_kv" / "rr_q" (each KV / query head ranks the candidates by its
  own bound; the set takes their picks in turn, best first: round robin);
- ``digest``: "cuboid_max", "cuboid_mean", "sphere", or "oracle" (the true attention mass of the
  chunk: the ceiling of any chunk selection); ``sub_block``: a chunk's bound is the largest of
  its sub-blocks' (finer digests of that many tokens);
- ``sink``, ``window`` (chunks); ``window_fill``: no top-k, the window fills the budget
  (StreamingLLM); ``dense_layers``; ``layer_slope``: per-layer top-k proportional to
  1 + slope * (1 - 2 x) with x from 0 (first selecting layer) to 1 (last), the same total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIGESTS = ("cuboid_max", "cuboid_mean", "sphere", "oracle")
SCOPES = ("shared", "kv_head", "q_head")
POOLS = ("sum", "max", "softmax", "rr_kv", "rr_q")


@dataclass(frozen=True)
class Policy:
    name: str
    digest: str = "cuboid_max"
    scope: str = "shared"
    pool: str = "sum"
    sub_block: int = 0
    sink: int = 1
    window: int = 2
    window_fill: bool = False
    dense_layers: int = 2
    layer_slope: float = 0.0

    def __post_init__(self):
        for field, value, allowed in (("digest", self.digest, DIGESTS), ("scope", self.scope, SCOPES),
                                      ("pool", self.pool, POOLS)):
            if value not in allowed:
                raise ValueError(f"Policy.{field}: expected one of {allowed}, got {value!r}")
        if self.scope == "q_head" and self.pool != "sum":
            raise ValueError(f"Policy.pool: a q_head scope has one head per unit (pool 'sum'), got {self.pool!r}")
        if self.pool in ("rr_kv", "rr_q") and self.scope != "shared":
            raise ValueError(f"Policy.pool: {self.pool!r} merges heads into one shared set, scope is {self.scope!r}")
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"Policy.sink / window: expected >= 0 / >= 1 chunks, got {self.sink} / {self.window}")

    def split(self, budget: int, chunk: int) -> tuple[int, int, int]:
        """(sink, window, top-k) chunks a selecting row attends to at ``budget`` tokens, whole chunks."""
        if self.window_fill:
            return self.sink, budget // chunk - self.sink, 0
        topk = budget // chunk - self.sink - self.window
        if topk < 1:
            raise ValueError(f"budget: {budget} tokens leave no top-k chunk of {chunk} after "
                             f"{self.sink} sink + {self.window} window chunks")
        return self.sink, self.window, topk

    def layer_topk(self, budget: int, chunk: int, layers: int) -> list[int]:
        """Top-k of each layer (0 for dense layers): ``split``'s top-k in every selecting layer, or
        with ``layer_slope`` the same total spread linearly over them (largest remainders)."""
        _, _, topk = self.split(budget, chunk)
        selecting = list(range(self.dense_layers, layers))
        out = [0] * layers
        if not selecting or topk == 0:
            return out
        n = len(selecting)
        w = [1.0 + self.layer_slope * (1.0 - 2.0 * i / max(n - 1, 1)) for i in range(n)]
        if min(w) <= 0:
            raise ValueError(f"Policy.layer_slope: expected |slope| < 1, got {self.layer_slope}")
        share = [topk * n * x / sum(w) for x in w]
        ks = [int(s) for s in share]
        by_remainder = sorted(range(n), key=lambda i: -(share[i] - ks[i]))
        for i in by_remainder[:topk * n - sum(ks)]:
            ks[i] += 1
        for layer, k in zip(selecting, ks):
            out[layer] = max(k, 1)
        return out


def _digest(blocks: torch.Tensor, kind: str):
    """blocks [KVH, N, C, D] -> the two digest vectors [KVH, N, D] (docs/API.md)."""
    lo, hi = blocks.amin(2), blocks.amax(2)
    if kind == "cuboid_max":
        return lo, hi
    centre = (lo + hi) / 2
    if kind == "cuboid_mean":
        return centre, (blocks - centre[:, :, None]).abs().mean(2)
    return centre, (blocks - centre[:, :, None]).square().sum(-1).sqrt().amax(2)  # sphere: radius [KVH, N]


def head_bounds(q: torch.Tensor, K: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """Bound of q.k over each whole block of ``block`` keys from its digest, per query head:
    q [H, T, D], K [KVH, S, D] -> [H, T, S // block]. Query head h uses KV head h // (H / KVH)."""
    H, KVH = q.shape[0], K.shape[0]
    n = K.shape[1] // block
    d0, d1 = _digest(K[:, :n * block].reshape(KVH, n, block, -1), kind)
    d0, d1 = (x.repeat_interleave(H // KVH, dim=0) for x in (d0, d1))
    if kind == "cuboid_max":
        return q.clamp_min(0) @ d1.transpose(1, 2) + q.clamp_max(0) @ d0.transpose(1, 2)
    if kind == "cuboid_mean":
        return q @ d0.transpose(1, 2) + q.abs() @ d1.transpose(1, 2)
    return q @ d0.transpose(1, 2) + q.norm(dim=-1, keepdim=True) * d1[:, None, :]


def chunk_mass(q: torch.Tensor, K: torch.Tensor, pos: torch.Tensor, chunk: int, scale: float) -> torch.Tensor:
    """The true attention mass of each whole chunk, per query head: [H, T, S // chunk] (the oracle)."""
    H, KVH = q.shape[0], K.shape[0]
    s = (q @ K.repeat_interleave(H // KVH, dim=0).transpose(1, 2)) * scale
    s = s.masked_fill(torch.arange(K.shape[1])[None, None, :] > pos[None, :, None], float("-inf"))
    p = s.softmax(-1)
    n = K.shape[1] // chunk
    return p[:, :, :n * chunk].reshape(H, q.shape[1], n, chunk).sum(-1)


def _rank_later_first(scores: torch.Tensor) -> torch.Tensor:
    """Candidate indices by descending score, ties to the later index (top_k.h's rule): [..., N]."""
    n = scores.shape[-1]
    order = torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)
    return n - 1 - order


def _round_robin(scores: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """scores [U, T, N] of U heads -> keep [T, N]: the heads' rankings taken in turn (rank 0 of
    every head, then rank 1, ...; head order within a rank), first k distinct candidates."""
    U, T, N = scores.shape
    order = _rank_later_first(scores.masked_fill(~cand, float("-inf")))  # [U, T, N]
    seq = order.permute(1, 2, 0).reshape(T, N * U)  # rank-major, head-minor
    turn = torch.arange(N * U).expand(T, -1)
    first = torch.full((T, N), N * U, dtype=torch.long).scatter_reduce(1, seq, turn, reduce="amin")
    first = first.masked_fill(~cand, N * U + 1)
    keep = torch.zeros(T, N, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(first, dim=1)[:, :k], True)
    return keep


def keep_mask(policy: Policy, layer: int, topk: int, q: torch.Tensor, K: torch.Tensor, pos: torch.Tensor,
              chunk: int, budget: int, scale: float) -> torch.Tensor:
    """Which keys each row attends to in this layer: [X, T, S] bool, X = 1 (one set for every head),
    KV heads or query heads (the policy's scope). q [H, T, D] (the rows' queries), K [KVH, S, D]
    (every key, the rows' own included), pos [T] (row t's position: it sees keys 0 .. pos[t]),
    ``topk``: this layer's (``Policy.layer_topk``), ``scale``: the softmax scale."""
    H, T, _ = q.shape
    KVH, S, _ = K.shape
    keys = torch.arange(S)
    causal = keys[None, :] <= pos[:, None]  # [T, S]
    if layer < policy.dense_layers:
        return causal[None]
    sink, window, _ = policy.split(budget, chunk)
    nch = (pos + chunk) // chunk  # chunks of pos + 1 tokens
    lo = nch.clamp(max=sink)
    hi = torch.maximum(lo, nch - window)
    selects = (pos + 1 > budget) & (hi - lo > topk)
    key_chunk = keys // chunk
    outside = (key_chunk[None, :] < lo[:, None]) | (key_chunk[None, :] >= hi[:, None])  # sinks + window [T, S]
    units = {"shared": 1, "kv_head": KVH, "q_head": H}[policy.scope]
    if topk == 0 or not bool(selects.any()):
        kept = torch.zeros(units, T, S, dtype=torch.bool)
    else:
        N = S // chunk  # whole chunks: every candidate is one
        c = torch.arange(N)
        cand = (c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None])  # [T, N]
        if policy.digest == "oracle":
            b = chunk_mass(q.double(), K.double(), pos, chunk, scale)
        else:
            block = policy.sub_block or chunk
            b = head_bounds(q.double(), K.double(), policy.digest, block)
            b = b[:, :, :N * (chunk // block)].reshape(H, T, N, chunk // block).amax(-1)
        keep_c = _select(policy, b, cand, topk, KVH, scale)  # [units, T, N]
        kept = keep_c.repeat_interleave(chunk, dim=-1)
        kept = torch.cat([kept, torch.zeros(units, T, S - N * chunk, dtype=torch.bool)], dim=-1)
    row_mask = torch.where(selects[:, None], outside, torch.ones_like(outside))
    return (row_mask[None] | (kept & selects[None, :, None])) & causal[None]


def _select(policy: Policy, b: torch.Tensor, cand: torch.Tensor, k: int, KVH: int, scale: float) -> torch.Tensor:
    """b [H, T, N] per-head bounds (or masses) -> keep [units, T, N]: the top-k candidates per unit."""
    H, T, N = b.shape
    G = H // KVH
    if policy.pool in ("rr_kv", "rr_q"):
        per = b.reshape(KVH, G, T, N).sum(1) if policy.pool == "rr_kv" else b
        return _round_robin(per, cand, k)[None]
    if policy.pool == "softmax":  # each head's estimated shares over the candidates
        b = (b * scale).masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0)
    units = {"shared": 1, "kv_head": KVH, "q_head": H}[policy.scope]
    grouped = b.reshape(units, H // units, T, N)
    score = grouped.sum(1) if policy.pool in ("sum", "softmax") else grouped.amax(1)
    order = _rank_later_first(score.masked_fill(~cand, float("-inf")))[..., :k]
    return torch.zeros(units, T, N, dtype=torch.bool).scatter_(-1, order, True)
