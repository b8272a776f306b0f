"""``chunkvale.hf.ChunkvaleCache``: a transformers ``Cache`` that ``generate`` accepts, with the K/V
in a chunkvale :class:`~chunkvale.KVCache` and attention computed by ``KVCache.attention``.

How a forward pass runs (nothing of the model is copied or forked):

- ``ChunkvaleCache(model)`` installs, once per model, a forward pre-hook and an always-called
  forward hook on the ``*ForCausalLM`` module. They do nothing unless the forward's ``cache``
  (``past_key_values``) is a ChunkvaleCache.
- The pre-hook turns the padded ``[B, T]`` batch that ``generate`` hands over into one packed
  chunkvale step, as :class:`chunkvale.hf.ModelRunner` runs it: each row's *real* tokens (the
  2-D ``attention_mask`` tells pads from tokens; only left padding) go into a ``[1, N]``
  ``input_ids`` with their positions from ``step.positions``, pads and prompt tokens already in
  the cache are dropped, ``attention_mask`` becomes a one-element 4-D placeholder (transformers
  builds no mask) and ``logits_to_keep`` the packed rows whose logits are asked for.
- Each attention module calls ``cache.update(k, v, layer_idx)``; it stores nothing itself but
  arms a thread-local flag, so the module's config view (hf.py) names the ``"chunkvale"``
  attention function for this one lookup. That function appends k/v to the step and returns
  ``KVCache.attention``: the hot path is chunkvale's C++ attention; transformers' own attention
  never runs over dense K/V.
- The post-hook scatters the packed logits back to ``[B, columns, vocab]`` (rows of pads and of
  prompt tokens served from the cache are NaN: they were not computed), and commits the
  bookkeeping; when the forward raised it cancels the unfinished step, so the cache is as before.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import cache_users, hf, hf_cache_forward, model_identity
from .cache import KVCache
from .config import _str
from .hf_cache_forward import _ForwardContext
from .hf_cache_rows import _release, _State

_BEAM_MODES = ("beam_search", "beam_sample", "constrained_beam_search", "group_beam_search")
_DEFAULT_CHUNK_SIZE = 64
_DEFAULT_CAPACITY_TOKENS = 8192


class _ChunkvaleLayer(CacheLayerMixin):
    """What transformers reads of one layer of a ChunkvaleCache (lengths, flags); the K/V are in
    the chunkvale KVCache, never in this object."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "ChunkvaleCache"):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("ChunkvaleCache layers are updated through ChunkvaleCache.update")

    def get_seq_length(self) -> int:
        owner = self._owner()
        return 0 if owner is None else owner.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def offload(self):
        pass

    def prefetch(self):
        pass


