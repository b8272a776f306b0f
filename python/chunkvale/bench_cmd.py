"""``chunkvale bench``: run the pytest-benchmark suites, keep their JSON, draw the plots."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def _repo_bench() -> Path:
    # The suites live in the source tree (bench/ next to python/), not in the installed package.
    return Path(__file__).resolve().parents[2] / "bench"


def find_suite(suite: str | None) -> Path:
    candidates = [Path(suite)] if suite else [Path.cwd() / "bench", _repo_bench()]
    for c in candidates:
        if c.is_file() and c.name.startswith("test_") and c.suffix == ".py":
            return c  # one suite file
        if c.is_dir() and any(c.glob("test_*.py")):
            return c
    where = suite or " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"--suite: no pytest-benchmark suites (test_*.py) in {where}; run from a chunkvale "
                            "checkout or pass --suite DIR")


def _plots_module(suite: Path):
    folder = suite if suite.is_dir() else suite.parent
    for path in (folder / "plots.py", _repo_bench() / "plots.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("chunkvale_bench_plots", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"bench/plots.py not found next to {suite} or in the chunkvale checkout")


def run(args) -> int:
    suite = find_suite(args.suite)
    plots = _plots_module(suite)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "benchmarks.json"
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", "--benchmark-only"]
    if args.k:
        cmd += ["-k", args.k]
    print("running:", " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"chunkvale bench: the benchmark run failed (pytest exit code {rc})", file=sys.stderr)
        return rc
    for path in plots.draw(json_path, out):
        print(path)
    print(f"results: {json_path}", file=sys.stderr)
    return 0
