"""Dense float64 reference for chunkvale's attention, and a shadow model of the cache.

Three layers, all pure numpy (torch only where a test asks for torch tensors):

* ``attention_reference`` -- causal attention + natural-log LSE of one sequence's step,
  exactly as docs/API.md defines it, in float64. ``naive_attention`` is a loop-by-loop
  version of the same formula used to test the reference itself.
* ``kv_for`` -- the test's K/V: a deterministic function of (namespace, token prefix,
  layer). Two sequences with the same token prefix therefore append bit-identical K/V,
  and a prefix the cache reuses has K/V the test knows without having stored it.
* ``Shadow`` -- drives a ``chunkvale.KVCache`` and keeps its own model of every sequence
  (tokens, committed length, pending prompt tokens) and of the prefix tree (full chunks,
  live reference counts, cached/unreferenced chunks). Every step is run for every layer
  with freshly drawn queries, outputs poisoned with NaN, and compared against the dense
  reference over the sequence's whole token history.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

try:  # numpy bfloat16 rounding without torch
    import ml_dtypes  # type: ignore
except ImportError:  # pragma: no cover
    ml_dtypes = None

DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------
# budgeted attention: digests, bounds and the chunks a decode row keeps (docs/API.md)
# --------------------------------------------------------------------------------------


def digest_reference(keys, kind):
    """keys [C, D] float64 -> the two digest vectors chunkvale documents."""
    lo, hi = keys.min(0), keys.max(0)
    if kind == "cuboid_max":
        return lo, hi
    centre = (lo + hi) / 2
    if kind == "cuboid_mean":
        return centre, np.abs(keys - centre).mean(0)
    radius = np.sqrt(((keys - centre) ** 2).sum(1)).max()
    return centre, np.r_[radius, np.zeros(keys.shape[1] - 1)]


def bound_reference(q, d0, d1, kind):
    """Upper bound of q.k over a chunk from its digest (q: [D])."""
    if kind == "cuboid_max":
        return np.maximum(q * d0, q * d1).sum()
    if kind == "cuboid_mean":
        return q @ d0 + np.abs(q) @ d1
    return q @ d0 + np.linalg.norm(q) * d1[0]


def chunk_scores_reference(K, q, chunks, kind, chunk):
    """Score of each chunk index for one decode row: the bound per query head against its KV
    head's digest, summed (K: [n, kv_heads, D]; q: [q_heads, D])."""
    group = q.shape[0] // K.shape[1]
    out = []
    for c in chunks:
        s = 0.0
        for h in range(q.shape[0]):
            d0, d1 = digest_reference(K[c * chunk:(c + 1) * chunk, h // group], kind)
            s += bound_reference(q[h], d0, d1, kind)
        out.append(s)
    return np.array(out)


def head_chunk_scores_reference(K, q, chunks, kind, chunk):
    """Per-KV-head selection's scores: for each KV head g and chunk index, the largest bound among
    g's query heads against g's digest -> [kv_heads, len(chunks)]."""
    kv_heads = K.shape[1]
    group = q.shape[0] // kv_heads
    out = np.empty((kv_heads, len(chunks)))
    for i, c in enumerate(chunks):
        for g in range(kv_heads):
            d0, d1 = digest_reference(K[c * chunk:(c + 1) * chunk, g], kind)
            out[g, i] = max(bound_reference(q[h], d0, d1, kind) for h in range(g * group, (g + 1) * group))
    return out


def kept_chunks_reference(K, q, total, kind, budget, topk, *, chunk, sink, window, selection="shared"):
    """Chunk indices the documented policy attends for one decode row: sinks, the window
    and the top-k candidates by score (ties to the later chunk); all when within budget.
    selection "shared": one list (scores summed over query heads); "per_kv_head": one list per
    KV head (each its own top-k by head_chunk_scores_reference)."""
    nch = -(-total // chunk)
    lo = min(sink, nch)
    hi = max(lo, nch - window)
    per_head = selection == "per_kv_head" and topk > 0
    if total <= budget or hi - lo <= topk:
        return [list(range(nch))] * K.shape[1] if per_head else list(range(nch))

    def kept(scores):
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))[:topk]
        return list(range(lo)) + sorted(lo + b for b in best) + list(range(hi, nch))

    if per_head:
        return [kept(s) for s in head_chunk_scores_reference(K, q, range(lo, hi), kind, chunk)]
    return kept(chunk_scores_reference(K, q, range(lo, hi), kind, chunk))


def kept_attention_reference(q, k, v, kept, chunk, return_cond=False):
    """One decode row (q [1, q_heads, D], the last of k, v [n, kv_heads, D]) attending to its kept
    chunks: ``kept`` one list of chunk indices per KV head (kept_chunks_reference's per_kv_head
    answer, or the shared list repeated), each KV head and its query heads over their own.
    Returns attention_reference's outputs, heads in order."""
    n, kv_heads = k.shape[0], k.shape[1]
    group = q.shape[1] // kv_heads
    parts = []
    for g, chunks in enumerate(kept):
        idx = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, n)) for c in chunks])
        parts.append(attention_reference(q[:, g * group:(g + 1) * group], k[idx, g:g + 1], v[idx, g:g + 1],
                                         len(idx) - 1, return_cond=return_cond))
    return tuple(np.concatenate(xs, axis=1) for xs in zip(*parts))


