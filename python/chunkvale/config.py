"""Cache configuration (a plain dataclass; the native core validates it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    chunk_size: int = 32
    dtype: str = "float32"
    capacity_chunks: Optional[int] = None
    capacity_bytes: Optional[int] = None
    device: str = "cpu"
    threads: int = 0
    share_threshold: int = 2
    sm_scale: Optional[float] = None
    namespace_default: str = field(default="", repr=False)

    def native_kwargs(self) -> dict:
        dtype = _dtype_name(self.dtype)
        if self.capacity_chunks is None and self.capacity_bytes is None:
            raise ValueError("capacity_chunks/capacity_bytes: expected one of them, got neither")
        for name in ("layers", "q_heads", "kv_heads", "head_dim", "chunk_size", "threads",
                     "share_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        return dict(
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
