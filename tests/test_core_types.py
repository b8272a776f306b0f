"""The core's value types as Python sees them: CacheStats (typed fields and a read-only
mapping), the native config a CacheConfig becomes, and CapacityError's fields."""
import pickle
from collections.abc import Mapping

import numpy as np
import pytest

import chunkvale as cv
from chunkvale import _native


def _cache(**eviction):
    ev = cv.Eviction(budget_tokens=256, **eviction) if eviction else None
    return cv.KVCache(cv.CacheConfig(layers=2, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16,
                                     capacity_chunks=8, eviction=ev))


def test_stats_is_a_typed_read_only_mapping():
    cache = _cache()
    seq, _ = cache.add_sequence(list(range(40)))
    step = cache.plan([(seq, 40)])
    k = np.random.default_rng(0).standard_normal((40, 2, 64)).astype(np.float32)
    for layer in range(2):
        cache.append(layer, step, k, k)
    step.commit()
    st = cache.stats()
    assert isinstance(st, _native.CacheStats) and isinstance(st, Mapping)
    assert st.chunks_in_use == st["chunks_in_use"] == 3 and st.tokens_cached == 40
    assert dict(st) == dict(st.items()) and list(st) == list(st.keys()) and len(st) == len(st.keys())
    for key in st:  # every key is a field of the same value
        assert getattr(st, key) == st[key] and key in st
    assert isinstance(st["evict_select_seconds"], float) and "evict_select_ns" not in st
    assert st.get("no_such_field") is None and st.get("no_such_field", 7) == 7
    with pytest.raises(KeyError, match="no_such_field"):
        st["no_such_field"]
    with pytest.raises(AttributeError):
        st.chunks_in_use = 0
    assert st == cache.stats() and st != {} and st != dict(st)
    cache.remove(seq)
    assert cache.stats() != st and cache.stats().sequences == 0


def test_config_crosses_as_the_core_type():
    cfg = cv.CacheConfig(layers=3, q_heads=4, kv_heads=2, head_dim=64, chunk_size=32, dtype="bfloat16",
                         capacity_chunks=10, threads=1, sm_scale=0.5, kernel_isa="generic",
                         eviction=cv.Eviction(budget_tokens=512, topk_chunks=None, digest="sphere"))
    native = cfg.to_native()
    assert isinstance(native, _native.CacheConfig)
    assert (native.layers, native.q_heads, native.kv_heads, native.head_dim, native.chunk_size) == (3, 4, 2, 64, 32)
    assert (native.dtype, native.capacity_chunks, native.threads, native.kernel_isa) == ("bfloat16", 10, 1, "generic")
    assert native.sm_scale == 0.5 and native.eviction.enabled and native.eviction.digest == "sphere"
    # None (ArkVale's default) and 0 (no top-k) mean the same on both sides of the boundary.
    assert native.eviction.topk_chunks == _native.EvictionConfig.TOPK_DEFAULT
    assert cv.Eviction(budget_tokens=512, topk_chunks=0).to_native().topk_chunks == 0
    assert not cv.CacheConfig(layers=1, q_heads=1, kv_heads=1, head_dim=64,
                              capacity_chunks=1).to_native().eviction.enabled
    with pytest.raises(ValueError, match="dtype"):
        native.dtype = "int8"
    cache = cv.KVCache(cfg)
    assert cache._native.config.eviction.budget_tokens == 512


def test_capacity_error_is_a_python_class_with_fields():
    cache = _cache()
    seq, _ = cache.add_sequence(list(range(200)))
    before = cache.stats()
    with pytest.raises(cv.CapacityError) as info:
        cache.plan([(seq, 200)])
    assert cache.stats() == before
    e = info.value
    assert isinstance(e, RuntimeError) and type(e) is cv.errors.CapacityError
    assert "capacity_chunks" in str(e)
    again = pickle.loads(pickle.dumps(cv.CapacityError("full", "capacity_chunks", 9, 8)))
    assert (str(again), again.resource, again.needed, again.available) == ("full", "capacity_chunks", 9, 8)


def test_capacity_error_fields_name_the_resource_and_agree_with_needs():
    cache = _cache()
    seq, _ = cache.add_sequence(list(range(200)))
    needs = cache.needs([(seq, 200)])
    assert isinstance(needs, cv.StepNeeds) and not needs.fits
    assert (needs.pool_chunks, needs.pool_available) == (13, 8)
    with pytest.raises(cv.CapacityError) as info:
        cache.plan([(seq, 200)])
    e = info.value
    assert (e.resource, e.needed, e.available) == ("capacity_chunks", 13, 8)
    assert cache.needs([(seq, 100)]).fits
    cache.plan([(seq, 100)])  # what needs() said fits, fits


def test_request_needs_checks_its_arguments():
    cache = _cache(device_chunks=16, dense_layers=0)
    got = cache.request_needs(100, 10, 2)
    assert (got.pool_chunks, got.pool_available) == (100 // 16 + 2, 8)
    assert (got.device_chunks, got.device_available) == (7 + 1, 16) and got.fits
    for args, arg in (((0, 1, 1), "prompt_tokens"), ((1, 0, 1), "max_new_tokens"), ((1, 1, 0), "n")):
        with pytest.raises(ValueError, match=arg):
            cache.request_needs(*args)
    with pytest.raises(TypeError, match="n"):
        cache.request_needs(1, 1, 1.5)