class ChunkvaleCache(Cache):
    """A transformers ``Cache`` whose K/V live in a chunkvale :class:`~chunkvale.KVCache` and whose
    attention is chunkvale's (``KVCache.attention``)::

        cache = chunkvale.hf.ChunkvaleCache(model)                  # its own KVCache
        out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=32)
        # past_key_values=cache works too (transformers 5 renamed it `cache`, with a FutureWarning)

    Args:
        model: the ``*ForCausalLM`` (Llama, Mistral, Qwen2; ``hf.SUPPORTED_MODEL_TYPES``) that will
            run the generation; the cache only works with this model object.
        kv_cache: a :class:`~chunkvale.KVCache` to keep the K/V in, shared with other
            ChunkvaleCaches (for prefix reuse across calls); its config must match the model
            (``hf.cache_config``). None: a new one of ``chunk_size`` and ``capacity_tokens``.
        chunk_size, capacity_tokens: of the new KVCache (defaults 64 and 8192 tokens; the pool
            is allocated up front). Not allowed with ``kv_cache``.
        namespace: the prefix-tree namespace of this cache's sequences (only equal namespaces
            share chunks).
        threads: CPU threads of the new KVCache's kernels (default 0: all cores). Not allowed
            with ``kv_cache``.

    Batches: the rows of ``input_ids`` may be left-padded prompts of different lengths (the 2-D
    ``attention_mask`` marks pads with 0; right padding or holes are a ValueError). Pads never
    become cache tokens: each row is one chunkvale sequence holding its real tokens, positioned
    from 0 as ``generate`` positions them. Greedy and sampled generation, ``num_return_sequences``
    and ``prefill_chunk_size`` work; greedy fp32 output is token-identical to ``DynamicCache``.

    Prefix reuse, memory *and* compute: a row's prompt is added with ``KVCache.add_sequence``,
    which finds the longest prefix already in the KVCache (from earlier calls, of this object
    after :meth:`reset` or of other ChunkvaleCaches on the same ``kv_cache``). Those tokens are
    dropped from the forward pass altogether (no projections, MLP or attention for them; only the
    uncached suffix is computed, always at least the last prompt token) and their chunks are
    shared, not copied. Rows of one call with identical prompts (``num_return_sequences``) are
    prefilled once and forked. ``reused_tokens`` lists each row's reused count; the KVCache's
    ``stats()`` (``reused_prompt_tokens``, ``chunks_shared``, ...) shows the sharing.

    Several calls: pass the same object again to *continue* its generation (``input_ids`` then
    holds the earlier output plus new tokens, as with DynamicCache), or call :meth:`reset` first
    to start a new one (prompts that do not continue the held tokens are refused with a
    ValueError naming ``past_key_values``), or make a new ChunkvaleCache on ``cache.kv_cache``.
    A released generation's full chunks stay in the KVCache as LRU prefix cache; while it is
    still held (:meth:`reset` keeps it until the next forward has added its prompts) even the
    tokens of a partly filled last chunk are reused. Sequences are released by :meth:`release`,
    :meth:`reset` or when the object is garbage-collected.

    Not supported, each a clear error before anything is computed: beam search (``num_beams``),
    assisted generation, ``use_cache=False``, ``inputs_embeds`` (the prefix tree is keyed by token
    ids), ``output_attentions`` / ``output_hidden_states``, ``labels``, a model other than
    ``model``. One use at a time (cache_users.py): while a generate() or a forward runs on one
    thread, another thread's generate(), forward, reset() or release() of this cache raises
    RuntimeError at once, changing nothing; caches sharing a ``kv_cache`` take turns forward by
    forward (the continuous-batching ``chunkvale.engine.Engine`` batches concurrent requests).
    Rows live under ``namespace`` scoped by the model's fingerprint (model_identity.py): another
    model on the same ``kv_cache`` never reuses this one's K/V.
    Logits of pads and of prompt tokens served from the cache are NaN (``generate`` reads only
    the last position). A forward that raises leaves the cache as it was before that forward.
    """

    def __init__(self, model, kv_cache: Optional[KVCache] = None, *, chunk_size: Optional[int] = None,
                 capacity_tokens: Optional[int] = None, namespace: str = "", threads: Optional[int] = None):
        hf.check_model(model)
        if kv_cache is None:
            chunk_size = _DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
            capacity_tokens = _DEFAULT_CAPACITY_TOKENS if capacity_tokens is None else capacity_tokens
            for name, value in (("chunk_size", chunk_size), ("capacity_tokens", capacity_tokens)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
            if capacity_tokens < 1:
                raise ValueError(f"capacity_tokens: expected an int >= 1, got {capacity_tokens}")
            if chunk_size < 1:  # the config checks the rest (16..128, a power of two)
                raise ValueError(f"chunk_size: expected an int in 16..128 (a power of two), got {chunk_size}")
            kv_cache = KVCache(hf.cache_config(model, chunk_size=chunk_size, threads=threads or 0,
                                               capacity_chunks=-(-capacity_tokens // chunk_size)))
        else:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache: expected a chunkvale.KVCache, got {type(kv_cache).__name__}")
            for name, value in (("chunk_size", chunk_size), ("capacity_tokens", capacity_tokens),
                                ("threads", threads)):
                if value is not None:
                    raise ValueError(f"{name}: set by kv_cache (its config) and cannot be given with it")
            _check_kv_matches(model, kv_cache)
        _str("namespace", namespace)  # a str of valid Unicode, as the KVCache takes it
        self.model = model
        self.kv_cache = kv_cache
        self.namespace = namespace
        # The KVCache namespace of the rows: the caller's, scoped by the model's fingerprint, so
        # that another model on the same kv_cache never reuses this one's K/V (model_identity.py).
        self._kv_namespace = model_identity.namespace(model, namespace)
        self._users = cache_users.Users("this ChunkvaleCache", "a ChunkvaleCache serves one generation at a "
                                        "time; give each thread its own ChunkvaleCache (they may share a kv_cache)")
        self.num_layers = model.config.num_hidden_layers
        self._state = _State()
        self._ctx: Optional[_ForwardContext] = None
        self._user_defined = False
        super().__init__(layers=[_ChunkvaleLayer(self) for _ in range(self.num_layers)])
        finalizer = weakref.finalize(self, _release, kv_cache, self._state)
        finalizer.atexit = False
        hf.register()
        hf_cache_forward.install(model)

    # -- what transformers asks of a cache --
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of the padded batch processed so far (pads included), as transformers counts
        a cache's length; each row's sequence holds only its real tokens."""
        return self._state.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._state.columns + query_length, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by each attention module just before it looks up its attention function: stores
        nothing here (the ``"chunkvale"`` attention function appends k/v to the step) but routes
        that lookup to chunkvale."""
        ctx = self._ctx
        if ctx is None or ctx.thread != threading.get_ident():
            raise RuntimeError(
                "past_key_values (cache): this ChunkvaleCache only works in forward passes of the model it was "
                f"made for ({type(self.model).__name__} at {id(self.model):#x}), which prepare a chunkvale step; "
                "make a ChunkvaleCache for this model"
            )
        hf._in_step.route = True
        return key_states, value_states

    def reorder_cache(self, beam_idx):
        raise ValueError("num_beams: ChunkvaleCache does not support beam search (it reorders the cache every "
                         "step); use num_beams=1, or transformers' DynamicCache for beam search")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError("ChunkvaleCache cannot drop tokens (crop): assisted generation and other rollbacks are "
                         "not supported; use transformers' DynamicCache for them")

    def batch_repeat_interleave(self, repeats: int):
        raise ValueError("ChunkvaleCache does not support reshaping the batch of a running generation "
                         "(batch_repeat_interleave)")

    def batch_select_indices(self, indices):
        raise ValueError("ChunkvaleCache does not support selecting rows of a running generation "
                         "(batch_select_indices)")

    def reset(self) -> None:
        """Start a new generation: the next ``generate`` call's prompts are new rows. The held
        sequences stay in the KVCache until that call has added its prompts (so it reuses every
        cached token of theirs, partial chunks included), then they are removed."""
        cache_users.claim(sys._getframe(), "reset()", self._users, cache_users.of_kv(self.kv_cache))
        st = self._state
        if st.step is not None:
            st.step.cancel()  # idempotent; a committed step stays committed
            st.step = None
        st.retired.extend(s for s in st.seqs if s is not None)
        st.seqs, st.tokens, st.reused, st.columns = [], [], [], 0

    def release(self) -> None:
        """Remove this cache's sequences from the KVCache now (their full chunks stay as LRU
        prefix cache) and start empty."""
        cache_users.claim(sys._getframe(), "release()", self._users, cache_users.of_kv(self.kv_cache))
        self._state.release(self.kv_cache)

    def __copy__(self):
        raise TypeError("ChunkvaleCache cannot be copied: its rows are sequences of one KVCache; make a new "
                        "ChunkvaleCache(model, cache.kv_cache) to share the cached prefixes")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce__(self):
        self.__copy__()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # -- inspection --
    @property
    def sequences(self) -> List[Optional[int]]:
        """The KVCache sequence id of each row (None: no real token yet)."""
        return list(self._state.seqs)

    @property
    def reused_tokens(self) -> List[Optional[int]]:
        """Per row, the prompt tokens taken from the KVCache instead of being computed (the
        ``n_cached`` of ``add_sequence``; a row forked from an identical prompt of the same batch
        counts its whole prompt)."""
        return list(self._state.reused)

    def row_tokens(self, row: int) -> List[int]:
        """The real tokens of one row held in the cache (prompt and generated, pads excluded)."""
        return list(self._state.tokens[row])

    def __repr__(self):
        st = self._state
        return (f"ChunkvaleCache(rows={len(st.seqs)}, columns={st.columns}, namespace={self.namespace!r}, "
                f"kv_cache chunk_size={self.kv_cache.config.chunk_size})")

    # -- generate() start: refuse what would compute something else --
    @property
    def _is_user_defined(self):
        return self._user_defined

    @_is_user_defined.setter
    def _is_user_defined(self, value):
        # generate() sets this on a cache passed to it, from _prepare_cache_for_generation, before
        # any forward: the one place that sees the generation mode, so unsupported modes are refused
        # while nothing has changed yet (reorder_cache/crop refuse them again if this is bypassed).
        frame = sys._getframe(1)
        if frame.f_code.co_name == "_prepare_cache_for_generation":
            self._check_generate_call(frame)
        self._user_defined = value

    def _check_generate_call(self, frame) -> None:
        # This generate() call holds the cache until it returns (cache_users.py).
        cache_users.claim(frame.f_back or frame, "generate()", self._users)
        local = frame.f_locals
        caller = local.get("self")
        if caller is not None and caller is not self.model:
            raise ValueError(hf_cache_forward._other_model_message(self.model, caller))
        mode = getattr(local.get("generation_mode"), "value", local.get("generation_mode"))
        config = local.get("generation_config")
        num_beams = getattr(config, "num_beams", 1) or 1
        if mode in _BEAM_MODES or num_beams > 1:
            raise ValueError(f"num_beams: ChunkvaleCache does not support beam search (num_beams={num_beams}); "
                             "use num_beams=1, or transformers' DynamicCache for beam search")
        if mode == "assisted_generation":
            raise ValueError("assistant_model / prompt_lookup_num_tokens: ChunkvaleCache does not support "
                             "assisted generation (it rolls the cache back); use transformers' DynamicCache")
        if config is not None and config.use_cache is False:
            raise ValueError("use_cache: ChunkvaleCache needs use_cache=True (with use_cache=False generate "
                             "recomputes the whole sequence every step)")
        st = self._state
        if st.columns == 0:
            return
        # A cache that holds a generation: this call must continue it.
        input_ids = frame.f_back.f_locals.get("input_ids") if frame.f_back is not None else None
        model_kwargs = local.get("model_kwargs") or {}
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            return
        mask = model_kwargs.get("attention_mask")
        ok = input_ids.shape[0] == len(st.seqs) and input_ids.shape[1] > st.columns
        if ok:
            ids = input_ids[:, :st.columns].tolist()
            m = mask[:, :st.columns].tolist() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            for b in range(len(ids)):
                real = [t for j, t in enumerate(ids[b]) if m is None or m[b][j]]
                if real != st.tokens[b]:
                    ok = False
                    break
        if not ok:
            raise ValueError(
                f"past_key_values (cache): this ChunkvaleCache holds a generation of {len(st.seqs)} rows and "
                f"{st.columns} columns that input_ids (shape {list(input_ids.shape)}) does not continue; call "
                "cache.reset() first to start a new generation (its cached chunks are reused), or pass the earlier "
                "output plus new tokens to continue it"
            )


def _check_kv_matches(model, kv: KVCache) -> None:
    want = hf.cache_config(model, chunk_size=kv.config.chunk_size, capacity_chunks=1)
    have = kv.config
    for name in ("layers", "q_heads", "kv_heads", "head_dim", "dtype", "device"):
        if getattr(have, name) != getattr(want, name):
            raise ValueError(f"kv_cache: its {name} is {getattr(have, name)!r}, the model needs "
                             f"{getattr(want, name)!r} (make it with chunkvale.hf.cache_config(model, ...))")
    scale = have.sm_scale if have.sm_scale is not None else have.head_dim ** -0.5
    if not math.isclose(scale, want.sm_scale, rel_tol=1e-6):
        raise ValueError(f"kv_cache: its sm_scale is {scale!r}, the model's attention scaling is {want.sm_scale!r}")
    if getattr(have, "eviction", None) is not None:
        raise ValueError("kv_cache: budgeted attention (eviction) attends to part of the context, which is not "
                         "what the model computes; use a KVCache without eviction")
