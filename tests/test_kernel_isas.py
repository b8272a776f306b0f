"""The CPU kernels' instruction sets as a user sees them: kernel_isas() lists exactly the ones
kernel_isa_report() says run, every other one is refused by name with the report's reason (never
a SIGILL), CHUNKVALE_KERNEL_ISA is refused the same way, and the matrix-engine path exists in the
report whether or not this CPU or build runs it."""
import os
import subprocess
import sys

import pytest

KNOWN = ["amx_bf16", "avx512bf16", "avx512", "avx2", "generic"]


def test_report_and_list_agree(cv):
    report = cv.kernel_isa_report()
    assert list(report) == KNOWN  # best first
    runs = [isa for isa, why in report.items() if why == ""]
    assert cv.kernel_isas() == runs
    assert cv.kernel_isa() == runs[0]
    assert runs[-1] == "generic"
    for isa, why in report.items():
        assert isinstance(why, str)
        if why:
            assert len(why) > 10, (isa, why)


@pytest.mark.parametrize("isa", KNOWN)
def test_every_isa_runs_or_is_refused_with_its_reason(cv, isa):
    why = cv.kernel_isa_report()[isa]
    cfg = dict(layers=1, q_heads=4, kv_heads=2, head_dim=64, chunk_size=16, dtype="bfloat16", capacity_chunks=8)
    if why:
        with pytest.raises(ValueError, match="kernel_isa") as e:
            cv.KVCache(cv.CacheConfig(kernel_isa=isa, **cfg))
        assert why in str(e.value)
        with pytest.raises(ValueError, match="kernel_isa") as e:
            cv.PagedAttention(4, 2, 64, 32, dtype="bfloat16", kernel_isa=isa)
        assert why in str(e.value)
        return
    cache = cv.KVCache(cv.CacheConfig(kernel_isa=isa, **cfg))
    seq, _ = cache.add_sequence(list(range(20)))
    step = cache.plan([(seq, 20)])
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    k = torch.randn((20, 2, 64), generator=g).to(torch.bfloat16)
    cache.append(0, step, k, k)
    out = cache.attention(0, step, torch.randn((20, 4, 64), generator=g).to(torch.bfloat16))
    assert torch.isfinite(out.float()).all()


def test_environment_forcing_an_isa_this_cpu_lacks_is_named(cv):
    missing = [isa for isa, why in cv.kernel_isa_report().items() if why]
    if not missing:
        pytest.skip("this CPU and build run every instruction set chunkvale has")
    code = ("import chunkvale as cv\n"
            "try:\n"
            "    cv.PagedAttention(4, 2, 64, 32)\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CHUNKVALE_KERNEL_ISA=missing[0]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused: CHUNKVALE_KERNEL_ISA" in r.stdout and cv.kernel_isa_report()[missing[0]] in r.stdout
