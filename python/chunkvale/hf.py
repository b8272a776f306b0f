"""Run a Hugging Face transformers Llama-family model with its attention in a chunkvale KVCache.

How it plugs in: transformers' attention-function registry (``AttentionInterface``). We register
an attention function named ``"chunkvale"`` once; every attention layer of the unmodified model
calls it, with the layer's q/k/v after RoPE, while the *current thread* runs a
:class:`ModelRunner` step. The function appends k/v to the cache of the step it is handed (a model
kwarg) and returns ``cache.attention``. The model's config is never switched: each attention
module reads its config through a view whose ``_attn_implementation`` is ``"chunkvale"`` only on a
thread inside a step (a thread-local flag), so several engines on several threads can share one
model object, and the model keeps its own attention everywhere else (e.g. transformers'
``generate`` between or during chunkvale steps). No model file is copied or forked.

A step is *packed*: the new tokens of every sequence in the batch sit in one row of
``input_ids`` ([1, T]) with their absolute positions from ``step.positions`` as ``position_ids``,
so prefill, extend and decode of many requests share one forward pass and need no padding.
A placeholder 4-D ``attention_mask`` (one element) makes transformers skip building a mask, so
no [T, T] mask is ever materialised; the cache knows which rows belong to which sequence.

``ChunkvaleCache`` (hf_cache.py, imported on first use as ``chunkvale.hf.ChunkvaleCache``) is a
transformers ``Cache`` for the model's own ``generate``: forward hooks on the model turn each
padded batch that ``generate`` passes into such a packed step, and the cache's ``update`` routes
the attention module's next attention-function lookup to ``"chunkvale"`` (a thread-local flag
read by the same config views).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

ATTN_IMPLEMENTATION = "chunkvale"

# Architectures whose attention is exactly "RoPE'd q/k/v -> softmax(q k^T * scaling) v" with
# causal masking, so replacing the attention function is exact. Others (softcapping, alibi,
# attention sinks, chunked local attention) would silently compute something else.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# A 4-D mask is taken as prepared (transformers' mask builders return it as is): one element
# stands for "no mask", which chunkvale's attention function never reads.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_register_lock = threading.Lock()
_registered = False
# .active: this thread is inside ModelRunner.forward; .route: a ChunkvaleCache.update() of this
# thread has just run in an attention module, whose attention-function lookup comes next
_in_step = threading.local()


class _AttentionConfigView:
    """An attention module's config as chunkvale installs it: every attribute is the model's own
    config's (reads and writes go through), except that ``_attn_implementation`` reads
    ``"chunkvale"`` while the current thread runs a :class:`ModelRunner` step, or right after a
    :class:`ChunkvaleCache` ``update`` of this thread (the attention module looks up its attention
    function next; ``_attention`` clears the flag)."""

    __slots__ = ("_config",)

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    @property
    def _attn_implementation(self):
        if getattr(_in_step, "active", False) or getattr(_in_step, "route", False):
            return ATTN_IMPLEMENTATION
        return object.__getattribute__(self, "_config")._attn_implementation

    def __getattr__(self, name):
        if name == "_config":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)

    def __delattr__(self, name):
        delattr(self._config, name)

    def __reduce__(self):
        return (_AttentionConfigView, (self._config,))

    def __repr__(self):
        return f"chunkvale view of {self._config!r}"


def _install_config_views(model) -> None:
    """Give each attention module the thread-aware view of its config (once per model)."""
    for layer in _decoder_layers(model):
        attn = layer.self_attn
        if not isinstance(attn.config, _AttentionConfigView):
            attn.config = _AttentionConfigView(attn.config)


@dataclass
class _StepContext:
    """What the attention function needs for one forward pass; passed as a model kwarg so that
    concurrent runners on different threads never see each other's step."""

    cache: Any
    step: Any
    max_position: int
    layers_done: int = 0  # layers appended and attended (a ChunkvaleCache checks a forward completed)


