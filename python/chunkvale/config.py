"""Cache configuration (a plain dataclass). Types and integer ranges are checked here, so
that every field is named in the error; the native core validates the values."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Optional

from . import _native

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _int(name: str, value, lo=_INT32[0], hi=_INT32[1], optional: bool = False):
    """An int field (numpy integers too; never bool, float or a numeric string) in [lo, hi]."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int or None" if optional else "an int"
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}an integer >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def _str(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str{' or None' if optional else ''}, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: expected valid Unicode text, got {value!r} (a lone surrogate)") from None
    return value


@dataclass
class Eviction:
    """Budgeted attention for long contexts (ArkVale-style selection).

    During decode, a sequence longer than ``budget_tokens`` attends, in each layer from
    ``dense_layers`` on, only to its first ``sink_chunks`` chunks, its last ``window_chunks``
    chunks and the ``topk_chunks`` chunks whose key digest scores highest for its query
    (default: what the budget leaves, ``budget_tokens // chunk_size - sink_chunks -
    window_chunks``; 0: none, a StreamingLLM-style sink + window baseline). Those whole chunks
    never exceed ``budget_tokens`` (``attended_tokens``); a config whose sinks + window + top-k
    would is refused, ``ValueError`` naming ``eviction.topk_chunks``. Prefill and extend attend
    to everything. ``digest``: "cuboid_max" (Quest's min/max bound), "cuboid_mean" (ArkVale's
    centre + mean deviation) or "sphere" (centre + radius).

    ``selection``: "per_kv_head" (each KV head keeps its own top-k chunks, ranked by the largest
    digest bound among its query heads; the same tokens per head), "shared" (one set of chunks
    for every head, ranked by the bound summed over every query head), or None: per_kv_head, and
    shared with the host tier, which keeps one set of chunks per sequence on the device
    (per_kv_head with ``device_chunks`` is a ValueError naming ``eviction.selection``).
    bench/README.md has the measurements that chose the default.

    Host tier (bounded memory): with ``device_chunks`` set, each layer from
    ``dense_layers`` on holds at most that many chunks on the device. Every chunk that fills
    is backed up asynchronously to host memory; a decode step recalls the selected chunks
    that are not on the device and evicts chunks no sequence of the step selected.
    ``host_bytes`` bounds the host copies (None: unbounded); past it they go to the file
    ``spill_path`` (None: no file, a step that would need more raises CapacityError).
    Without ``device_chunks`` every chunk stays resident and only attention is budgeted.
    """

    budget_tokens: int
    sink_chunks: int = 1
    window_chunks: int = 2
    topk_chunks: Optional[int] = None
    digest: str = "cuboid_max"
    dense_layers: int = 2
    host_bytes: Optional[int] = None
    spill_path: Optional[str] = None
    device_chunks: Optional[int] = None  # after the fields above: positional calls written before it still mean the same
    selection: Optional[str] = None  # None: per_kv_head, or shared with the host tier

    def resolved_selection(self) -> str:
        """The selection this config runs: "per_kv_head" or "shared" (None resolved)."""
        return self.to_native().resolved_selection

    def attended_tokens(self, chunk_size: int) -> int:
        """Tokens a budgeted decode row attends at most with chunks of ``chunk_size``: (sinks +
        window + top-k) whole chunks, <= ``budget_tokens`` (the core's rule; checked there)."""
        return self.to_native().attended_tokens(_int("chunk_size", chunk_size, 1))

    def to_native(self):
        """The core's EvictionConfig, every field's type and range checked (errors name it)."""
        device_chunks = _int("eviction.device_chunks", self.device_chunks, 1, _INT32[1], optional=True)
        host_bytes = _int("eviction.host_bytes", self.host_bytes, 1, _INT64[1], optional=True)
        spill_path = self.spill_path
        if spill_path is not None:
            if not isinstance(spill_path, (str, os.PathLike)):
                raise TypeError(f"eviction.spill_path: expected a str or os.PathLike or None, "
                                f"got {type(spill_path).__name__}")
            spill_path = os.fspath(spill_path)
            if isinstance(spill_path, bytes):
                spill_path = os.fsdecode(spill_path)
            if not spill_path:
                raise ValueError("eviction.spill_path: expected a file path or None, got ''")
            if "\0" in spill_path:
                raise ValueError("eviction.spill_path: expected a file path, got one containing a NUL character")
            try:  # a path that names no file this OS can open (e.g. undecodable bytes) is refused here
                os.fsencode(spill_path)
            except UnicodeEncodeError:
                raise ValueError(f"eviction.spill_path: expected a path the file system can encode, "
                                 f"got {spill_path!r}") from None
        budget = _int("eviction.budget_tokens", self.budget_tokens, 1, _INT64[1])
        sink = _int("eviction.sink_chunks", self.sink_chunks, 0)
        window = _int("eviction.window_chunks", self.window_chunks, 1)
        dense = _int("eviction.dense_layers", self.dense_layers, 0)
        if self.topk_chunks is not None and (isinstance(self.topk_chunks, bool)
                                             or not isinstance(self.topk_chunks, numbers.Integral)):
            raise TypeError(f"eviction.topk_chunks: expected an int or None, got {type(self.topk_chunks).__name__}")
        topk = _int("eviction.topk_chunks", self.topk_chunks, 0, optional=True)
        digest = _str("eviction.digest", self.digest)
        selection = _str("eviction.selection", self.selection, optional=True)
        if selection not in (None, "shared", "per_kv_head"):
            raise ValueError(f"eviction.selection: expected 'per_kv_head', 'shared' or None, got {selection!r}")
        e = _native.EvictionConfig()
        e.enabled = True
        e.budget_tokens, e.sink_chunks, e.window_chunks, e.dense_layers = budget, sink, window, dense
        e.topk_chunks = _native.EvictionConfig.TOPK_DEFAULT if topk is None else topk
        e.digest = digest
        e.selection = "auto" if selection is None else selection
        e.device_chunks = device_chunks or 0
        e.host_bytes = host_bytes or 0
        e.spill_path = "" if spill_path is None else spill_path
        return e


@dataclass
class CacheConfig:
    """Shape, chunking, storage and capacity of a :class:`chunkvale.KVCache`.

    Give exactly one of ``capacity_chunks`` (pool slots; a slot is one chunk for every
    layer and KV head) or ``capacity_bytes``.
    """

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    chunk_size: int = 64
    dtype: str = "float32"
    capacity_chunks: Optional[int] = None
    capacity_bytes: Optional[int] = None
    device: str = "cpu"
    threads: int = 0
    share_threshold: int = 2
    sm_scale: Optional[float] = None
    eviction: Optional[Eviction] = None
    kernel_isa: Optional[str] = None  # CPU kernels: None = $CHUNKVALE_KERNEL_ISA, else the best; or one of chunkvale.kernel_isas()

    def attended_tokens(self, chunk_size: int) -> int:
        """Tokens a budgeted decode row attends at most with chunks of ``chunk_size``: (sinks +
        window + top-k) whole chunks, <= ``budget_tokens`` (the core's rule; checked there)."""
        return self.to_native().attended_tokens(_int("chunk_size", chunk_size, 1))

    def to_native(self):
        """The core's CacheConfig, every field's type and range checked (errors name it)."""
        dtype = _dtype_name(self.dtype)
        ints = {name: _int(name, getattr(self, name))
                for name in ("layers", "q_heads", "kv_heads", "head_dim", "chunk_size", "threads",
                             "share_threshold")}
        capacity_chunks = _int("capacity_chunks", self.capacity_chunks, 0, _INT64[1], optional=True)
        capacity_bytes = _int("capacity_bytes", self.capacity_bytes, 0, _INT64[1], optional=True)
        if capacity_chunks is None and capacity_bytes is None:
            raise ValueError("capacity_chunks/capacity_bytes: expected one of them, got neither")
        sm_scale = self.sm_scale
        if sm_scale is not None:
            if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
                raise TypeError(f"sm_scale: expected a float or None, got {type(sm_scale).__name__} ({sm_scale!r})")
            # PagedAttention's check: float32 > 0, so a tiny value never rounds to 0 (the core's default).
            sm_scale = _native.sm_scale_arg(float(sm_scale))
        device = _str("device", self.device)
        if self.eviction is not None and not isinstance(self.eviction, Eviction):
            raise TypeError(f"eviction: expected chunkvale.Eviction or None, got {type(self.eviction).__name__}")
        kernel_isa = _str("kernel_isa", self.kernel_isa, optional=True)
        c = _native.CacheConfig()
        for name, value in ints.items():
            setattr(c, name, value)
        c.dtype = dtype
        c.capacity_chunks, c.capacity_bytes = capacity_chunks or 0, capacity_bytes or 0
        c.sm_scale = 0.0 if sm_scale is None else sm_scale  # 0: the core's default, 1/sqrt(head_dim)
        c.device = device
        c.kernel_isa = kernel_isa or ""
        if self.eviction is not None:
            c.eviction = self.eviction.to_native()
        return c


def _dtype_name(dtype) -> str:
    """Accepts 'float32'-style names, numpy dtypes and torch dtypes."""
    if isinstance(dtype, str):
        return _str("dtype", dtype)
    name = str(dtype)
    for known in ("bfloat16", "float16", "float32"):
        if name.endswith(known):
            return known
    raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
