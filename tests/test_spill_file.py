"""The host tier's spill file: owned by one cache only (in this process or another), every
block checked on the way back (a file changed behind the cache's back is an error, never
K/V), its space reserved by plan (a full disk is a CapacityError before anything changes),
and injected storage faults (``KVCache(..., test_hooks={"faults": ...})``, docs/API.md) surfacing
as clear errors at the next call while no sequence's K/V is ever replaced by another's."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_eviction import HKV, HQ, C, D, L, Run
from test_host_tier import BLOCK, _alternating_workload, _cfg, _check_tiles, _prompt


def _spill_cfg(cv, path, host_blocks=6):
    return _cfg(cv, device_chunks=14, host_bytes=host_blocks * BLOCK, spill_path=path)


def test_same_spill_path_twice_in_one_process_is_refused(cv, seed, tmp_path):
    rng = np.random.default_rng(seed)
    path = tmp_path / "spill.bin"
    host = cv.KVCache(_spill_cfg(cv, path))
    run, seqs = _alternating_workload(cv, rng, host, n_steps=4)
    size = path.stat().st_size
    assert host.stats()["evict_spill_bytes_in_use"] > 0
    for spelled in (path, str(path), str(tmp_path / "." / "spill.bin")):
        with pytest.raises(ValueError, match=r"eviction\.spill_path: expected a file no other cache uses"):
            cv.KVCache(_spill_cfg(cv, spelled))
    assert path.stat().st_size == size  # not truncated by the refused cache
    for s in seqs:  # and the owner still reads back exactly what it wrote
        _check_tiles(host, run, s)
    run.caches.clear()
    del host
    gc.collect()
    assert not path.exists()
    again = cv.KVCache(_spill_cfg(cv, path))  # free again once its owner went
    assert path.exists()
    del again


_HOLDER = textwrap.dedent("""
    import sys, chunkvale as cv
    ev = cv.Eviction(budget_tokens=96, sink_chunks=1, window_chunks=2, topk_chunks=3, dense_layers=1,
                     device_chunks=14, host_bytes={host_bytes}, spill_path=sys.argv[1])
    cache = cv.KVCache(cv.CacheConfig(layers={L}, q_heads={HQ}, kv_heads={HKV}, head_dim={D},
                                      chunk_size={C}, capacity_chunks=64, eviction=ev))
    print("ready", flush=True)
    sys.stdin.readline()
