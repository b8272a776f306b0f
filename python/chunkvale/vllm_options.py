"""chunkvale's options inside vLLM, from vLLM's ``--additional-config`` or the environment.

  --additional-config '{"chunkvale": {"share_threshold": 2,
                                      "eviction": {"budget_tokens": 2048, "topk_chunks": 8}}}'
  CHUNKVALE_VLLM_SHARE_THRESHOLD=N   query rows a shared block needs to run chunk-first (default 2)
  CHUNKVALE_VLLM_EVICTION='{"budget_tokens": 2048, ...}'   budgeted attention (JSON)

``eviction`` takes chunkvale.Eviction's fields, chunks meaning vLLM's blocks: a decode row of a
request longer than ``budget_tokens`` attends, in each layer from ``dense_layers`` on, to its
first ``sink_chunks`` blocks, its last ``window_chunks`` blocks and the ``topk_chunks`` blocks
whose key digest scores highest for its query. vLLM keeps owning residency (every block stays in
its KV cache), so the host-tier fields (device_chunks, host_bytes, spill_path) are refused. An
option given both ways is refused rather than one silently winning.

Every option is checked when it is read, by the rules PagedAttention applies
(``chunkvale._native.check_paged_options``: share_threshold an int in [1, 2^31-1]; every Eviction
field's type and range, the budget against vLLM's block size), and each error names the
environment variable or the ``additional_config`` key the value came from. In JSON, integer
fields take integers only: ``2.0``, ``true``, ``"2"`` and ``null`` are TypeErrors (``null`` is
allowed where None means something: topk_chunks, the default).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from . import _native
from .config import Eviction

_KEYS = ("share_threshold", "eviction")
_ENV = {"share_threshold": "CHUNKVALE_VLLM_SHARE_THRESHOLD", "eviction": "CHUNKVALE_VLLM_EVICTION"}
# Without vLLM's config (options(None)) the budget is checked against the smallest block size;
# the block size vLLM runs with is checked when it is known.
_SMALLEST_BLOCK = 16


@dataclass(frozen=True)
class Options:
    share_threshold: int = 2
    eviction: Eviction | None = None


def _from_env() -> dict:
    out = {}
    if (v := os.environ.get("CHUNKVALE_VLLM_SHARE_THRESHOLD", "").strip()):
        try:
            out["share_threshold"] = int(v)
        except ValueError:
            raise ValueError(f"CHUNKVALE_VLLM_SHARE_THRESHOLD: expected an integer in [1, 2^31-1], got {v!r}") from None
    if (v := os.environ.get("CHUNKVALE_VLLM_EVICTION", "").strip()):
        try:
            out["eviction"] = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"CHUNKVALE_VLLM_EVICTION: expected a JSON object of chunkvale.Eviction fields, "
                             f"got {v!r} ({e.msg})") from None
    return out


def _from_vllm(vllm_config) -> dict:
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        return {}
    ours = extra.get("chunkvale", {})
    if not isinstance(ours, dict):
        raise ValueError(f"additional_config['chunkvale']: expected an object, got {type(ours).__name__}")
    unknown = sorted(set(ours) - set(_KEYS))
    if unknown:
        raise ValueError(f"additional_config['chunkvale']: expected keys among {', '.join(_KEYS)}, "
                         f"got {', '.join(unknown)}")
    return dict(ours)


def _eviction(value, where: str) -> Eviction | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object of chunkvale.Eviction fields, got {type(value).__name__}")
    fields = {f.name for f in dataclasses.fields(Eviction)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"{where}: expected chunkvale.Eviction fields ({', '.join(sorted(fields))}), "
                         f"got {', '.join(unknown)}")
    if "budget_tokens" not in value:
        raise ValueError(f"{where}: expected budget_tokens (the tokens past which decode rows select)")
    for host in ("device_chunks", "host_bytes", "spill_path"):
        if value.get(host) is not None:
            raise ValueError(f"{where}.{host}: expected None (vLLM owns residency: every block stays in its "
                             f"KV cache; only attention is budgeted), got {value[host]!r}")
    return Eviction(**value)  # its fields are checked with the rest, in _check


def _block_size(vllm_config) -> int | None:
    size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check(threshold, eviction: Eviction | None, block_size: int | None, where: dict) -> None:
    """PagedAttention's rules for these options; an error names where the value came from."""
    try:
        _native.check_paged_options(threshold, eviction, _SMALLEST_BLOCK if block_size is None else block_size)
    except (TypeError, ValueError) as e:
        msg = str(e)
        if msg.startswith("share_threshold"):
            raise type(e)(where["share_threshold"] + msg[len("share_threshold"):]) from None
        field = msg.removeprefix("eviction.")  # the core names some fields without the prefix
        if field.split(":")[0] in {f.name for f in dataclasses.fields(Eviction)}:
            block = "" if block_size is None else f" (vLLM's block_size={block_size}: a chunk is a block)"
            raise type(e)(f"{where['eviction']}.{field}{block}") from None
        raise


def options(vllm_config=None) -> Options:
    """This process's options (vllm_config: the engine's, None outside one), checked whole."""
    env, cfg = _from_env(), _from_vllm(vllm_config) if vllm_config is not None else {}
    both = sorted(set(env) & set(cfg))
    if both:
        raise ValueError(f"chunkvale option {', '.join(both)} given both in additional_config['chunkvale'] and in "
                         f"the environment (CHUNKVALE_VLLM_{both[0].upper()}); give it once")
    merged = env | cfg
    where = {k: f"additional_config['chunkvale']['{k}']" if k in cfg else _ENV[k] for k in _KEYS}
    threshold = merged.get("share_threshold", 2)
    eviction = _eviction(merged.get("eviction"), where["eviction"])
    _check(threshold, eviction, _block_size(vllm_config), where)
    return Options(share_threshold=threshold, eviction=eviction)