# --------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------


def attention_reference(q, k, v, n_past, sm_scale=None, return_cond=False):
    """Causal attention of one sequence's new tokens, in float64.

    q: [n, q_heads, D]; k, v: [n_past + n, kv_heads, D] -- the sequence's whole history
    with the step's own tokens as the last n rows. Row i (absolute position n_past + i)
    attends to positions 0 .. n_past + i. Query head h uses KV head h // (q_heads/kv_heads)
    (consecutive query heads form a group, as in HF's repeat_kv).

    Returns (out [n, q_heads, D], lse [n, q_heads]); lse is the natural log of
    sum_j exp(sm_scale * q.k_j) over the attended positions. With return_cond also
    cond [n, q_heads] = max_j sm_scale * sum_d |q_d k_jd|: the condition number of the
    scores, which bounds what rounding them to float32 can cost (see out_tolerance()).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n, hq, d = q.shape
    lk, hkv, d2 = k.shape
    assert d == d2 and v.shape == k.shape and hq % hkv == 0
    assert lk == n_past + n, (lk, n_past, n)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    g = hq // hkv
    qh = q.reshape(n, hkv, g, d).transpose(1, 2, 0, 3)  # [hkv, g, n, d]
    s = np.matmul(qh, k.transpose(1, 2, 0)[:, None]) * sm_scale  # [hkv, g, n, lk]
    masked = np.arange(lk)[None, :] > (n_past + np.arange(n))[:, None]  # [n, lk]
    s = np.where(masked, -np.inf, s)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    o = np.matmul(p, v.transpose(1, 0, 2)[:, None]) / den  # [hkv, g, n, d]
    out = o.transpose(2, 0, 1, 3).reshape(n, hq, d)
    lse = (m[..., 0] + np.log(den[..., 0])).transpose(2, 0, 1).reshape(n, hq)
    if not return_cond:
        return out, lse
    a = np.matmul(np.abs(qh), np.abs(k).transpose(1, 2, 0)[:, None]) * abs(sm_scale)
    a = np.where(masked, 0.0, a).max(axis=-1)  # [hkv, g, n]
    return out, lse, a.transpose(2, 0, 1).reshape(n, hq)


def naive_attention(q, k, v, n_past, sm_scale=None):
    """The same formula, one row and head at a time with math.fsum; slow, for self-tests."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    out = np.zeros((n, hq, d))
    lse = np.zeros((n, hq))
    for i in range(n):
        for h in range(hq):
            kh = h // g
            scores = [sm_scale * math.fsum(q[i, h] * k[j, kh]) for j in range(n_past + i + 1)]
            mx = max(scores)
            w = [math.exp(s - mx) for s in scores]
            den = math.fsum(w)
            for dd in range(d):
                out[i, h, dd] = math.fsum(w[j] * v[j, kh, dd] for j in range(len(w))) / den
            lse[i, h] = mx + math.log(den)
    return out, lse


def merge_lse(o1, l1, o2, l2):
    """Merge two attention partials over disjoint key sets through their natural-log LSE."""
    m = np.maximum(l1, l2)
    w1 = np.exp(l1 - m)
    w2 = np.exp(l2 - m)
    den = w1 + w2
    return (o1 * (w1 / den)[..., None] + o2 * (w2 / den)[..., None]), m + np.log(den)


# Tolerances. The reference is computed from the dtype-rounded q/k/v, so what a correct
# kernel may still add is (1) float32 arithmetic on the scores, whose error grows with their
# condition number cond = max_j scale*sum_d|q_d k_jd| (a plain float32 numpy softmax shows
# errors of 1..3 eps32*cond), and (2) for float16/bfloat16 the final rounding of `out` to the
# storage dtype: at most half an ulp, i.e. eps/2 * |out| (eps = ulp of 1.0).
# Per element: |got - ref| <= F32_ULPS * eps32 * (1 + cond) * VMAX + eps/2 * |ref| (+ tiny).
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
EPS32 = 2.0**-23
F32_ULPS = 3.0  # a plain float32 numpy softmax needs ~1-3; chunkvale measured <= ~0.9
VMAX = math.sqrt(3.0)  # the test's |v| bound (uniform in [-sqrt3, sqrt3])


