"""Cache configuration (a plain dataclass; the native core validates it)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass
class Eviction:
    """Budgeted attention for long contexts (ArkVale-style selection).

    During decode, a sequence longer than ``budget_tokens`` attends, in each layer from
    ``dense_layers`` on, only to its first ``sink_chunks`` chunks, its last ``window_chunks``
    chunks and the ``topk_chunks`` chunks whose key digest scores highest for its query
    (default: ArkVale's min(1280, budget/2) tokens, in chunks; 0: none, a StreamingLLM-style
    sink + window baseline). Prefill and extend attend to
    everything. ``digest``: "cuboid_max" (Quest's min/max bound), "cuboid_mean" (ArkVale's
    centre + mean deviation) or "sphere" (centre + radius).

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
    device_chunks: Optional[int] = None  # last: positional calls written before it still mean the same

    def native_kwargs(self) -> dict:
        for name in ("device_chunks", "host_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"eviction.{name}: expected an int or None, got {type(value).__name__}")
            if value is not None and value < 1:
                raise ValueError(f"eviction.{name}: expected None or an integer >= 1, got {value}")
        if self.spill_path is not None:
            if not isinstance(self.spill_path, (str, os.PathLike)):
                raise TypeError(f"eviction.spill_path: expected a str or os.PathLike or None, "
                                f"got {type(self.spill_path).__name__}")
            if not os.fspath(self.spill_path):
                raise ValueError("eviction.spill_path: expected a file path or None, got ''")
        for name in ("budget_tokens", "sink_chunks", "window_chunks", "dense_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"eviction.{name}: expected an int, got {type(value).__name__}")
        if self.budget_tokens < 1:
            raise ValueError(f"eviction.budget_tokens: expected an integer >= 1, got {self.budget_tokens}")
        if self.topk_chunks is not None and (isinstance(self.topk_chunks, bool) or not isinstance(self.topk_chunks, int)
                                             or self.topk_chunks < 0):
            raise ValueError(f"eviction.topk_chunks: expected None or an integer >= 0, got {self.topk_chunks}")
        return dict(budget_tokens=self.budget_tokens, sink_chunks=self.sink_chunks,
                    window_chunks=self.window_chunks,
                    topk_chunks=0 if self.topk_chunks is None else (self.topk_chunks or -1),
                    digest=str(self.digest), dense_layers=self.dense_layers,
                    device_chunks=self.device_chunks or 0, host_bytes=self.host_bytes or 0,
                    spill_path="" if self.spill_path is None else str(os.fspath(self.spill_path)))


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
    kernel_isa: Optional[str] = None  # CPU kernels: None = best; or one of chunkvale.kernel_isas()

    def native_kwargs(self) -> dict:
        dtype = _dtype_name(self.dtype)
        if self.capacity_chunks is None and self.capacity_bytes is None:
            raise ValueError("capacity_chunks/capacity_bytes: expected one of them, got neither")
        for name in ("layers", "q_heads", "kv_heads", "head_dim", "chunk_size", "threads",
                     "share_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if self.eviction is not None and not isinstance(self.eviction, Eviction):
            raise TypeError(f"eviction: expected chunkvale.Eviction or None, got {type(self.eviction).__name__}")
        if self.kernel_isa is not None and not isinstance(self.kernel_isa, str):
            raise TypeError(f"kernel_isa: expected a str or None, got {type(self.kernel_isa).__name__}")
        evict = self.eviction.native_kwargs() if self.eviction is not None else {}
        return dict(
            **evict,
            layers=self.layers, q_heads=self.q_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, chunk_size=self.chunk_size, dtype=dtype,
            capacity_chunks=int(self.capacity_chunks or 0),
            capacity_bytes=int(self.capacity_bytes or 0), threads=self.threads,
            share_threshold=self.share_threshold,
            sm_scale=float(self.sm_scale) if self.sm_scale is not None else 0.0,
            device=str(self.device), kernel_isa=self.kernel_isa or "")


def _dtype_name(dtype) -> str:
    """Accepts 'float32'-style names, numpy dtypes and torch dtypes."""
    if isinstance(dtype, str):
        return dtype
    name = str(dtype)
    for known in ("bfloat16", "float16", "float32"):
        if name.endswith(known):
            return known
    raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
