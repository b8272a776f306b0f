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

import inspect
import math
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import hf
from .cache import KVCache

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


@dataclass
class _State:
    """A generation's rows, shared with the finalizer that releases their sequences."""

    seqs: List[Optional[int]] = field(default_factory=list)  # per row; None: no real token yet
    tokens: List[List[int]] = field(default_factory=list)    # per row, its real tokens so far
    reused: List[Optional[int]] = field(default_factory=list)  # per row: n_cached of add_sequence
    retired: List[int] = field(default_factory=list)  # a reset's sequences, removed at the next forward
    columns: int = 0  # columns of the padded layout processed (what transformers calls the cache length)
    step: Any = None  # the step of a forward in flight

    def release(self, kv: KVCache) -> None:
        if self.step is not None:
            try:
                kv.cancel(self.step)
            except (ValueError, KeyError):  # complete (committed) or already ended
                pass
            self.step = None
        seqs = [s for s in self.seqs if s is not None] + self.retired
        self.seqs, self.tokens, self.reused, self.retired, self.columns = [], [], [], [], 0
        _remove_all(kv, seqs)


# Sequences that could not be removed when their cache was released because another cache's
# forward on the same KVCache was in flight (a garbage collection can run in the middle of one):
# the next forward of any ChunkvaleCache on that KVCache removes them.
_orphans: "weakref.WeakKeyDictionary[KVCache, list]" = weakref.WeakKeyDictionary()
_orphans_lock = threading.Lock()


def _remove_all(kv: KVCache, seqs) -> None:
    for i, seq in enumerate(seqs):
        try:
            kv.remove(seq)
        except KeyError:
            pass
        except ValueError:  # a step of another cache is unfinished: remove them later
            with _orphans_lock:
                _orphans.setdefault(kv, []).extend(seqs[i:])
            return


def _remove_orphans(kv: KVCache) -> None:
    with _orphans_lock:
        seqs = _orphans.pop(kv, None)
    if seqs:
        _remove_all(kv, seqs)


def _release(kv: KVCache, state: _State) -> None:  # the finalizer: never raise from GC
    try:
        state.release(kv)
    except Exception:  # noqa: BLE001
        pass


