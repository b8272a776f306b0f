"""KV memory vs number of requests sharing a system prompt (SmolLM2-135M's cache shape).

R requests share a 2048-token prefix and each has 128 private tokens. Recorded per R:
``kv_bytes`` (the pool's chunks in use) and ``kv_bytes_unshared`` (every request holding its own
chunks), for bench/plots.py's memory_vs_requests.png. The timed part is one decode step of all R
requests (plan + append + attention over every layer); each round adds a token per request.

    pytest bench/test_bench_memory.py --benchmark-json=mem.json
"""

import math

import numpy as np
import pytest

import chunkvale

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, CHUNK = 30, 9, 3, 64, 32
SHARED, PRIVATE = 2048, 128


def _fill(cache, step, rng):
    n = step.num_tokens
    for layer in range(LAYERS):
        kv = rng.standard_normal((n, KV_HEADS, HEAD_DIM), dtype=np.float32)
        cache.append(layer, step, kv, kv)


@pytest.mark.parametrize("requests", [1, 2, 4, 8, 16, 32])
def test_memory_vs_requests(benchmark, requests):
    rng = np.random.default_rng(0)
    capacity = math.ceil(SHARED / CHUNK) + requests * (math.ceil(PRIVATE / CHUNK) + 2) + 8
    cache = chunkvale.KVCache(chunkvale.CacheConfig(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS,
                                                    head_dim=HEAD_DIM, chunk_size=CHUNK, capacity_chunks=capacity))
    shared = rng.integers(0, 49152, SHARED).tolist()
    first, _ = cache.add_sequence(shared + rng.integers(0, 49152, PRIVATE).tolist())
    _fill(cache, cache.plan([(first, SHARED + PRIVATE)]), rng)
    seqs = [first]
    for _ in range(requests - 1):
        seq, cached = cache.add_sequence(shared + rng.integers(0, 49152, PRIVATE).tolist())
        assert cached >= SHARED - CHUNK  # the shared prompt's full chunks came from the cache
        _fill(cache, cache.plan([(seq, SHARED + PRIVATE - cached)]), rng)
        seqs.append(seq)
    q = rng.standard_normal((requests, Q_HEADS, HEAD_DIM), dtype=np.float32)
    kv = rng.standard_normal((requests, KV_HEADS, HEAD_DIM), dtype=np.float32)

    def decode_step():
        step = cache.plan([(s, [1]) for s in seqs])
        for layer in range(LAYERS):
            cache.append(layer, step, kv, kv)
            cache.attention(layer, step, q)

    benchmark.pedantic(decode_step, rounds=5, warmup_rounds=1, iterations=1)
    stats = cache.stats()
    unshared_chunks = sum(math.ceil(cache.sequence_length(s) / CHUNK) for s in seqs)
    benchmark.extra_info.update(
        requests=requests, kv_bytes=stats["chunks_in_use"] * stats["bytes_per_chunk"],
        kv_bytes_unshared=unshared_chunks * stats["bytes_per_chunk"],
        chunk_size=CHUNK, shared_tokens_per_request=SHARED, private_tokens_per_request=PRIVATE)
