"""KVCache: the Python face of the native cache. Glue only: argument normalisation and
output allocation in the caller's tensor kind. ``plan`` returns the native Step itself."""
from __future__ import annotations

from collections.abc import Mapping
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from .config import CacheConfig

_INT32 = (-(2**31), 2**31 - 1)

Mapping.register(_native.CacheStats)  # a read-only mapping of its fields (keys, items, get, ==)


# One planned step, bound to its cache: ``id``, ``num_tokens``, ``seq_ids``, ``row_offsets``
# (rows ``row_offsets[i]:row_offsets[i+1]`` belong to ``seq_ids[i]``), ``positions`` (each row's
# position in its sequence, for RoPE), ``commit()``, ``cancel()``, ``committed``, ``cancelled``.
Step = _native.Step


def _token_list(token_ids, arg: str) -> List[int]:
    if token_ids is None or isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise TypeError(f"{arg}: expected a sequence of int token ids, got {type(token_ids).__name__}")
    try:
        arr = np.asarray(token_ids)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{arg}: expected a sequence of int token ids ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{arg}: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.dtype != object and arr.dtype.kind not in "iu" and arr.size:
        raise TypeError(f"{arg}: expected integer token ids, got dtype {arr.dtype}")
    tokens = arr.tolist()
    for i, t in enumerate(tokens):
        # An object array holds ints too big for int64, or mixed types: name the first bad one.
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{arg}[{i}]: expected an int token id, got {type(t).__name__} ({t!r})")
        if not _INT32[0] <= t <= _INT32[1]:
            raise ValueError(f"{arg}[{i}]: expected a token id in int32 range [{_INT32[0]}, {_INT32[1]}], got {t}")
    return [int(t) for t in tokens]