@dataclass
class _ForwardContext(hf._StepContext):
    """One forward in flight: the step (for the attention function) and what the post-hook needs."""

    owner: Any = None
    thread: int = 0
    batch: int = 0
    columns: int = 0
    row_new: List[int] = field(default_factory=list)        # real tokens per row in these columns
    row_tokens: List[List[int]] = field(default_factory=list)
    new_seqs: dict = field(default_factory=dict)            # row -> seq added by this forward
    new_reused: dict = field(default_factory=dict)          # row -> n_cached
    followers: dict = field(default_factory=dict)           # leader row -> rows with the same prompt
    extended: bool = False                                  # rows with earlier tokens got new ones
    logit_map: Any = None                                   # [B * n_cols] rows of the kept logits (+NaN row)
    logit_cols: int = 0


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
    ``model``. A KVCache runs one forward at a time: do not run generations on one ``kv_cache``
    from several threads at once (the continuous-batching ``chunkvale.engine.Engine`` does that).
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
        if not isinstance(namespace, str):
            raise TypeError(f"namespace: expected a str, got {type(namespace).__name__}")
        self.model = model
        self.kv_cache = kv_cache
        self.namespace = namespace
        self.num_layers = model.config.num_hidden_layers
        self._state = _State()
        self._ctx: Optional[_ForwardContext] = None
        self._user_defined = False
        super().__init__(layers=[_ChunkvaleLayer(self) for _ in range(self.num_layers)])
        finalizer = weakref.finalize(self, _release, kv_cache, self._state)
        finalizer.atexit = False
        hf.register()
        _install(model)

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
        st = self._state
        if st.step is not None:
            try:
                self.kv_cache.cancel(st.step)
            except (ValueError, KeyError):
                pass
            st.step = None
        st.retired.extend(s for s in st.seqs if s is not None)
        st.seqs, st.tokens, st.reused, st.columns = [], [], [], 0

    def release(self) -> None:
        """Remove this cache's sequences from the KVCache now (their full chunks stay as LRU
        prefix cache) and start empty."""
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
        local = frame.f_locals
        caller = local.get("self")
        if caller is not None and caller is not self.model:
            raise ValueError(_other_model_message(self.model, caller))
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

    # -- the forward hooks' work --
    def _begin_forward(self, module, kw: dict) -> dict:
        if module is not self.model:
            raise ValueError(_other_model_message(self.model, module))
        if self._ctx is not None:
            if self._ctx.thread != threading.get_ident():
                raise RuntimeError("past_key_values (cache): this ChunkvaleCache is in a forward pass on another "
                                   "thread (one forward at a time per cache)")
            # A forward of this thread that never reached the post-hook (interrupted by a
            # BaseException torch does not catch): undo it, as the post-hook would have.
            self._end_forward(self._ctx, None)
        config = self.model.config
        for name in ("output_attentions", "output_hidden_states"):
            value = kw.get(name)
            if value or (value is None and getattr(config, name, False)):
                raise ValueError(f"{name}: not available with ChunkvaleCache (chunkvale's attention returns no "
                                 "weights and runs a packed batch); use DynamicCache for it")
        if kw.get("labels") is not None:
            raise ValueError("labels: ChunkvaleCache is for generation; a loss needs transformers' own forward")
        if kw.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds: ChunkvaleCache needs input_ids (the prefix tree is keyed by token ids)")
        if kw.get("use_cache") is False:
            raise ValueError("use_cache: ChunkvaleCache needs use_cache=True")
        ids = kw.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected a [batch, new tokens] tensor with at least one column, got "
                             f"{list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        B, T = ids.shape
        st = self._state
        past = st.columns
        if st.seqs and B != len(st.seqs):
            raise ValueError(f"input_ids: {B} rows, but this ChunkvaleCache holds a generation of {len(st.seqs)} "
                             "rows; call reset() to start a new one")
        mask = kw.get("attention_mask")
        device = ids.device
        parts = [ids.long()]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
                raise ValueError("attention_mask: expected the 2-D [batch, past + new columns] padding mask "
                                 f"(1 token, 0 pad), got {_shape(mask)}")
            if tuple(mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask: expected shape [{B}, {past + T}] ({past} cached + {T} new "
                                 f"columns), got {list(mask.shape)}")
            mask = mask.to(device)
            parts.append(mask[:, past:].long())
            parts.append(mask[:, :past].long().sum(1, keepdim=True))
        pos = kw.get("position_ids")
        if pos is not None:
            if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
                raise ValueError(f"position_ids: expected shape [{B}, {T}], got {_shape(pos)}")
            parts.append(pos.to(device).long().expand(B, T))
        host = torch.cat(parts, dim=1).cpu().tolist()  # one transfer: tokens, mask, past counts, positions

        kv = self.kv_cache
        row_new, row_tokens, row_ids = [], [], []
        for b in range(B):
            row = host[b]
            if mask is None:
                n = T
            else:
                m = row[T:2 * T]
                if any(v not in (0, 1) for v in m) or any(m[j] > m[j + 1] for j in range(T - 1)):
                    raise ValueError(f"attention_mask: row {b} is not left padding (0s, then 1s; got {m}); "
                                     "ChunkvaleCache needs left-padded batches")
                n = sum(m)
                held = len(st.tokens[b]) if st.seqs else 0
                if row[2 * T] != held:
                    raise ValueError(f"attention_mask: row {b} marks {row[2 * T]} tokens in the {past} cached "
                                     f"columns, but the cache holds {held}")
                if held and n != T:
                    raise ValueError(f"attention_mask: row {b} has pads after its tokens (only left padding)")
            row_new.append(n)
            row_tokens.append(row[T - n:T])
            row_ids.append(row)

        _remove_orphans(kv)
        entries, entry_rows, entry_cols = [], [], []  # entry_cols: first computed column of the row
        new_seqs, new_reused, followers, leaders = {}, {}, {}, {}
        extended = False
        try:
            for b in range(B):
                n, toks = row_new[b], row_tokens[b]
                seq = st.seqs[b] if st.seqs else None
                if seq is None:
                    if n == 0:
                        continue
                    key = tuple(toks)
                    if key in leaders:  # the same prompt as an earlier new row: prefill once, fork after
                        followers.setdefault(leaders[key], []).append(b)
                        continue
                    leaders[key] = b
                    seq, cached = kv.add_sequence(toks, self.namespace, max_reuse=n - 1)
                    new_seqs[b], new_reused[b] = seq, cached
                    entries.append((seq, n - cached))
                    entry_cols.append(T - n + cached)
                else:
                    entries.append((seq, toks))
                    entry_cols.append(0)
                    extended = True
                entry_rows.append(b)
            if not entries:
                raise ValueError("attention_mask: no row has a token in these columns (all pads)")
            retired, st.retired = st.retired, []  # a reset's: the new prompts have taken what they reuse
            _remove_all(kv, retired)
            step = kv.plan(entries)
        except BaseException:
            for seq in new_seqs.values():
                kv.remove(seq)
            raise

        try:
            positions = step.positions
            offsets = step.row_offsets
            if pos is not None:
                for i, b in enumerate(entry_rows):
                    given = host[b][-T:][entry_cols[i]:]
                    want = positions[offsets[i]:offsets[i + 1]].tolist()
                    if given != want:
                        raise ValueError(
                            f"position_ids: row {b} gives positions {given[:8]}... for its tokens, but they are at "
                            f"{want[:8]}... in the cache (positions count the row's real tokens from 0, as generate "
                            "makes them from the attention_mask)")
            # Packed rows: which packed row holds (row b, column c).
            packed_of = {}
            tokens = []
            for i, b in enumerate(entry_rows):
                first = entry_cols[i]
                for j, c in enumerate(range(first, T)):
                    packed_of[(b, c)] = offsets[i] + j
                tokens.extend(row_ids[b][first:T])
            for lead, rows in followers.items():
                for b in rows:
                    for c in range(T - row_new[b], T):
                        packed_of[(b, c)] = packed_of.get((lead, c))
            cols = _logit_columns(kw.get("logits_to_keep", 0), T)
            keep = sorted({p for b in range(B) for c in cols if (p := packed_of.get((b, c))) is not None})
            index_of = {p: k for k, p in enumerate(keep)}
            nan_row = len(keep)
            logit_map = [index_of.get(packed_of.get((b, c)), nan_row) for b in range(B) for c in cols]

            ctx = _ForwardContext(
                cache=kv, step=step, max_position=int(positions.max()), owner=self,
                thread=threading.get_ident(), batch=B, columns=T, row_new=row_new, row_tokens=row_tokens,
                new_seqs=new_seqs, new_reused=new_reused, followers=followers, extended=extended,
                logit_map=torch.tensor(logit_map, dtype=torch.long, device=device), logit_cols=len(cols))
            kw = dict(kw)
            kw["input_ids"] = torch.tensor(tokens, dtype=torch.long, device=device).reshape(1, -1)
            kw["attention_mask"] = hf._NO_MASK
            kw["position_ids"] = torch.as_tensor(positions, dtype=torch.long).to(device).reshape(1, -1)
            kw["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=device)
            kw["use_cache"] = True
            kw["chunkvale_context"] = ctx
        except BaseException:
            kv.cancel(step)
            for seq in new_seqs.values():
                kv.remove(seq)
            raise
        st.step = step
        self._ctx = ctx
        return kw

    def _end_forward(self, ctx: _ForwardContext, result):
        """The post-hook: commit the rows (and fork identical prompts) after a forward that
        completed, or undo a forward that raised. Returns the result with [B, cols, vocab] logits."""
        self._ctx = None
        st, kv = self._state, self.kv_cache
        st.step = None
        complete = ctx.layers_done == self.num_layers
        if result is None or not complete:
            if not complete:
                try:
                    kv.cancel(ctx.step)
                except (ValueError, KeyError):
                    pass
                _remove_all(kv, list(ctx.new_seqs.values()))
            else:
                # Every layer was appended (committed), then something after attention failed.
                self._undo_committed(ctx)
            return None
        B = ctx.batch
        if not st.seqs:
            st.seqs, st.tokens, st.reused = [None] * B, [[] for _ in range(B)], [None] * B
        forked = {}
        try:
            for lead, rows in ctx.followers.items():
                for b, child in zip(rows, kv.fork(ctx.new_seqs[lead], len(rows))):
                    forked[b] = child
        except BaseException:
            for child in forked.values():
                kv.remove(child)
            self._undo_committed(ctx)
            raise
        for b, seq in list(ctx.new_seqs.items()) + list(forked.items()):
            st.seqs[b] = seq
            st.reused[b] = ctx.new_reused.get(b, ctx.row_new[b])
        for b in range(B):
            st.tokens[b].extend(ctx.row_tokens[b])
        st.columns += ctx.columns

        logits = result.logits if not isinstance(result, tuple) else result[0]
        flat = logits.reshape(-1, logits.shape[-1])
        flat = torch.cat([flat, flat.new_full((1, flat.shape[-1]), math.nan)])
        full = flat.index_select(0, ctx.logit_map).reshape(B, ctx.logit_cols, -1)
        if isinstance(result, tuple):
            return (full,) + tuple(result[1:])
        result.logits = full
        return result

    def _undo_committed(self, ctx: _ForwardContext) -> None:
        _remove_all(self.kv_cache, list(ctx.new_seqs.values()))
        if ctx.extended:
            # Rows that already had tokens advanced in the KVCache, but generate never saw this
            # forward's output: the cache and the caller disagree from here on.
            self.release()


def _other_model_message(expected, got) -> str:
    return (f"past_key_values (cache): this ChunkvaleCache was made for {type(expected).__name__} at "
            f"{id(expected):#x}, "
            f"but is used with {type(got).__name__} at {id(got):#x}; make a ChunkvaleCache(model) for that model")


def _shape(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _logit_columns(logits_to_keep, T: int) -> List[int]:
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 0:
        logits_to_keep = int(logits_to_keep)
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep: expected an int >= 0, got {logits_to_keep}")
        return list(range(T)) if logits_to_keep == 0 else list(range(max(T - logits_to_keep, 0), T))
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 1 and not logits_to_keep.is_floating_point():
        cols = [c + T if c < 0 else c for c in logits_to_keep.tolist()]
        if any(not 0 <= c < T for c in cols):
            raise ValueError(f"logits_to_keep: columns out of range [0, {T}): {logits_to_keep.tolist()}")
        return cols
    raise ValueError("logits_to_keep: ChunkvaleCache takes an int or a 1-D tensor of column indices, got "
                     f"{_shape(logits_to_keep)}")


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


# -- hooks --
_HOOKED_ATTR = "_chunkvale_cache_hooks"


def _install(model) -> None:
    with hf._register_lock:
        hf._install_config_views(model)
        if getattr(model, _HOOKED_ATTR, None) is None:
            pre = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
            post = model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
            object.__setattr__(model, _HOOKED_ATTR, (pre, post))


def _find_cache(args, kwargs):
    for key in ("cache", "past_key_values"):
        if isinstance(kwargs.get(key), ChunkvaleCache):
            return kwargs[key]
    for a in args:
        if isinstance(a, ChunkvaleCache):
            return a
    return None


def _pre_forward(module, args, kwargs):
    cache = _find_cache(args, kwargs)
    if cache is None:
        return None
    if args:  # positional arguments (model(ids, ...)): bind them to the forward's names
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.update(kwargs.pop("kwargs", {}) or {})
    return (), cache._begin_forward(module, kwargs)


def _post_forward(module, args, kwargs, result):
    ctx = kwargs.get("chunkvale_context")
    if not isinstance(ctx, _ForwardContext) or ctx.owner is None or ctx.owner._ctx is not ctx:
        return None
    return ctx.owner._end_forward(ctx, result)
