"""The forward hooks of ``chunkvale.hf.ChunkvaleCache`` (hf_cache.py tells how a forward runs): the
pre-hook packs the padded batch into one chunkvale step, the post-hook scatters the logits back
and commits the rows, or undoes a forward that raised."""

from __future__ import annotations

import inspect
import math
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, List

import torch

from . import cache_users, hf
from .hf_cache_rows import _remove_all, _remove_orphans


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


def begin_forward(cache, module, kw: dict) -> dict:
    """The pre-hook's work, on a cache this thread has claimed for the forward (cache_users.py)."""
    if module is not cache.model:
        raise ValueError(_other_model_message(cache.model, module))
    if cache._ctx is not None:
        # A forward that never reached the post-hook (interrupted by a BaseException torch does
        # not catch; its claim lapsed with it): undo it, as the post-hook would have.
        end_forward(cache, cache._ctx, None)
    config = cache.model.config
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
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        # Never truncated into token ids (transformers' embedding refuses them too).
        raise TypeError(f"input_ids: expected an integer tensor of token ids, got dtype {ids.dtype}")
    B, T = ids.shape
    st = cache._state
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

    kv = cache.kv_cache
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
                seq, cached = kv.add_sequence(toks, cache._kv_namespace, max_reuse=n - 1)
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
            cache=kv, step=step, max_position=int(positions.max()), owner=cache,
            thread=threading.get_ident(), batch=B, columns=T, row_new=row_new, row_tokens=row_tokens,
            new_seqs=new_seqs, new_reused=new_reused, followers=followers, extended=extended,
            logit_map=torch.tensor(logit_map, dtype=torch.long, device=device), logit_cols=len(cols))
        kw = dict(kw)
        kw.update(hf.packed_kwargs(ctx, torch.tensor(tokens, dtype=torch.long, device=device),
                                   torch.as_tensor(positions, dtype=torch.long).to(device),
                                   torch.tensor(keep, dtype=torch.long, device=device)))
        kw["use_cache"] = True  # the cache's update() routes each layer's attention to chunkvale
    except BaseException:
        step.cancel()
        for seq in new_seqs.values():
            kv.remove(seq)
        raise
    st.step = step
    cache._ctx = ctx
    return kw

def end_forward(cache, ctx: _ForwardContext, result):
    """The post-hook: commit the rows (and fork identical prompts) after a forward that
    completed, or undo a forward that raised. Returns the result with [B, cols, vocab] logits."""
    cache._ctx = None
    st, kv = cache._state, cache.kv_cache
    st.step = None
    complete = ctx.layers_done == cache.num_layers
    if complete and not ctx.step.cancelled:  # reset()/release() cancel the step of an interrupted forward
        ctx.step.commit()  # every layer was appended: the rows' tokens are cached from here on
    if result is None or not complete:
        if not complete:
            ctx.step.cancel()
            _remove_all(kv, list(ctx.new_seqs.values()))
        else:
            # Every layer was appended (committed, unless reset() cancelled it), then something
            # after attention failed or interrupted the forward.
            _undo_committed(cache, ctx)
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
        _undo_committed(cache, ctx)
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

def _undo_committed(cache, ctx: _ForwardContext) -> None:
    _remove_all(cache.kv_cache, list(ctx.new_seqs.values()))
    if ctx.extended:
        # Rows that already had tokens advanced in the KVCache, but generate never saw this
        # forward's output: the cache and the caller disagree from here on.
        cache.release()


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


# -- hooks --
_HOOKED_ATTR = "_chunkvale_cache_hooks"


def install(model) -> None:
    with hf._register_lock:
        hf._install_config_views(model)
        if getattr(model, _HOOKED_ATTR, None) is None:
            pre = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
            post = model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
            object.__setattr__(model, _HOOKED_ATTR, (pre, post))


def _find_cache(args, kwargs):
    from .hf_cache import ChunkvaleCache  # the class that uses these hooks imports this module
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
    # The forward holds the cache and its KVCache until it returns (cache_users.py).
    cache_users.claim(cache_users.forward_frame(sys._getframe()), "forward", cache._users,
                      cache_users.of_kv(cache.kv_cache))
    if args:  # positional arguments (model(ids, ...)): bind them to the forward's names
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.update(kwargs.pop("kwargs", {}) or {})
    return (), begin_forward(cache, module, kwargs)


def _post_forward(module, args, kwargs, result):
    ctx = kwargs.get("chunkvale_context")
    if not isinstance(ctx, _ForwardContext) or ctx.owner is None or ctx.owner._ctx is not ctx:
        return None
    return end_forward(ctx.owner, ctx, result)
