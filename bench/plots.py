"""Draw PNG plots from a pytest-benchmark JSON file (``--benchmark-json``).

    python bench/plots.py results.json --out DIR        (``chunkvale bench`` calls draw())

What a benchmark records decides which plots it appears in. Keys are looked up in the record's
``extra_info`` first, then its pytest ``params``:

* speedup vs shared-prefix length (``speedup_vs_shared_prefix.png``): records with a
  shared-prefix length (``shared_tokens`` or ``ns``) and an implementation label (``impl``). For each
  length, speedup = mean time of each other implementation / mean time of ``chunkvale``;
  one line per (other implementation, remaining parameters such as batch size). Times are
  medians (means where a record has none).
* memory vs number of requests (``memory_vs_requests.png``): records with ``requests`` and
  ``kv_bytes`` (optionally ``kv_bytes_unshared``): MiB against the number of requests.
* every group, whatever it records (``time_<group>.png``): mean time per benchmark with its
  standard deviation, so no result is left out of the pictures.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

SHARED_KEYS = ("shared_tokens", "ns", "shared_prefix", "prefix_len", "shared_len")
IMPL_KEYS = ("impl", "backend", "method")
REQUEST_KEYS = ("requests", "num_requests")
# extra_info keys that tell series apart (bench/test_bench_cpu.py: dtype, B sequences, nu private tokens).
SERIES_KEYS = ("dtype", "B", "batch", "nu", "unique_tokens")
OURS = "chunkvale"


def _get(record: dict, keys):
    for where in ("extra_info", "params"):
        d = record.get(where) or {}
        for k in keys:
            if k in d and d[k] is not None:
                return d[k]
    return None


def load(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data["benchmarks"]


def _rest(record: dict, skip) -> str:
    """The record's other parameters, as a series label (e.g. batch size)."""
    extra = record.get("extra_info") or {}
    params = {k: extra[k] for k in SERIES_KEYS if k in extra}
    params.update(record.get("params") or {})
    items = [f"{k}={v}" for k, v in sorted(params.items()) if k not in skip and not isinstance(v, (dict, list))]
    return ", ".join(items)


def _time(record: dict) -> float:
    stats = record["stats"]
    return stats.get("median", stats["mean"])  # the median resists the odd slow round


def speedup_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{label: [(shared_tokens, speedup), ...]} for records that carry both keys."""
    times = defaultdict(dict)  # (rest, impl) -> {x: mean}
    for r in records:
        x, impl = _get(r, SHARED_KEYS), _get(r, IMPL_KEYS)
        if x is None or impl is None:
            continue
        rest = _rest(r, SHARED_KEYS + IMPL_KEYS)
        times[(rest, str(impl))][float(x)] = _time(r)
    series = {}
    for (rest, impl), by_x in times.items():
        if impl == OURS:
            continue
        ours = times.get((rest, OURS), {})
        points = sorted((x, t / ours[x]) for x, t in by_x.items() if x in ours and ours[x] > 0)
        if points:
            series[f"vs {impl}" + (f" ({rest})" if rest else "")] = points
    return series


def memory_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{label: [(requests, MiB), ...]} from records that report kv_bytes."""
    series = defaultdict(list)
    for r in records:
        n = _get(r, REQUEST_KEYS)
        if n is None:
            continue
        rest = _rest(r, REQUEST_KEYS)
        for key, label in (("kv_bytes", "with sharing"), ("kv_bytes_unshared", "without sharing")):
            value = (r.get("extra_info") or {}).get(key)
            if value is not None:
                series[label + (f" ({rest})" if rest else "")].append((float(n), value / 2**20))
    return {k: sorted(v) for k, v in series.items()}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "default"


def draw(json_path, out_dir) -> list[Path]:
    """Write the PNGs for one pytest-benchmark JSON file; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = load(json_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    series = speedup_series(records)
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        # Linear, ticks at the measured lengths: a "no sharing" row (0 tokens) must stay visible.
        ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
        ax.set_xlabel("shared prefix length (tokens)")
        ax.set_ylabel("speedup of chunkvale (x)")
        ax.set_title("Attention speedup vs shared-prefix length")
        ax.legend(fontsize=8)
        save(fig, "speedup_vs_shared_prefix.png")

    series = memory_series(records)
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("number of requests")
        ax.set_ylabel("KV memory (MiB)")
        ax.set_title("KV memory vs number of requests")
        ax.legend(fontsize=8)
        save(fig, "memory_vs_requests.png")

    groups = defaultdict(list)
    for r in records:
        groups[r.get("group") or "default"].append(r)
    for group, recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: r["name"])
        means = [r["stats"]["mean"] for r in recs]
        top = max(means)
        scale, unit = (1e6, "us") if top < 1e-3 else (1e3, "ms") if top < 1 else (1.0, "s")
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(recs) + 1)))
        ax.barh([r["name"] for r in recs], [m * scale for m in means],
                xerr=[r["stats"].get("stddev", 0) * scale for r in recs])
        ax.set_xlabel(f"mean time ({unit})")
        ax.set_title(f"group: {group}")
        ax.tick_params(axis="y", labelsize=7)
        save(fig, f"time_{_safe(group)}.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="pytest-benchmark JSON file")
    p.add_argument("--out", default=".", help="folder for the PNGs")
    args = p.parse_args(argv)
    for path in draw(args.json, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
