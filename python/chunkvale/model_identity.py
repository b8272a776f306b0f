"""Whose K/V a KVCache holds: a model's fingerprint, and the namespace its sequences live in.

K/V depend on the model's weights and config as much as on the tokens, so two models sharing a
KVCache must never share its prefix chunks. Every front that attaches a model to a KVCache
(``ChunkvaleCache``, the ``Engine``) scopes the caller's namespace by the model's fingerprint: a
second model on the same KVCache gets prefix trees of its own automatically, and two model
objects holding the same weights and config (one checkpoint loaded twice) share theirs.

The fingerprint is taken once per model object, when it is first attached (weights changed in
place afterwards are not seen): a hash of its config (without paths, versions and the attention
implementation) and, for every parameter and buffer, its name, shape and dtype, the float32 sums
of its blocks of 64 consecutive elements (one pass over every weight, on its device) and the
exact bytes of up to 4096 of its elements, evenly spaced (all of a smaller one).
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref

import torch

_SAMPLE = 4096
_BLOCK = 64
_PREFIX = "model "  # namespaces of model-bound sequences: "model <fingerprint>/<caller's namespace>"
_IGNORED = ("transformers_version", "_name_or_path", "_attn_implementation", "_attn_implementation_internal",
            "_commit_hash")

_lock = threading.Lock()
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def fingerprint(model) -> str:
    """The model's fingerprint (hex, 32 characters), computed once per model object."""
    with _lock:
        fp = _fingerprints.get(model)
        if fp is None:
            fp = _fingerprints[model] = _compute(model)
        return fp


def namespace(model, caller_namespace: str) -> str:
    """The KVCache namespace of ``model``'s sequences in the caller's ``caller_namespace``."""
    return f"{_PREFIX}{fingerprint(model)}/{caller_namespace}"


def _compute(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            flat = t.detach().reshape(-1)
            h.update(f"{name} {tuple(t.shape)} {t.dtype} ".encode())
            if flat.numel() > _SAMPLE:
                index = torch.arange(_SAMPLE, device=flat.device) * (flat.numel() - 1) // (_SAMPLE - 1)
                flat = flat.index_select(0, index)
            if t.is_floating_point():
                h.update(_block_sums(t.detach().reshape(-1)).cpu().numpy().tobytes())
            h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _block_sums(flat: torch.Tensor) -> torch.Tensor:
    """Float32 sums of consecutive blocks of _BLOCK elements (and of the rest): one pass over
    every weight, each sum changed by a change of any of its elements (beyond float32 rounding)."""
    whole = flat.numel() // _BLOCK * _BLOCK
    sums = flat[:whole].view(-1, _BLOCK).sum(dim=1, dtype=torch.float32)
    if whole < flat.numel():
        sums = torch.cat([sums, flat[whole:].sum(dtype=torch.float32).reshape(1)])
    return sums