def rounds_probabilities(dtype, isa=None) -> bool:
    """Whether the kernels that run (isa; None or "": CHUNKVALE_KERNEL_ISA, else the best this CPU
    runs) round P to bf16 for the P V product: the matrix-engine path (amx_bf16) on bf16 caches."""
    if dtype != "bfloat16":
        return False
    if not isa:
        import os
        import chunkvale
        isa = os.environ.get("CHUNKVALE_KERNEL_ISA") or chunkvale.kernel_isa()
    return isa.startswith("amx")


def out_tolerance(dtype, ref_out, cond, isa=None):
    """Allowed |error| per element of `out` [n, hq, d], given cond [n, hq]. Where the kernels
    round the probabilities to bf16 for P V (rounds_probabilities), each weight moves by at most
    one bf16 rounding (2^-8 relative), which adds 2^-8 * sum_j p_j |v_j| / sum_j p_j <= 2^-8 * VMAX
    (docs/NOTES-cpu.md)."""
    f32 = F32_ULPS * EPS32 * (1.0 + cond[..., None]) * VMAX
    rnd = 0.0 if dtype == "float32" else 0.5 * EPS[dtype] * np.abs(ref_out)
    p_bf16 = 0.5 * EPS["bfloat16"] * VMAX if rounds_probabilities(dtype, isa) else 0.0
    return f32 + rnd + p_bf16 + 1e-30


def lse_tolerance(ref_lse, cond):
    """Allowed |error| of the float32 natural-log LSE [n, hq] (any storage dtype: products of
    float16/bfloat16 inputs are exact in float32)."""
    return F32_ULPS * EPS32 * (1.0 + cond + np.abs(ref_lse))


def assert_close(got, want, atol, rtol, what, tol=None):
    """|got - want| <= atol + rtol*|want| elementwise (or <= tol, an array, when given)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad_nan = ~np.isfinite(got)
    if bad_nan.any():
        idx = np.argwhere(bad_nan)
        raise AssertionError(
            f"{what}: {bad_nan.sum()} non-finite values (unwritten rows?), first at {idx[:5].tolist()}"
        )
    err = np.abs(got - want)
    lim = atol + rtol * np.abs(want) if tol is None else np.broadcast_to(tol, err.shape)
    bad = err > lim
    if bad.any():
        idx = np.argwhere(bad)
        i = tuple(int(x) for x in idx[0])
        worst = np.unravel_index(np.argmax(err / lim), err.shape)
        raise AssertionError(
            f"{what}: {bad.sum()}/{bad.size} elements off, worst err/allowed {float((err / lim).max()):.2f} "
            f"at {[int(x) for x in worst]} (err {err[worst]:.3e}, allowed {lim[worst]:.3e}); first at {list(i)}: "
            f"got {got[i]!r} want {want[i]!r}; rows with errors: "
            f"{sorted(set(int(r) for r in idx[:, 0]))[:20]}"
        )
    return float((err / lim).max()) if err.size else 0.0


# --------------------------------------------------------------------------------------
# deterministic K/V
# --------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _mix_int(x):
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_np(x):
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def namespace_seed(namespace: str) -> int:
    return int.from_bytes(hashlib.blake2b(b"ns:" + namespace.encode(), digest_size=8).digest(), "little")


def extend_hashes(hashes: list, tokens, seed: int):
    """Rolling prefix hash: hashes[i] identifies (namespace, tokens[:i+1])."""
    h = hashes[-1] if hashes else seed
    for t in tokens[len(hashes):]:
        h = _mix_int(h ^ _mix_int((int(t) + 0x9E3779B97F4A7C15) & _M64))
        hashes.append(h)
    return hashes


def kv_for(hashes, layer, kv_heads, head_dim):
    """K and V (float64, uniform in [-sqrt3, sqrt3]: unit variance) for prefix hashes."""
    hs = np.asarray(hashes, dtype=np.uint64)
    width = 2 * kv_heads * head_dim
    salt = _mix_np(np.arange(width, dtype=np.uint64) + np.uint64((layer + 1) * 0x632BE59BD9B4E019 & _M64))
    x = _mix_np(hs[:, None] ^ salt[None, :])
    u = (x >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    vals = (u * 2.0 - 1.0) * math.sqrt(3.0)
    vals = vals.reshape(len(hs), 2, kv_heads, head_dim)
    return vals[:, 0], vals[:, 1]


def round_to(x, dtype):
    """Round float64 values to `dtype` (nearest even) and return them as float64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        if ml_dtypes is not None:
            return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        import torch

        return torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    raise ValueError(dtype)


# --------------------------------------------------------------------------------------
# tensor kinds: numpy arrays or torch tensors of the cache dtype
# --------------------------------------------------------------------------------------


