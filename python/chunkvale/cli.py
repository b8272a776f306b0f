"""``chunkvale`` command line: ``demo``, ``generate`` and ``bench`` (also ``python -m chunkvale``)."""

from __future__ import annotations

import argparse
import os
import sys


def _threads(n: int) -> None:
    # One knob for both thread pools (torch's matmuls and chunkvale's attention): on a small or
    # busy machine, fewer threads than cores avoids the pools spinning against each other.
    if n < 0:
        raise SystemExit(f"chunkvale: --threads: expected >= 0, got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a local transformers model directory; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per KV chunk (16..128, power of two)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and chunkvale (0 = all cores)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


_EVICTION_FIELDS = ("digest", "selection", "sink_chunks", "window_chunks", "topk_chunks", "dense_layers")  # flag = field


def eviction_from_args(args, error):
    """The ``chunkvale.Eviction`` the ``generate`` flags ask for (None without --kv-budget);
    ``error(message)`` reports a flag that is given without the flag it needs."""
    given = {name: getattr(args, name) for name in
             [*_EVICTION_FIELDS, "device_kv_tokens", "host_bytes", "spill_path"] if getattr(args, name) is not None}
    if args.kv_budget is None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            error(f"{flags}: configure eviction, which needs --kv-budget TOKENS (not given)")
        return None
    if args.host_bytes is not None and args.device_kv_tokens is None:
        error("--host-bytes: bounds the host tier, which needs --device-kv-tokens TOKENS (not given)")
    if args.spill_path is not None and args.host_bytes is None:
        error("--spill-path: holds host copies past --host-bytes, which is not given")
    if args.device_kv_tokens is not None and args.device_kv_tokens < args.chunk_size:
        error(f"--device-kv-tokens: expected at least one chunk (--chunk-size {args.chunk_size} tokens), "
              f"got {args.device_kv_tokens}")
    from .config import Eviction

    kwargs = {name: given[name] for name in _EVICTION_FIELDS if name in given}
    if args.device_kv_tokens is not None:
        kwargs["device_chunks"] = args.device_kv_tokens // args.chunk_size
    return Eviction(budget_tokens=args.kv_budget, host_bytes=args.host_bytes, spill_path=args.spill_path,
                    **kwargs)


_FLAG_OF_FIELD = {"budget_tokens": "--kv-budget", "device_chunks": "--device-kv-tokens", "host_bytes": "--host-bytes",
                  "spill_path": "--spill-path", **{f: "--" + f.replace("_", "-") for f in _EVICTION_FIELDS}}


def _name_the_flag(message: str) -> str:
    """The core names an Eviction field ("eviction.window_chunks: ..."); say which flag set it."""
    field = message.split(":", 1)[0].removeprefix("eviction.")
    if message.startswith("eviction.") and field in _FLAG_OF_FIELD:
        return f"{_FLAG_OF_FIELD[field]}: {message}"
    return message


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chunkvale", description="Prefix-sharing KV cache for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve chat requests sharing a long system prompt; compare with transformers")
    _add_model_args(demo)
    demo.add_argument("--requests", type=int, default=16)
    demo.add_argument("--system-tokens", type=int, default=1500, help="length of the shared system prompt")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    demo.add_argument("--no-baseline", action="store_true", help="skip the transformers generate comparison")
    demo.add_argument("--samples", type=int, default=3, help="answers to print")
    demo.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")

    gen = sub.add_parser("generate", help="complete the prompts of a JSONL file")
    _add_model_args(gen)
    gen.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                     help='one request per line: {"prompt": ...} | {"messages": [...]} | {"token_ids": [...]}, '
                          "optional max_new_tokens, temperature, top_p, seed, n, stop, namespace, ignore_eos, id")
    gen.add_argument("--out", default="-", metavar="FILE.jsonl",
                     help="where to write completions (default stdout), one line per request as it finishes; "
                          "failed requests get an error record and the exit status 1")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="default for requests that do not say")
    gen.add_argument("--temperature", type=float, default=0.0, help="default for requests that do not say")
    gen.add_argument("--kv-tokens", type=int, default=32768, help="KV cache capacity in tokens")
    gen.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together")
    gen.add_argument("--no-progress", action="store_true")
    ev = gen.add_argument_group(
        "eviction", "budgeted decode attention and a bounded device tier backed by host memory "
                    "(chunkvale.Eviction; docs/API.md). Every flag below needs --kv-budget.")
    ev.add_argument("--kv-budget", type=_int_at_least(1), default=None, metavar="TOKENS",
                    help="turn eviction on: a decoding sequence longer than this attends to its sink, window "
                         "and top-k chunks only, whole chunks of at most this many tokens in all "
                         "(eviction.budget_tokens)")
    ev.add_argument("--digest", default=None, choices=["cuboid_max", "cuboid_mean", "sphere"],
                    help="chunk key digest that scores chunks for top-k (default cuboid_max)")
    ev.add_argument("--selection", default=None, choices=["per_kv_head", "shared"],
                    help="each KV head its own top-k chunks, or one set for every head (default per_kv_head; "
                         "shared with --device-kv-tokens, which keeps one set per sequence on the device)")
    ev.add_argument("--sink-chunks", type=_int_at_least(0), default=None, metavar="N",
                    help="first chunks always attended (default 1)")
    ev.add_argument("--window-chunks", type=_int_at_least(0), default=None, metavar="N",
                    help="last chunks always attended (default 2)")
    ev.add_argument("--topk-chunks", type=_int_at_least(0), default=None, metavar="N",
                    help="best-scoring chunks attended (default: what the budget leaves after the sink and window "
                         "chunks; 0: none); sink + window + top-k chunks must fit in --kv-budget")
    ev.add_argument("--dense-layers", type=_int_at_least(0), default=None, metavar="N",
                    help="first layers that attend to everything and keep every chunk (default 2)")
    ev.add_argument("--device-kv-tokens", type=_int_at_least(1), default=None, metavar="TOKENS",
                    help="host tier: K/V tokens each evicting layer keeps on the device, rounded down to whole "
                         "chunks (eviction.device_chunks); the rest lives in host memory and is recalled")
    ev.add_argument("--host-bytes", type=_int_at_least(1), default=None, metavar="BYTES",
                    help="bound on host memory for chunk copies (default unbounded); needs --device-kv-tokens")
    ev.add_argument("--spill-path", default=None, metavar="FILE",
                    help="file for host copies past --host-bytes; needs --host-bytes")

    parser.generate_parser = gen  # main() reports eviction flag conflicts in its name
    bench = sub.add_parser("bench", help="run the benchmark suites and draw their plots")
    bench.add_argument("--suite", default=None, metavar="DIR",
                       help="folder (or one test_*.py file) of pytest-benchmark suites "
                            "(default: bench/ of this checkout)")
    bench.add_argument("--out", default="bench-results", metavar="DIR", help="JSON and PNGs go here")
    bench.add_argument("-k", default=None, metavar="EXPR", help="only benchmarks matching this pytest -k expression")
    return parser


def main(argv: list[str] | None = None) -> int:
    # chunkvale's attention runs between torch ops in every layer. Spinning OpenMP workers (the
    # default) keep the cores busy after each torch op, so the attention threads wait for a
    # time slice; on a 2-core machine that cost 2-4x per step. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        args.eviction = eviction_from_args(args, parser.generate_parser.error)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "generate":
            from . import generate_cmd

            _threads(args.threads)
            return generate_cmd.run(args)
        if args.command == "bench":
            from . import bench_cmd

            return bench_cmd.run(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError, KeyError) as e:
        # Bad input is reported as one line naming what was wrong, not as a traceback.
        print(f"chunkvale {args.command}: error: {_name_the_flag(str(e))}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _demo(args) -> int:
    import json

    from .demo import DemoOptions, run

    _threads(args.threads)
    numbers = run(DemoOptions(model=args.model, requests=args.requests, system_tokens=args.system_tokens,
                              max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size, device=args.device,
                              dtype=args.dtype, ignore_eos=args.ignore_eos, baseline=not args.no_baseline,
                              samples=args.samples, threads=args.threads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