""")


def test_spill_path_held_by_another_process_is_refused(cv, tmp_path):
    path = tmp_path / "shared.bin"
    script = _HOLDER.format(host_bytes=4 * BLOCK, L=L, HQ=HQ, HKV=HKV, D=D, C=C)
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(child.stdout.readline, "")  # an editable install may print its rebuild first
        assert any(line.strip() == "ready" for line in lines), "the child never held the file"
        with pytest.raises(ValueError, match=r"eviction\.spill_path: .*another cache \(in this process or another\)"):
            cv.KVCache(_spill_cfg(cv, path, host_blocks=4))
        assert path.exists()
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    assert not path.exists()  # the child removed it on exit
    mine = cv.KVCache(_spill_cfg(cv, path, host_blocks=4))
    assert path.exists()
    del mine


def _decode_or_error(cache, run, seqs, rng):
    """One decode step of `seqs` on `cache` alone. Returns the number of OSErrors seen; every
    output that does come back equals the float64 reference of the documented selection."""
    from test_eviction import _check_layer
    from test_host_tier import BUDGET, DENSE, TOPK
    st = cache.plan([(s, [int(rng.integers(0, 1000))]) for s in seqs])
    errors = 0
    for layer in range(L):
        k = rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
        v = rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
        q = (2.0 * rng.standard_normal((st.num_tokens, HQ, D))).astype(np.float32)
        for i, seq in enumerate(st.seq_ids):
            K, V = run.kv[seq][layer]
            run.kv[seq][layer] = (np.concatenate([K, k[i:i + 1]]), np.concatenate([V, v[i:i + 1]]))
        try:
            cache.append(layer, st, k, v)
            out = cache.attention(layer, st, q, out=np.full_like(q, np.nan))
        except OSError as e:
            assert "eviction.spill_path" in str(e) and "checksum" in str(e), e
            errors += 1
            continue
        _check_layer(run, st, q, out, layer, "cuboid_max", BUDGET, TOPK, DENSE, selection="shared")
    return errors


def test_a_spill_file_changed_behind_the_caches_back_is_an_error_not_kv(cv, seed, tmp_path):
    rng = np.random.default_rng(seed)
    path = tmp_path / "spill.bin"
    host = cv.KVCache(_spill_cfg(cv, path, host_blocks=2))
    run, seqs = _alternating_workload(cv, rng, host, n_steps=3)
    for s in seqs:
        _check_tiles(host, run, s)  # every block is in the file now (backups settled)
    size = path.stat().st_size
    assert size > 0
    with open(path, "r+b") as f:  # another writer: plausible K/V of its own
        f.write(rng.standard_normal(size // 4).astype(np.float32).tobytes())
    refused = 0
    for s in seqs:
        slots = host.sequence_slots(s)
        for layer in range(1, L):
            K, V = run.kv[s][layer]
            for c in range(K.shape[0] // C):
                if host.chunk_residency(layer, slots[c]) != "host":
                    continue
                try:
                    tile = host.read_tile(layer, slots[c], 0, 0)
                except OSError as e:
                    assert "eviction.spill_path" in str(e) and "checksum mismatch" in str(e), e
                    refused += 1
                    continue
                np.testing.assert_array_equal(tile, K[c * C:(c + 1) * C, 0])  # a block held in memory
    assert refused > 0
    run.caches.remove(run.caches[1])  # the resident reference cache is not needed any more
    errors = sum(_decode_or_error(host, run, [seqs[t % 3], seqs[(t + 1) % 3]], rng) for t in range(3))
    assert errors > 0  # decode needed a spilled block: refused, never attended


def test_plan_reserves_the_spill_space_its_backups_need(cv, seed, tmp_path):
    rng = np.random.default_rng(seed)
    path = tmp_path / "spill.bin"
    cache = cv.KVCache(_spill_cfg(cv, path, host_blocks=2))
    run = Run(cv, rng, [cache])
    a, _ = run.add(_prompt(64))
    assert path.stat().st_size == 0
    cache.plan([(a, 64)])  # 4 chunks x 2 evicting layers: 8 blocks, 6 of them in the file
    assert path.stat().st_size >= 6 * BLOCK  # reserved before any backup ran
    assert cache.stats()["evict_spill_bytes_in_use"] == 0


# ------------------------------------------------------------------ injected faults


class FaultRun:
    """Drives a host-tier cache under injected faults next to a fully resident one. Every
    call that raises is retried after checking the error (type, naming the argument) and
    that it changed nothing; the two caches' outputs must stay bit-identical."""

    def __init__(self, cv, rng, host, expect):
        self.cv, self.rng, self.host = cv, rng, host
        self.ref = cv.KVCache(_cfg(cv))
        self.expect = expect  # (exception types, message needle)
        self.errors = []
        self.run = Run(cv, rng, [host, self.ref])

    def call(self, fn, *args, same_stats=True):
        for _ in range(20):
            before = self.host.stats()
            try:
                return fn(*args)
            except self.expect[0] as e:
                assert self.expect[1] in str(e), e
                if same_stats:
                    assert self.host.stats() == before, f"a failing call changed stats(): {e}"
                self.errors.append(e)
        raise AssertionError("a call kept failing")

    def add(self, n):
        tokens = _prompt(n)
        s, _ = self.call(self.host.add_sequence, tokens)
        assert self.ref.add_sequence(tokens)[0] == s
        self.run.kv[s] = [(np.zeros((0, HKV, D), np.float32),) * 2 for _ in range(L)]
        return s

    def step(self, entries, same_stats=True):
        st = self.call(self.host.plan, entries, same_stats=same_stats)
        rs = self.ref.plan(entries)
        for layer in range(L):
            k = self.rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
            v = self.rng.standard_normal((st.num_tokens, HKV, D)).astype(np.float32)
            q = (2.0 * self.rng.standard_normal((st.num_tokens, HQ, D))).astype(np.float32)
            for i, seq in enumerate(st.seq_ids):
                r0, r1 = st.row_offsets[i], st.row_offsets[i + 1]
                K, V = self.run.kv[seq][layer]
                self.run.kv[seq][layer] = (np.concatenate([K, k[r0:r1]]), np.concatenate([V, v[r0:r1]]))
            self.call(self.host.append, layer, st, k, v, same_stats=same_stats)
            self.ref.append(layer, rs, k, v)
            got = self.call(self.host.attention, layer, st, q, same_stats=same_stats)
            np.testing.assert_array_equal(got, self.ref.attention(layer, rs, q), err_msg=f"layer {layer}")
        st.commit()
        rs.commit()

    def workload(self, same_stats=True):
        seqs = [self.add(n) for n in (150, 120, 90)]
        for s, n in zip(seqs, (150, 120, 90)):
            self.step([(s, n)], same_stats)
        for t in range(8):
            self.step([(seqs[t % 3], [int(self.rng.integers(0, 1000))]),
                       (seqs[(t + 1) % 3], [int(self.rng.integers(0, 1000))])], same_stats)
        for s in seqs:  # no block holds another sequence's K/V, whichever tier holds it
            slots = self.host.sequence_slots(s)
            for layer in range(L):
                K, V = self.run.kv[s][layer]
                for c in range(K.shape[0] // C):
                    for h in range(HKV):
                        np.testing.assert_array_equal(self.call(self.host.read_tile, layer, slots[c], 0, h),
                                                      K[c * C:(c + 1) * C, h])
                        np.testing.assert_array_equal(self.call(self.host.read_tile, layer, slots[c], 1, h),
                                                      V[c * C:(c + 1) * C, h])
        return seqs


@pytest.mark.parametrize("spec,exc,needle", [
    ("write=EIO@0x1", OSError, "eviction.spill_path"),
    ("write=EIO@5x3", OSError, "Input/output error"),
    ("write=ENOSPC@2x2", "capacity", "eviction.spill_path"),
    ("fallocate=ENOSPC@0x2", "capacity", "eviction.spill_path"),
    ("fallocate=EIO@1x1", OSError, "reserving"),
    ("alloc=ENOMEM@3x2", "capacity", "could not allocate"),
])
def test_injected_storage_faults_surface_at_the_next_call_and_lose_nothing(cv, seed, tmp_path, spec, exc, needle):
    host = cv.KVCache(_spill_cfg(cv, tmp_path / "spill.bin", host_blocks=4),
                      test_hooks={"faults": spec, "backup_delay_us": 200})
    if exc == "capacity":
        exc = cv.CapacityError
    fr = FaultRun(cv, np.random.default_rng(seed), host, ((exc,), needle))
    fr.workload()
    assert fr.errors, "the injected fault never surfaced"
    assert host.stats()["evict_spill_bytes_in_use"] > 0


def test_injected_read_faults_are_errors_never_other_kv(cv, seed, tmp_path):
    """A failed read during attention may have recalled other chunks already (residency
    counters move), but no device slot ever holds bytes that were not verified."""
    host = cv.KVCache(_spill_cfg(cv, tmp_path / "spill.bin", host_blocks=2), test_hooks={"faults": "read=EIO@3x4"})
    fr = FaultRun(cv, np.random.default_rng(seed), host, ((OSError,), "eviction.spill_path: reading block"))
    fr.workload(same_stats=False)
    assert len(fr.errors) == 4


def test_a_bad_fault_spec_names_the_hook(cv, tmp_path):
    with pytest.raises(ValueError, match="test_hooks.faults"):
        cv.KVCache(_spill_cfg(cv, tmp_path / "spill.bin"), test_hooks={"faults": "write=EIO"})
