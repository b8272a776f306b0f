"""chunkvale: a prefix-sharing, chunked KV-cache engine for LLM inference."""
from . import _native
from ._native import CacheStats, PagedAttention, PagedPlan, StepNeeds, plan_paged
from .errors import CapacityError
from .cache import KVCache, Step
from .config import CacheConfig, Eviction

__version__ = "0.1.0"
__all__ = ["CacheConfig", "CacheStats", "CapacityError", "Eviction", "KVCache", "PagedAttention", "PagedPlan",
           "Step", "StepNeeds", "plan_paged",
           "cuda_available", "cuda_built", "kernel_isa", "kernel_isa_report", "kernel_isas"]


def cuda_built() -> bool:
    """Whether this build contains the CUDA backend."""
    return bool(_native.cuda_built())


def cuda_available() -> bool:
    """Whether the CUDA backend is built and a GPU is usable (cudaGetDeviceCount > 0 at
    run time; False without a driver or a visible GPU)."""
    return cuda_built() and int(_native.cuda_device_count()) > 0


def kernel_isa() -> str:
    """The CPU kernels' instruction set chosen at run time: amx_bf16, avx512bf16, avx512, avx2
    or generic."""
    return _native.kernel_isa()


def kernel_isas() -> list:
    """Every CPU kernel instruction set this CPU runs, best first; any of them can be
    forced with ``CacheConfig(kernel_isa=...)`` (or ``CHUNKVALE_KERNEL_ISA``).
    ``kernel_isa_report()`` says why the others do not run."""
    return list(_native.kernel_isas())


def kernel_isa_report() -> dict:
    """Every instruction set chunkvale knows, best first, mapped to "" where it runs here and
    otherwise to why not: not in this build, missing from the CPU, or (amx_bf16) AMX tile state
    refused by the kernel (arch_prctl; a seccomp filter, an old kernel), in which case the best
    AVX-512 kernels run instead."""
    return dict(_native.kernel_isa_report())


def _warn_if_amx_refused() -> None:
    """A CPU with AMX whose kernel refused tile state runs slower kernels: say so once."""
    why = kernel_isa_report().get("amx_bf16", "")
    if "refused" in why or "XCR0" in why:
        import warnings
        warnings.warn(f"chunkvale: the amx_bf16 kernels do not run ({why}); using {kernel_isa()}",
                      RuntimeWarning, stacklevel=2)


_warn_if_amx_refused()
