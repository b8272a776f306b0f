"""chunkvale: a prefix-sharing, chunked KV-cache engine for LLM inference."""
from . import _native
from ._native import CacheStats, PagedAttention, PagedPlan, StepNeeds
from .errors import CapacityError
from .cache import KVCache, Step
from .config import CacheConfig, Eviction

__version__ = "0.1.0"
__all__ = ["CacheConfig", "CacheStats", "CapacityError", "Eviction", "KVCache", "PagedAttention", "PagedPlan",
           "Step", "StepNeeds",
           "cuda_available", "cuda_built", "kernel_isa", "kernel_isas"]


def cuda_built() -> bool:
    """Whether this build contains the CUDA backend."""
    return bool(_native.cuda_built())


def cuda_available() -> bool:
    """Whether the CUDA backend is built and a GPU is usable (cudaGetDeviceCount > 0 at
    run time; False without a driver or a visible GPU)."""
    return cuda_built() and int(_native.cuda_device_count()) > 0


def kernel_isa() -> str:
    """The CPU kernels' instruction set chosen at run time (avx512, avx2 or generic)."""
    return _native.kernel_isa()


def kernel_isas() -> list:
    """Every CPU kernel instruction set this CPU runs, best first; any of them can be
    forced with ``CacheConfig(kernel_isa=...)``."""
    return list(_native.kernel_isas())