class Kind:
    """Makes inputs of one kind/dtype from float64 values that are exact in that dtype."""

    def __init__(self, kind: str, dtype: str):
        self.kind, self.dtype = kind, dtype
        if kind == "numpy":
            if dtype == "bfloat16":
                raise ValueError("bfloat16 is tested through torch tensors")
            self.np_dtype = np.dtype(dtype)
        elif kind == "torch":
            import torch

            self.torch = torch
            self.t_dtype = getattr(torch, dtype)
        else:
            raise ValueError(kind)

    def make(self, x64):
        x64 = np.ascontiguousarray(x64)
        if self.kind == "numpy":
            return x64.astype(self.np_dtype)
        return self.torch.from_numpy(x64).to(self.t_dtype).contiguous()

    def poison(self, shape):
        if self.kind == "numpy":
            return np.full(shape, np.nan, dtype=self.np_dtype)
        return self.torch.full(shape, float("nan"), dtype=self.t_dtype)

    def to64(self, t):
        if self.kind == "numpy" or isinstance(t, np.ndarray):
            return np.asarray(t).astype(np.float64)
        return t.detach().to(self.torch.float64).cpu().numpy()

    def is_kind(self, t):
        if self.kind == "numpy":
            return isinstance(t, np.ndarray) and t.dtype == self.np_dtype
        return isinstance(t, self.torch.Tensor) and t.dtype == self.t_dtype

    def same_memory(self, a, b):
        if self.kind == "numpy":
            return np.shares_memory(a, b)
        return a.data_ptr() == b.data_ptr()


def lse_to64(lse):
    """lse may come back as numpy or torch (the contract only says float32)."""
    if isinstance(lse, np.ndarray):
        assert lse.dtype == np.float32, f"lse dtype {lse.dtype}, want float32"
        return lse.astype(np.float64)
    import torch

    assert isinstance(lse, torch.Tensor), f"lse of type {type(lse)}"
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, want float32"
    return lse.to(torch.float64).numpy()


# --------------------------------------------------------------------------------------
# shadow model of a KVCache
# --------------------------------------------------------------------------------------


@dataclass
class SeqModel:
    namespace: str
    prompt: list
    tokens: list  # committed tokens + pending prompt tokens (+ an open step's decode tokens)
    length: int  # committed tokens
    hashes: list = field(default_factory=list)
    kv: dict = field(default_factory=dict)  # layer -> (k64, v64) for positions [0, len)
    reserved: int = 0  # tokens of the open step

    @property
    def pending(self):
        return max(0, len(self.prompt) - self.length)


@dataclass
class Node:
    parent: int
    chunk: tuple
    refs: int = 0


