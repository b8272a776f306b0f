"""Caller-owned paged pools for the PagedAttention tests: block tables of random prefix trees,
their packing into vLLM's metadata, and a pool in vLLM's CPU layout with dtype-exact float64
values."""

import itertools

import numpy as np

from reference import round_to


def make_tree_batch(rng, block_size, n_seqs, max_rows):
    """Block tables of a batch whose sequences share prefixes at random depths: each sequence
    either starts fresh or shares the first d full blocks of an earlier one (its parent), which
    gives system prompts, few-shot blocks under them and forks below those. Returns
    (tables, seq_lens, n_new, num_blocks) with distinct block ids apart from the shared ones."""
    B = block_size
    counter = itertools.count()
    tables, lens, rows = [], [], []
    for i in range(n_seqs):
        shared = []
        if i > 0 and rng.random() < 0.8:
            p = int(rng.integers(0, i))
            full_before = (lens[p] - rows[p]) // B
            if full_before > 0:
                d = int(rng.integers(1, full_before + 1))
                shared = tables[p][:d]
        n_new = 1 if rng.random() < 0.6 else int(rng.integers(1, max_rows + 1))
        own_ctx = int(rng.integers(0, 3 * B))
        length = len(shared) * B + own_ctx + n_new
        n_blocks = -(-length // B)
        table = list(shared) + [next(counter) for _ in range(n_blocks - len(shared))]
        tables.append(table)
        lens.append(length)
        rows.append(n_new)
    used = next(counter)
    num_blocks = 2 * used + 3  # ids scattered over a pool with unused blocks between them
    ids = rng.permutation(num_blocks)[:used]
    return [[int(ids[b]) for b in t] for t in tables], lens, rows, num_blocks


def pack(tables, lens, rows, width=None):
    width = width or max(len(t) for t in tables)
    bt = np.full((len(tables), width), -1, dtype=np.int32)  # unused entries stay invalid
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    qsl = np.zeros(len(rows) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(rows)
    return bt, np.asarray(lens, dtype=np.int32), qsl


class Pool:
    """A vLLM CPU-layout pool [num_blocks, kv_heads, block_size, 2 * head_dim] with dtype-exact
    float64 values; K of (block, head, row r) at [.., :B*D] and V at [.., B*D:] of the head."""

    def __init__(self, rng, num_blocks, kv_heads, block_size, head_dim, dtype):
        B, D = block_size, head_dim
        self.B, self.D = B, D
        x = rng.uniform(-np.sqrt(3), np.sqrt(3), size=(num_blocks, kv_heads, 2, B, D))
        self.x64 = round_to(x, dtype)  # [N, H, 2, B, D]

    def history(self, table, length):
        """K, V [length, kv_heads, D] of a sequence."""
        k = np.concatenate([self.x64[b, :, 0] for b in table], axis=1)  # [H, nb*B, D]
        v = np.concatenate([self.x64[b, :, 1] for b in table], axis=1)
        return k[:, :length].transpose(1, 0, 2), v[:, :length].transpose(1, 0, 2)

    def vllm_layout(self):
        N, H, _, B, D = self.x64.shape
        return self.x64.reshape(N, H, B, 2 * D)