def _empty_like(x, shape, dtype=None):
    """A new array of the same kind (numpy or torch) and device as x."""
    if isinstance(x, np.ndarray):
        return np.empty(shape, dtype=dtype or x.dtype)
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.empty(shape, dtype=dtype or x.dtype, device=x.device)
    raise TypeError(f"q: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _kind(x, arg: str) -> str:
    if isinstance(x, np.ndarray):
        return "numpy array"
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch tensor"
    raise TypeError(f"{arg}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _torch():
    import sys
    return sys.modules.get("torch")


class KVCache:
    """A prefix-sharing, chunked KV cache with two-phase attention.

    See docs/API.md. Every method validates its arguments and leaves the cache unchanged
    when it raises.
    """

    def __init__(self, config: CacheConfig, *, test_hooks: Optional[dict] = None):
        """``test_hooks`` (tests only): ``{"backup_delay_us": int, "faults": str}``, see docs/API.md."""
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config: expected chunkvale.CacheConfig, got {type(config).__name__}")
        self.config = config
        native = config.to_native()
        if test_hooks is not None:
            native.test_hooks = _test_hooks(test_hooks)
        self._native = _native.KVCache(native)

    # -- sequences --
    def add_sequence(self, token_ids, namespace: str = "", max_reuse: Optional[int] = None) -> Tuple[int, int]:
        """Adds a prompt; returns (sequence id, leading tokens already cached)."""
        tokens = _token_list(token_ids, "token_ids")
        # namespace and max_reuse are checked by the core (type, Unicode, range; never bool).
        return self._native.add_sequence(tokens, namespace, max_reuse)

    def plan(self, entries: Sequence[Tuple[int, Union[int, Sequence[int]]]]) -> Step:
        """Plans one step: each entry is (seq, n_new) for pending prompt tokens or
        (seq, token_ids) for tokens beyond the prompt. Returns the Step: append and attend
        every layer, then ``step.commit()`` (or ``step.cancel()``). A step appended in every
        layer that was not committed is committed here first, then ended."""
        return self._native.plan(_entries(entries))

    def needs(self, entries) -> "_native.StepNeeds":
        """What ``plan(entries)`` needs of each resource and what it can have now; ``plan``
        raises CapacityError exactly when ``not needs(entries).fits``. Changes nothing (a step
        that is open and not committed is a ValueError: commit or cancel it first)."""
        return self._native.needs(_entries(entries))

    def request_needs(self, prompt_tokens: int, max_new_tokens: int, n: int = 1) -> "_native.StepNeeds":
        """What the largest step of one request (a prompt of ``prompt_tokens``, up to
        ``max_new_tokens`` per sample, ``n`` samples) needs running alone in an empty cache,
        against what an empty cache has: a request that does not fit can never run."""
        return self._native.request_needs(prompt_tokens, max_new_tokens, n)

    def append(self, layer: int, step: Step, k, v) -> None:
        """Writes the step's new K/V ([num_tokens, kv_heads, head_dim]) for one layer."""
        self._native.append(layer, _step_arg(step), k, v, _stream_of(k))

    def attention(self, layer: int, step: Step, q, out=None, return_lse: bool = False):
        """Attention of the step's queries ([num_tokens, q_heads, head_dim]) for one layer.

        Returns ``out`` (same shape, dtype and kind as q), or ``(out, lse)`` with
        ``return_lse``: lse is float32 [num_tokens, q_heads], the *natural* log of the
        softmax denominator of the scaled scores (FlashInfer's is base 2).
        """
        kind = _kind(q, "q")
        step = _step_arg(step)
        if not isinstance(return_lse, (bool, np.bool_)):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
        if len(q.shape) != 3:  # before out/lse are allocated from q's shape
            raise ValueError(f"q: expected shape [{step.num_tokens}, {self.config.q_heads}, "
                             f"{self.config.head_dim}], got {list(q.shape)}")
        if out is None:
            out = _empty_like(q, tuple(q.shape))
        elif _kind(out, "out") != kind:
            raise TypeError(f"out: expected a {kind} like q, got a {_kind(out, 'out')}")
        lse = None
        if return_lse:
            if isinstance(q, np.ndarray):
                lse = np.empty((q.shape[0], self.config.q_heads), dtype=np.float32)
            else:
                lse = _empty_like(q, (q.shape[0], self.config.q_heads), dtype=_torch().float32)
        self._native.attention(layer, step, q, out, lse, _stream_of(q))
        return (out, lse) if return_lse else out

    def cancel(self, step: Step) -> None:
        """Drops the open step, which must not be committed: a committed, cancelled, ended or
        foreign step is a ValueError naming ``step``. ``step.cancel()`` is the lenient form for
        rolling back (idempotent; a committed step stays committed, ``step.committed`` says so)."""
        self._native.cancel(_step_arg(step))

    def fork(self, seq: int, n: int) -> List[int]:
        """n new sequences sharing seq's full chunks (its partial tail is copied)."""
        return self._native.fork(seq, n)

    def remove(self, seq: int) -> None:
        self._native.remove(seq)

    def clear(self) -> None:
        """Drops every unreferenced cached prefix chunk."""
        self._native.clear()

    def sequence_length(self, seq: int) -> int:
        """Committed tokens of a sequence (a read: it commits nothing)."""
        return self._native.sequence_length(seq)

    def stats(self) -> "_native.CacheStats":
        """A snapshot: read-only fields, also a read-only mapping (``stats()["chunks_in_use"]``)."""
        return self._native.stats()

    # -- inspection (tests, debugging) --
    def sequence_slots(self, seq: int) -> List[int]:
        return self._native.sequence_slots(seq)

    def read_tile(self, layer: int, slot: int, kv: int, head: int) -> np.ndarray:
        """K (kv=0) or V (kv=1) of one stored chunk tile as float32 [chunk_size, head_dim].
        With the host tier, a chunk that is not on the device in this layer is read from its
        host copy (memory or spill file)."""
        return self._native.read_tile(layer, slot, kv, head)

    def chunk_residency(self, layer: int, slot: int) -> str:
        """Where a chunk's K/V of one layer are (host tier): "device", "host", "device+host"
        or "none"; always "device" in layers that keep everything resident."""
        return self._native.chunk_residency(layer, slot)

    def read_digest(self, layer: int, slot: int, head: int) -> np.ndarray:
        """The digest of one stored chunk as float32 [2, head_dim] (eviction only): (min, max)
        for cuboid_max, (centre, mean deviation) for cuboid_mean, (centre, [radius, 0...]) for sphere."""
        return self._native.read_digest(layer, slot, head)


def _stream_of(x) -> int:
    """The caller's current CUDA stream for a torch CUDA tensor (kernels run on it);
    0 (CUDA's legacy default stream) for anything else."""
    if isinstance(x, np.ndarray):
        return 0
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor) and x.is_cuda:
        return int(torch.cuda.current_stream(x.device).cuda_stream)
    return 0


def _entries(entries):
    """Token ids given as an array (or any sequence but list/tuple) become a list; everything
    else (seq, n_new, their types and ranges) is the core's to check."""
    if not isinstance(entries, (list, tuple)):
        return entries
    norm = []
    for i, e in enumerate(entries):
        if (isinstance(e, (list, tuple)) and len(e) == 2 and not isinstance(e[1], (list, tuple))
                and not isinstance(e[1], (numbers.Integral, str, bytes)) and e[1] is not None
                and hasattr(e[1], "__len__")):
            e = (e[0], _token_list(e[1], f"entries[{i}]: token_ids"))
        norm.append(e)
    return norm


def _step_arg(step) -> Step:
    if isinstance(step, Step):
        return step
    raise TypeError(f"step: expected the Step returned by plan(), got {type(step).__name__}")


def _test_hooks(hooks) -> "_native.TestHooks":
    """Test-only hooks of a cache: every host-tier backup delayed (``backup_delay_us``) and
    injected storage faults (``faults``); docs/API.md. Never for production."""
    if not isinstance(hooks, dict):
        raise TypeError(f"test_hooks: expected a dict or None, got {type(hooks).__name__}")
    unknown = set(hooks) - {"backup_delay_us", "faults"}
    if unknown:
        raise ValueError(f"test_hooks: expected the keys backup_delay_us and faults, got {sorted(unknown)}")
    native = _native.TestHooks()
    delay = hooks.get("backup_delay_us", 0)
    if isinstance(delay, bool) or not isinstance(delay, numbers.Integral):
        raise TypeError(f"test_hooks.backup_delay_us: expected an int, got {type(delay).__name__}")
    if not 0 <= delay <= 10**7:
        raise ValueError(f"test_hooks.backup_delay_us: expected microseconds in [0, 10^7], got {delay}")
    faults = hooks.get("faults", "")
    if not isinstance(faults, str):
        raise TypeError(f"test_hooks.faults: expected a str, got {type(faults).__name__}")
    native.backup_delay_us, native.faults = int(delay), faults
    return native