@dataclass
class OpenStep:
    step: object
    entries: list  # (sid, n)
    base: dict  # sid -> committed length when planned (the step's n_past)
    appended: set = field(default_factory=set)
    attended: set = field(default_factory=set)
    committed: bool = False


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Shadow:
    """A chunkvale.KVCache plus the test's own record of what it must contain.

    memory="exact": the model predicts n_cached and every chunk count exactly (capacity must
    be large enough that nothing is evicted). memory="bounds": cached chunks may be evicted
    under pressure; the model checks n_cached / chunks_in_use against lower and upper bounds.
    memory="off": only attention is checked (n_cached is taken from the cache).

    Step semantics modelled: a step is committed (its tokens count in sequence_length /
    tokens_cached, its full chunks join the tree) by ``step.commit()`` once every layer was
    appended, or, when nobody committed it, by the next plan / add_sequence / fork / remove /
    clear; reads (stats, sequence_length, ...) never commit. The step ends (a deduplicated
    chunk's private copy is freed, the step handle goes stale) at that next call.
    Reuse sources modelled: full chunks of the tree (live or cached), a partial match into
    the first tokens of a tree chunk, and a partial match into a live sequence's committed
    private tail that continues the same path (both copied: copy-on-diverge).
    """

    def __init__(self, cv, *, kind="numpy", layers=2, q_heads=4, kv_heads=2, head_dim=64,
                 chunk_size=16, dtype="float32", capacity_chunks=4096, threads=1,
                 share_threshold=2, sm_scale=None, seed=0, memory="exact", q_scale=None,
                 **extra):
        self.cv = cv
        self.cfg_kwargs = dict(layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                               chunk_size=chunk_size, dtype=dtype, capacity_chunks=capacity_chunks,
                               threads=threads, share_threshold=share_threshold, sm_scale=sm_scale,
                               **extra)
        self.cfg = cv.CacheConfig(**self.cfg_kwargs)
        self.cache = cv.KVCache(self.cfg)
        self.layers, self.hq, self.hkv, self.d = layers, q_heads, kv_heads, head_dim
        self.C, self.dtype, self.capacity = chunk_size, dtype, capacity_chunks
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        self.kind = Kind(kind, dtype)
        self.rng = np.random.default_rng(seed)
        self.q_scale = q_scale
        self.memory = memory
        self.seqs: dict = {}
        self.nodes: dict = {}  # key (prefix hash at chunk end) -> Node
        self.children: dict = {}  # parent key -> {chunk tuple: key}
        self.open: OpenStep | None = None
        self.ended: OpenStep | None = None  # the step the last call ended
        self.deferred = [0, 0]  # private copies of deduplicated chunks held until the step ends:
        #                         [into live nodes, into cached nodes (maybe evicted: "bounds")]
        self.reused = 0
        self.last_peak = 0
        self.max_err = {"out": 0.0, "lse": 0.0}  # worst error / allowed error seen
        self.steps_run = 0
        self.chunk_first_units = 0  # summed over plans (a stats() field beyond docs/API.md)
        self.log: list = []  # operations, for repro notes

    # ---------------------------------------------------------------- tree model
    def _seed(self, ns):
        return namespace_seed(ns)

    def _hashes(self, sm: SeqModel, upto: int):
        extend_hashes(sm.hashes, sm.tokens[:upto], self._seed(sm.namespace))
        return sm.hashes

    def _chunk_key(self, sm, j):
        return self._hashes(sm, (j + 1) * self.C)[(j + 1) * self.C - 1]

    def _parent_key(self, sm, j):
        return self._seed(sm.namespace) if j == 0 else self._chunk_key(sm, j - 1)

    def _match(self, ns, toks, live_only=False):
        """Longest reusable prefix of toks (already cut to max_reuse)."""
        C = self.C
        hashes = extend_hashes([], toks, self._seed(ns))
        parent = self._seed(ns)
        k = 0
        while (k + 1) * C <= len(toks):
            key = hashes[(k + 1) * C - 1]
            nd = self.nodes.get(key)
            if nd is None or (live_only and nd.refs == 0):
                break
            parent = key
            k += 1
        best = 0
        rest = tuple(toks[k * C:(k + 1) * C])
        if rest:
            for chunk, key in self.children.get(parent, {}).items():
                if live_only and self.nodes[key].refs == 0:
                    continue
                best = max(best, common_prefix(chunk, rest))
            for o in self.seqs.values():  # live private tails continuing the same path
                if o.namespace != ns or o.length // C != k or o.length == k * C:
                    continue
                if k and self._hashes(o, k * C)[k * C - 1] != parent:
                    continue
                best = max(best, common_prefix(o.tokens[k * C:o.length], rest))
        return k * C + best

    def _node_ref(self, sm, j):
        """Reference chunk j of sm; returns the refs it had (None: created)."""
        key = self._chunk_key(sm, j)
        nd = self.nodes.get(key)
        had = None if nd is None else nd.refs
        if nd is None:
            parent = self._parent_key(sm, j)
            chunk = tuple(sm.tokens[j * self.C:(j + 1) * self.C])
            nd = self.nodes[key] = Node(parent, chunk, 0)
            self.children.setdefault(parent, {})[chunk] = key
        nd.refs += 1
        return had

    def _node_unref(self, sm, j):
        self.nodes[self._chunk_key(sm, j)].refs -= 1

    def _drop_node(self, key):
        nd = self.nodes.pop(key)
        ch = self.children.get(nd.parent)
        if ch is not None:
            ch.pop(nd.chunk, None)

    def _private(self, sm):
        total = sm.length + sm.reserved
        return -(-total // self.C) - sm.length // self.C

    def expected(self):
        live_nodes = sum(1 for nd in self.nodes.values() if nd.refs > 0)
        cached = sum(1 for nd in self.nodes.values() if nd.refs == 0)
        private = sum(self._private(sm) for sm in self.seqs.values())
        return dict(
            chunks_in_use=len(self.nodes) + private + sum(self.deferred),
            live_nodes=live_nodes,
            private=private,
            chunks_cached=cached,
            chunks_shared=sum(1 for nd in self.nodes.values() if nd.refs >= 2),
            sequences=len(self.seqs),
            tokens_cached=sum(sm.length for sm in self.seqs.values()),
            reused_prompt_tokens=self.reused,
        )

    def check_stats(self, where=""):
        st = self.cache.stats()  # a read: it commits nothing
        ctx = f"stats after {where}: {st}"
        if self.ended is not None:  # the call that ended it committed it, and its Step says so
            assert self.ended.step.committed and not self.ended.step.cancelled, ctx
            self.ended = None
        assert st["capacity_chunks"] == self.capacity, ctx
        assert st["chunks_in_use"] + st["chunks_free"] == st["capacity_chunks"], ctx
        assert st["peak_chunks"] >= st["chunks_in_use"], ctx
        assert st["peak_chunks"] >= self.last_peak, ctx
        self.last_peak = st["peak_chunks"]
        assert st["sequences"] == len(self.seqs), ctx
        if self.memory == "off":
            return st
        exp = self.expected()
        assert st["tokens_cached"] == exp["tokens_cached"], ctx + f" expected {exp}"
        assert st["reused_prompt_tokens"] == exp["reused_prompt_tokens"], ctx + f" expected {exp}"
        if self.memory == "exact":
            for key in ("chunks_in_use", "chunks_cached", "chunks_shared"):
                assert st[key] == exp[key], f"{key}: {ctx}; model expects {exp}"
        else:
            lo = exp["live_nodes"] + exp["private"] + self.deferred[0]
            hi = lo + exp["chunks_cached"] + self.deferred[1]
            assert lo <= st["chunks_in_use"] <= hi, f"chunks_in_use not in [{lo}, {hi}]: {ctx}"
            assert st["chunks_cached"] <= exp["chunks_cached"], ctx
            if st["chunks_cached"] == 0:  # nothing cached any more: forget what may be there
                for key in [k for k, nd in self.nodes.items() if nd.refs == 0]:
                    self._drop_node(key)
        return st

    def snapshot(self):
        """The model's state (not the cache's), to roll back after a call that failed."""
        import copy

        op = self.open
        return copy.deepcopy((self.seqs, self.nodes, self.children, self.reused, self.deferred)), op, (
            None if op is None else (list(op.entries), dict(op.base), set(op.appended), op.committed))

    def restore(self, snap):
        state, op, opstate = snap
        self.seqs, self.nodes, self.children, self.reused, self.deferred = state
        self.open = op
        if op is not None:
            op.entries, op.base, op.appended, op.committed = opstate

    def available_slots(self):
        """Slots a call may use: free ones, cached (evictable) chunks, deferred copies."""
        e = self.expected()
        return self.capacity - e["live_nodes"] - e["private"]

    def slots_needed_by_plan(self, entries):
        need = 0
        for sid, e in entries:
            sm = self.seqs[sid]
            n = e if isinstance(e, int) else len(e)
            need += -(-(sm.length + n) // self.C) - -(-sm.length // self.C)
        return need

    # ---------------------------------------------------------------- step state
    def _commit_if_complete(self):
        op = self.open
        if op is None or op.committed or len(op.appended) < self.layers:
            return
        for sid, n in op.entries:
            sm = self.seqs[sid]
            old_full = sm.length // self.C
            sm.length += n
            sm.reserved = 0
            for j in range(old_full, sm.length // self.C):
                had = self._node_ref(sm, j)
                if had is not None:  # an identical chunk already in the tree: ours is dropped
                    self.deferred[0 if had > 0 else 1] += 1
        op.committed = True

    def _end_step(self):
        """What plan/add_sequence/fork/remove/clear do first: commit a complete step nobody
        committed, then end it. False: the step is incomplete."""
        self._commit_if_complete()
        if self.open is not None and not self.open.committed:
            return False
        self.ended = self.open  # its Step must say committed once the call ran (check_stats)
        self.open = None
        self.deferred = [0, 0]
        return True

    def pending_after_open(self, sid):
        """Pending prompt tokens of sid once the open (complete) step is committed."""
        sm = self.seqs[sid]
        done = sm.length
        op = self.open
        if op is not None and not op.committed and len(op.appended) == self.layers:
            done += dict(op.entries).get(sid, 0)
        return max(0, len(sm.prompt) - done)

    # ---------------------------------------------------------------- operations
    def add(self, tokens, namespace="", max_reuse=None):
        tokens = [int(t) for t in tokens]
        self.log.append(("add", len(tokens), namespace, max_reuse))
        assert self._end_step(), "test bug: add with an incomplete step"
        limit = len(tokens) if max_reuse is None else min(max_reuse, len(tokens))
        upper = self._match(namespace, tokens[:limit])
        lower = self._match(namespace, tokens[:limit], live_only=True)
        if max_reuse is None:
            sid, n_cached = self.cache.add_sequence(tokens, namespace=namespace)
        else:
            sid, n_cached = self.cache.add_sequence(tokens, namespace=namespace, max_reuse=max_reuse)
        assert sid not in self.seqs, f"add_sequence returned a live id {sid}"
        if self.memory == "exact":
            assert n_cached == upper, (
                f"add_sequence(len={len(tokens)}, namespace={namespace!r}, max_reuse={max_reuse}): "
                f"n_cached={n_cached}, the cache holds {upper} matching tokens")
        elif self.memory == "bounds":
            assert lower <= n_cached <= upper, (n_cached, lower, upper)
        else:
            assert 0 <= n_cached <= limit
        sm = SeqModel(namespace, list(tokens), list(tokens), n_cached)
        self.seqs[sid] = sm
        for j in range(n_cached // self.C):
            self._node_ref(sm, j)
        self.reused += n_cached
        assert self.cache.sequence_length(sid) == n_cached
        self.check_stats(f"add_sequence -> ({sid}, {n_cached})")
        return sid, n_cached

    def fork(self, sid, n):
        self.log.append(("fork", sid, n))
        assert self._end_step(), "test bug: fork with an incomplete step"
        kids = list(self.cache.fork(sid, n))
        assert len(kids) == n and len(set(kids)) == n
        parent = self.seqs[sid]
        for kid in kids:
            assert kid not in self.seqs and kid != sid
            sm = SeqModel(parent.namespace, list(parent.prompt), list(parent.tokens), parent.length,
                          list(parent.hashes), dict(parent.kv))
            self.seqs[kid] = sm
            for j in range(sm.length // self.C):
                self._node_ref(sm, j)
            assert self.cache.sequence_length(kid) == sm.length
        self.check_stats(f"fork({sid}, {n})")
        return kids

    def remove(self, sid):
        self.log.append(("remove", sid))
        assert self._end_step(), "test bug: remove with an incomplete step"
        self.cache.remove(sid)
        sm = self.seqs.pop(sid)
        for j in range(sm.length // self.C):
            self._node_unref(sm, j)
        self.check_stats(f"remove({sid})")

    def clear(self):
        self.log.append(("clear",))
        assert self._end_step(), "test bug: clear with an incomplete step"
        self.cache.clear()
        for key in [k for k, nd in self.nodes.items() if nd.refs == 0]:
            self._drop_node(key)
        self.check_stats("clear()")

    def commit(self):
        """``step.commit()``: every layer appended (the test's job), the step committed once."""
        self.log.append(("commit",))
        op = self.open
        assert len(op.appended) == self.layers, "test bug: commit an incomplete step"
        op.step.commit()
        self._commit_if_complete()
        assert op.step.committed and not op.step.cancelled
        self.check_stats("commit()")

    def cancel(self):
        """Drops the open step, which was not committed (complete or not)."""
        self.log.append(("cancel",))
        op = self.open
        assert not op.committed, "test bug: cancel a committed step"
        self.cache.cancel(op.step)
        assert op.step.cancelled and not op.step.committed
        for sid, _ in op.entries:
            sm = self.seqs[sid]
            sm.reserved = 0
            del sm.tokens[max(len(sm.prompt), sm.length):]  # decode tokens of the dropped step
            del sm.hashes[len(sm.tokens):]  # and what the model derived from them
            sm.kv = {layer: (k[:len(sm.tokens)], v[:len(sm.tokens)]) for layer, (k, v) in sm.kv.items()}
        self.open = None
        self.check_stats("cancel(step)")

    def plan(self, entries):
        """entries: [(sid, n_new)] or [(sid, [tokens])]. Returns the step (open, nothing appended)."""
        self.log.append(("plan", [(s, e if isinstance(e, int) else list(e)) for s, e in entries]))
        step = self.cache.plan([(s, e if isinstance(e, int) else list(e)) for s, e in entries])
        assert self._end_step(), "test bug: plan with an incomplete step"
        norm = []
        base = {}
        for sid, e in entries:
            sm = self.seqs[sid]
            if isinstance(e, int):
                assert e <= sm.pending
                n = e
            else:
                assert sm.pending == 0
                sm.tokens.extend(int(t) for t in e)
                n = len(e)
            sm.reserved = n
            norm.append((sid, n))
            base[sid] = sm.length
        self.open = OpenStep(step, norm, base)
        # the step's layout
        sizes = [n for _, n in norm]
        offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        assert step.num_tokens == offs[-1], (step.num_tokens, offs)
        assert list(step.seq_ids) == [s for s, _ in norm]
        assert list(step.row_offsets) == offs, (list(step.row_offsets), offs)
        pos = np.asarray(step.positions)
        assert pos.dtype == np.int64 and pos.shape == (offs[-1],)
        want = np.concatenate([np.arange(base[s], base[s] + n) for s, n in norm])
        np.testing.assert_array_equal(pos, want)
        st = self.check_stats("plan")
        self.chunk_first_units += int(st.get("chunk_first_units", 0))
        return step

    def _history(self, sm, layer, upto):
        k, v = sm.kv.get(layer, (np.zeros((0, self.hkv, self.d)), np.zeros((0, self.hkv, self.d))))
        if len(k) < upto:
            hs = self._hashes(sm, upto)[len(k):upto]
            nk, nv = kv_for(hs, layer, self.hkv, self.d)
            k = np.concatenate([k, round_to(nk, self.dtype)])
            v = np.concatenate([v, round_to(nv, self.dtype)])
            sm.kv[layer] = (k, v)
        return k[:upto], v[:upto]

    def step_kv(self, layer):
        op = self.open
        ks, vs = [], []
        for sid, n in op.entries:
            sm, b = self.seqs[sid], op.base[sid]
            k, v = self._history(sm, layer, b + n)
            ks.append(k[b:])
            vs.append(v[b:])
        return np.concatenate(ks), np.concatenate(vs)

    def append(self, layer):
        k, v = self.step_kv(layer)
        self.cache.append(layer, self.open.step, self.kind.make(k), self.kind.make(v))
        self.open.appended.add(layer)

    def draw_q(self):
        n = self.open.step.num_tokens
        scale = self.q_scale if self.q_scale is not None else float(self.rng.choice([0.5, 1.0, 2.0, 4.0]))
        return round_to(self.rng.standard_normal((n, self.hq, self.d)) * scale, self.dtype)

    def reference(self, layer, q64):
        outs, lses, conds = [], [], []
        r = 0
        op = self.open
        for sid, n in op.entries:
            sm, b = self.seqs[sid], op.base[sid]
            k, v = self._history(sm, layer, b + n)
            o, l, c = attention_reference(q64[r:r + n], k, v, b, self.sm_scale, return_cond=True)
            outs.append(o)
            lses.append(l)
            conds.append(c)
            r += n
        return np.concatenate(outs), np.concatenate(lses), np.concatenate(conds)

    def attend(self, layer, return_lse=True, use_out=True, q64=None):
        if q64 is None:
            q64 = self.draw_q()
        q = self.kind.make(q64)
        n = self.open.step.num_tokens
        kwargs = {}
        out = None
        if use_out:
            out = self.kind.poison((n, self.hq, self.d))
            kwargs["out"] = out
        if return_lse:
            res = self.cache.attention(layer, self.open.step, q, return_lse=True, **kwargs)
            assert isinstance(res, tuple) and len(res) == 2, type(res)
            got, lse = res
        else:
            got = self.cache.attention(layer, self.open.step, q, **kwargs)
            lse = None
        assert self.kind.is_kind(got), f"attention returned {type(got)} {getattr(got, 'dtype', '')}"
        assert tuple(got.shape) == (n, self.hq, self.d)
        if use_out:
            assert self.kind.same_memory(got, out), "attention(out=...) did not return `out`"
        ref_o, ref_l, cond = self.reference(layer, q64)
        where = f"layer {layer}, entries {self.open.entries}, cfg {self.cfg_kwargs}"
        e = assert_close(self.kind.to64(got), ref_o, 0, 0, f"out ({where})",
                         tol=out_tolerance(self.dtype, ref_o, cond, self.cfg_kwargs.get("kernel_isa")))
        self.max_err["out"] = max(self.max_err["out"], e)
        if lse is not None:
            l64 = lse_to64(lse)
            assert l64.shape == (n, self.hq), l64.shape
            e = assert_close(l64, ref_l, 0, 0, f"lse ({where})", tol=lse_tolerance(ref_l, cond))
            self.max_err["lse"] = max(self.max_err["lse"], e)
        self.open.attended.add(layer)
        return got

    def run_step(self, entries, order="interleaved", return_lse=None, use_out=None, commit=None):
        """plan + append + attention for every layer, checked against the reference; then
        ``step.commit()`` (commit=True), or left to the next call that starts new work
        (False; None: either, drawn)."""
        step = self.plan(entries)
        layers = list(range(self.layers))
        rl = return_lse if return_lse is not None else bool(self.rng.integers(2))
        uo = use_out if use_out is not None else bool(self.rng.random() < 0.8)
        if order == "interleaved":
            for layer in layers:
                self.append(layer)
                self.attend(layer, return_lse=rl, use_out=uo)
        elif order == "append_first":
            for layer in layers:
                self.append(layer)
            for layer in layers:
                self.attend(layer, return_lse=rl, use_out=uo)
        else:
            raise ValueError(order)
        if commit if commit is not None else bool(self.rng.integers(2)):
            self.commit()
        self.steps_run += 1
        return step

    # ---------------------------------------------------------------- helpers for scenarios
    def live(self):
        return list(self.seqs)

    def random_entry(self, sid, max_new=None):
        """A random (sid, n_new) or (sid, [tokens]) entry valid after the open step commits."""
        pending = self.pending_after_open(sid)
        if pending:
            hi = pending if max_new is None else min(pending, max_new)
            return (sid, int(self.rng.integers(1, hi + 1)))
        n = 1 if self.rng.random() < 0.8 else int(self.rng.integers(2, 4))
        return (sid, [int(t) for t in self.rng.integers(0, 50_000, size=n)])


def kernel_isa_params(configs, every_isa_ids):
    """(isa, config) pairs: every config on the best ISA this CPU runs, and the configs whose
    id is in ``every_isa_ids`` (chosen to cover each dtype, head dim and both kernel paths)
    on every other ISA it runs too, forced through CacheConfig(kernel_isa=...)."""
    import pytest
    try:
        import chunkvale
        isas = chunkvale.kernel_isas()
    except ImportError:  # the cv fixture fails the tests with a clear message
        isas = [None]
    params = []
    for i, isa in enumerate(isas):
        for c in configs:
            if i == 0 or c[0] in every_isa_ids:
                params.append(pytest.param(isa, c, id=f"{isa}-{c[0]}"))
    return params
