"""The line every CPU benchmark table starts with: CPU model, the kernels' instruction set,
threads and load average, so that no figure outlives the machine it was measured on."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU flags the kernels choose by (AMX, AVX-512 BF16 / FP16, AVX-512, AVX2), as
    /proc/cpuinfo lists them; "none of ..." when it lists none of them."""
    wanted = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")
    have = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    found = [w for w in wanted if w in have]
    return " ".join(found) if found else "none of " + " ".join(wanted)


def bench_isa():
    """CHUNKVALE_BENCH_ISA (or CHUNKVALE_KERNEL_ISA, which every cache obeys) forces one kernel
    instruction set (any of chunkvale.kernel_isas()); None takes the best."""
    return os.environ.get("CHUNKVALE_BENCH_ISA") or os.environ.get("CHUNKVALE_KERNEL_ISA") or None


def describe(threads: int) -> str:
    import chunkvale

    isa = bench_isa() or chunkvale.kernel_isa()
    return (f"{cpu_model()}, {os.cpu_count()} cores, kernels {isa} (this CPU runs "
            f"{'/'.join(chunkvale.kernel_isas())}), {threads} threads, load average "
            f"{os.getloadavg()[0]:.2f}")


def print_uncaptured(request, text: str) -> None:
    """Print past pytest's output capture (the table a benchmark module ends with)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:  # pragma: no cover
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print("\n" + text, flush=True)


def print_table_at_end(results: dict, state: dict, render):
    """A module-scoped autouse fixture: when the module's benchmarks are done, drop the cached
    scenarios (`state`) and print `render()` if any row was measured."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def _print_table(request):
        yield
        state.clear()
        if results:
            print_uncaptured(request, render())

    return _print_table
