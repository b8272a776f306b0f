"""The short form of scripts/soak.py (the long form: docs/NOTES-tests.md): a few hundred
requests with shared prefixes, forks, stops, cancellations, preemption and a spilling host tier;
afterwards nothing is held, RSS and file descriptors are flat, and sampled outputs equal a fresh
engine's."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def load_soak():
    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
    spec = importlib.util.spec_from_file_location("chunkvale_soak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_leaks_nothing_and_matches_fresh_runs(seed):
    lines = []
    problems = load_soak().soak(requests=300, seconds=50, seed=seed % 1000, sample_every=20, log=lines.append)
    assert problems == [], "\n".join(problems[:20] + lines[-1:])
    summary = lines[-1]
    assert "0 problems" in summary and "outputs compared with a fresh run" in summary


def test_soak_flags_are_checked():
    soak = load_soak()
    with pytest.raises(SystemExit):
        soak.main(["--requests", "0"])
