"""Cache configuration (a plain dataclass; the native core validates it)."""
from __future__ import annotations

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

    Not yet built: the host tier that frees device memory of unselected chunks
    (``host_bytes``, ``spill_path``); chunks stay resident, only attention is budgeted.
    """

    budget_tokens: int
    sink_chunks: int = 1
    window_chunks: int = 2
    topk_chunks: Optional[int] = None
    digest: str = "cuboid_max"
    dense_layers: int = 2
    host_bytes: Optional[int] = None
    spill_path: Optional[str] = None

    def native_kwargs(self) -> dict:
        if self.host_bytes is not None or self.spill_path is not None:
            raise ValueError("eviction.host_bytes/spill_path: the host tier is not implemented yet; "
                             "leave them None (chunks stay resident, attention is budgeted)")
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
                    digest=str(self.digest), dense_layers=self.dense_layers)


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
        evict = self.eviction.native_kwargs() if self.eviction is not None else {}
        return dict(
            **evict,
            layers=self.layers, q_heads=self.q_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, chunk_size=self.chunk_size, dtype=dtype,
            capacity_chunks=int(self.capacity_chunks or 0),
            capacity_bytes=int(self.capacity_bytes or 0), threads=self.threads,
            share_threshold=self.share_threshold,
            sm_scale=float(self.sm_scale) if self.sm_scale is not None else 0.0,
            device=str(self.device))


def _dtype_name(dtype) -> str:
    """Accepts 'float32'-style names, numpy dtypes and torch dtypes."""
    if isinstance(dtype, str):
        return dtype
    name = str(dtype)
    for known in ("bfloat16", "float16", "float32"):
        if name.endswith(known):
            return known
    raise ValueError(f"dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype!r}")
