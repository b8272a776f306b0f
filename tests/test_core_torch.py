"""Torch tensors through DLPack: bfloat16 (numpy has none), float16 and float32, kind in ->
kind out, out= aliasing, and the errors specific to torch inputs."""

from __future__ import annotations

import numpy as np
import pytest

from reference import Shadow, kernel_isa_params
from test_core_reference import ISAS

torch = pytest.importorskip("torch")

NEVER = 1 << 30
VOCAB = 50_000


def _fresh(rng, n):
    return [int(t) for t in rng.integers(0, VOCAB, size=int(n))]


TORCH_CONFIGS = [
    ("bf16-c16-gqa9x3-d64", "bfloat16", 16, 9, 3, 64, 2, 1),
    ("bf16-c64-gqa8x2-d128-seqfirst", "bfloat16", 64, 8, 2, 128, NEVER, 2),
    ("bf16-c128-mqa4x1-d256-t1", "bfloat16", 128, 4, 1, 256, 1, 2),
    ("bf16-c32-mha6-d80", "bfloat16", 32, 6, 6, 80, 3, 1),
    ("bf16-c32-gqa6x2-d96", "bfloat16", 32, 6, 2, 96, 2, 2),
    ("f16-c32-gqa9x3-d64", "float16", 32, 9, 3, 64, 2, 2),
    ("f32-c16-gqa4x2-d128", "float32", 16, 4, 2, 128, 1, 1),
]


@pytest.mark.parametrize("isa,cfg", kernel_isa_params(TORCH_CONFIGS, {c[0] for c in TORCH_CONFIGS[:5]}))
def test_random_trees_torch(cv, seed, isa, cfg):
    from test_core_reference import random_scenario

    _, dtype, C, hq, hkv, d, thr, threads = cfg
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, kind="torch", layers=2, q_heads=hq, kv_heads=hkv, head_dim=d, chunk_size=C,
                dtype=dtype, capacity_chunks=2048, threads=threads, share_threshold=thr, seed=seed,
                kernel_isa=isa)
    random_scenario(sh, rng, n_ops=40, max_prompt=min(3 * C + 17, 260), max_new=min(2 * C, 128))
    assert sh.steps_run >= 3


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("thr", [2, NEVER])
def test_bf16_shared_prefix_decode(cv, seed, thr, isa):
    rng = np.random.default_rng(seed)
    sh = Shadow(cv, kind="torch", layers=1, q_heads=8, kv_heads=8, head_dim=128, chunk_size=64,
                dtype="bfloat16", seed=seed, share_threshold=thr, threads=2, kernel_isa=isa)
    prefix = _fresh(rng, 300)
    ids = []
    for i in range(12):
        s, n = sh.add(prefix + _fresh(rng, 20 + i))
        sh.run_step([(s, sh.seqs[s].pending)])
        ids.append(s)
    for _ in range(3):
        sh.run_step([(s, [1]) for s in ids])


def _small(cv, dtype="bfloat16"):
    cache = cv.KVCache(cv.CacheConfig(layers=1, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16,
                                      dtype=dtype, capacity_chunks=32))
    s, _ = cache.add_sequence(list(range(1, 21)))
    step = cache.plan([(s, 20)])
    return cache, step


def test_kind_in_kind_out(cv):
    cache, step = _small(cv, "float32")
    k = torch.randn(20, 2, 64)
    cache.append(0, step, k, k.clone())
    q = torch.randn(20, 4, 64)
    o = cache.attention(0, step, q)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float32 and tuple(o.shape) == (20, 4, 64)
    on = cache.attention(0, step, q.numpy())
    assert isinstance(on, np.ndarray) and on.dtype == np.float32
    np.testing.assert_array_equal(on, o.numpy())
    out = torch.full((20, 4, 64), float("nan"))
    r, lse = cache.attention(0, step, q, out=out, return_lse=True)
    assert r.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    assert tuple(lse.shape) == (20, 4) and str(lse.dtype).endswith("float32")


def test_mixed_kinds_are_rejected(cv):
    cache, step = _small(cv, "float32")
    k = torch.randn(20, 2, 64)
    cache.append(0, step, k, k.clone())
    before = cache.stats()
    for call, name in [
        (lambda: cache.attention(0, step, torch.randn(20, 4, 64), out=np.zeros((20, 4, 64), np.float32)), "out"),
        (lambda: cache.attention(0, step, np.zeros((20, 4, 64), np.float32), out=torch.zeros(20, 4, 64)), "out"),
    ]:
        with pytest.raises(TypeError) as ei:
            call()
        assert name in str(ei.value)
    assert cache.stats() == before


@pytest.mark.parametrize("case", ["bf16_into_f32", "f16_into_bf16", "transposed_k", "sliced_q",
                                  "meta_q", "int_k"])
def test_torch_input_errors(cv, case):
    dtype = "bfloat16" if case == "f16_into_bf16" else "float32"
    td = getattr(torch, dtype)
    cache, step = _small(cv, dtype)
    k = torch.randn(20, 2, 64).to(td)
    before = cache.stats()
    if case in ("bf16_into_f32", "f16_into_bf16", "transposed_k", "int_k"):
        bad = {"bf16_into_f32": k.to(torch.bfloat16), "f16_into_bf16": k.to(torch.float16),
               "transposed_k": torch.randn(64, 2, 20).to(td).permute(2, 1, 0),
               "int_k": torch.ones(20, 2, 64, dtype=torch.int32)}[case]
        exc = ValueError if case == "transposed_k" else TypeError
        with pytest.raises(exc) as ei:
            cache.append(0, step, bad, k)
        assert "k" in str(ei.value)
        assert cache.stats() == before
        with pytest.raises(ValueError):  # nothing was appended
            cache.attention(0, step, torch.randn(20, 4, 64).to(td))
    else:
        cache.append(0, step, k, k.clone())
        before = cache.stats()
        if case == "sliced_q":
            bad = torch.randn(20, 4, 128).to(td)[:, :, ::2]
            exc = ValueError
        else:
            bad = torch.empty(20, 4, 64, dtype=td, device="meta")
            exc = (ValueError, TypeError)
        with pytest.raises(exc) as ei:
            cache.attention(0, step, bad)
        assert "q" in str(ei.value)
        assert cache.stats() == before
    # the step still works
    cache2_out = cache.attention(0, step, torch.randn(20, 4, 64).to(td)) if case in ("sliced_q", "meta_q") else None
    assert cache2_out is None or not torch.isnan(cache2_out.float()).any()