def packed_kwargs(ctx: _StepContext, input_ids: torch.Tensor, positions: torch.Tensor,
                  logit_rows: torch.Tensor) -> dict:
    """The model arguments of one packed step (module docstring), for every front that runs one
    (ModelRunner, ChunkvaleCache's forward hook): the step's tokens in one row at their positions,
    the placeholder mask, the packed rows whose logits are kept, the step for the attention."""
    return {"input_ids": input_ids.reshape(1, -1), "attention_mask": _NO_MASK,
            "position_ids": positions.reshape(1, -1), "logits_to_keep": logit_rows, "chunkvale_context": ctx}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _in_step.route = False  # consumed: the next lookup is routed again only by the next update()
    ctx = kwargs.get("chunkvale_context")
    if ctx is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} only works inside chunkvale.hf.ModelRunner.forward "
            "or a forward with a chunkvale.hf.ChunkvaleCache (the attention needs a KVCache step); use another "
            "attn_implementation for plain forward passes"
        )
    if query.shape[0] != 1:
        raise ValueError(f"query: expected a packed batch of 1 row, got batch {query.shape[0]}")
    window = kwargs.get("sliding_window")
    if window is not None and ctx.max_position >= window:
        # Exact only while every query still sees its whole prefix; beyond that the model would
        # mask keys that the cache attends to.
        raise ValueError(
            f"sequence position {ctx.max_position} reaches the model's sliding_window={window}; "
            "chunkvale attends to the whole context, so prompts plus generated tokens must stay below it"
        )
    layer = module.layer_idx
    # transformers hands [1, heads, T, D]; the cache wants packed rows [T, heads, D].
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    ctx.cache.append(layer, ctx.step, k, v)
    out = ctx.cache.attention(layer, ctx.step, q)
    ctx.layers_done += 1
    # Attention functions return [batch, T, heads, D] (eager transposes back before returning).
    return out.unsqueeze(0), None


def register() -> None:
    """Register the ``"chunkvale"`` attention function with transformers (idempotent)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
        _registered = True


def check_model(model) -> None:
    """Raise a clear error if ``model`` cannot run through chunkvale exactly."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model: expected a transformers *ForCausalLM model, got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"model: parameters must be float32, float16 or bfloat16, got {dtype}")
    device = next(model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model: must be on cpu or cuda, got {device}")
    scalings = {float(layer.self_attn.scaling) for layer in _decoder_layers(model)}
    if len(scalings) != 1:
        raise ValueError(f"model: layers use different attention scalings {sorted(scalings)}; one cache needs one")


def _decoder_layers(model):
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"model: {type(model).__name__} has no decoder layers at .model.layers")
    return layers


def cache_config(model, *, chunk_size: int = 64, capacity_chunks: int | None = None,
                 capacity_bytes: int | None = None, threads: int = 0, share_threshold: int = 2):
    """A ``chunkvale.CacheConfig`` matching ``model``'s layers, heads, head dim, dtype and device."""
    import chunkvale

    check_model(model)
    cfg = model.config
    attn = _decoder_layers(model)[0].self_attn
    param = next(model.parameters())
    if capacity_chunks is None and capacity_bytes is None:
        raise ValueError("capacity_chunks / capacity_bytes: give exactly one")
    return chunkvale.CacheConfig(
        layers=cfg.num_hidden_layers,
        q_heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=attn.head_dim,
        chunk_size=chunk_size,
        dtype=_DTYPE_NAMES[param.dtype],
        capacity_chunks=capacity_chunks,
        capacity_bytes=capacity_bytes,
        device=param.device.type,
        threads=threads,
        share_threshold=share_threshold,
        # Pass the model's own scaling rather than trusting that it is 1/sqrt(head_dim).
        sm_scale=float(attn.scaling),
    )


class ModelRunner:
    """Runs packed chunkvale steps through a transformers causal LM.

    ``runner.forward(step, input_ids, logit_rows)`` appends every layer's K/V of the step's new
    tokens to ``cache`` and returns the logits of the requested rows only (the LM head over all
    prefill rows would cost more than attention).
    """

    def __init__(self, model, cache):
        check_model(model)
        register()
        with _register_lock:
            _install_config_views(model)
        self.model = model.eval()
        self.cache = cache
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers

    def forward(self, step, input_ids: torch.Tensor | Sequence[int], logit_rows: Sequence[int]) -> torch.Tensor:
        """Logits (float32, [len(logit_rows), vocab]) of the given packed rows of ``step``."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] != step.num_tokens:
            raise ValueError(f"input_ids: expected {step.num_tokens} tokens for this step, got {ids.shape[1]}")
        rows = torch.as_tensor(list(logit_rows), dtype=torch.long, device=self.device)
        # Empty is fine: a step that only prefills the middle of a long prompt needs no logits.
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= step.num_tokens):
            raise ValueError(f"logit_rows: expected rows in [0, {step.num_tokens}), got {rows.tolist()}")
        positions = torch.as_tensor(step.positions, dtype=torch.long).to(self.device).reshape(1, -1)
        ctx = _StepContext(self.cache, step, int(positions.max()))
        was_active = getattr(_in_step, "active", False)
        _in_step.active = True
        try:
            with torch.inference_mode():
                out = self.model(**packed_kwargs(ctx, ids, positions, rows), use_cache=False)
        finally:
            _in_step.active = was_active
        return out.logits[0].float()


def __getattr__(name):
    # chunkvale.hf.ChunkvaleCache lives in hf_cache.py, imported on first use: it subclasses
    # transformers' Cache, and importing this module must not import transformers.
    if name == "ChunkvaleCache":
        from .hf_cache import ChunkvaleCache

        return ChunkvaleCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
