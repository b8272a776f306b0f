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
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .config import Eviction

_KEYS = ("share_threshold", "eviction")


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
            raise ValueError(f"CHUNKVALE_VLLM_SHARE_THRESHOLD: expected an integer >= 1, got {v!r}") from None
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
    ev = Eviction(**value)
    ev.to_native()  # every field's type and range, named
    return ev


def options(vllm_config=None) -> Options:
    """This process's options (vllm_config: the engine's, None outside one)."""
    env, cfg = _from_env(), _from_vllm(vllm_config) if vllm_config is not None else {}
    both = sorted(set(env) & set(cfg))
    if both:
        raise ValueError(f"chunkvale option {', '.join(both)} given both in additional_config['chunkvale'] and in "
                         f"the environment (CHUNKVALE_VLLM_{both[0].upper()}); give it once")
    merged = env | cfg
    where = "additional_config['chunkvale']['eviction']" if "eviction" in cfg else "CHUNKVALE_VLLM_EVICTION"
    threshold = merged.get("share_threshold", 2)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"share_threshold: expected an integer >= 1, got {threshold!r}")
    return Options(share_threshold=threshold, eviction=_eviction(merged.get("eviction"), where))
