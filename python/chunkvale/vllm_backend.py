"""chunkvale as vLLM's CPU attention backend (registered by chunkvale.vllm_plugin).

vLLM keeps everything it owns: the scheduler, prefix caching, the KV cache tensors
([num_blocks, kv_heads, block_size, 2 * head_dim] per layer, allocated by vLLM) and the block
tables. What sits inside a block is the backend's business: vLLM's CPU kernels store K
transposed and packed per instruction set, chunkvale stores K and V tiles [block_size][head_dim]
row-major (``do_kv_cache_update`` -> ``PagedAttention.write_kv``); nothing else in vLLM reads a
block's interior (prefix caching shares block ids, offloading copies whole blocks). Per step the metadata builder turns vLLM's
block table, ``seq_lens`` and ``query_start_loc`` into one ``chunkvale.PagedPlan``: blocks that
several requests of the batch use (a system prompt, few-shot examples, the siblings of ``n > 1``)
run chunk-first, once for all their query rows; the rest per sequence, causal. Every layer then
runs ``PagedAttention.run`` on its own KV cache tensor, read in place.

Budgeted attention (chunkvale.vllm_options: an ``eviction`` option): each layer from
``dense_layers`` on keeps a digest tensor beside its KV cache, float32 [num_blocks, kv_heads, 2,
head_dim] (1/block_size of an fp32 cache, 2/block_size of a bf16 one), refreshed by
``write_kv`` as blocks fill; decode rows over budget attend to their sinks, window and top-k
blocks. vLLM still allocates and keeps every block: this saves attention time on long contexts,
not memory.

Parallel ranks: every rank of vLLM's tensor, pipeline or data parallelism is its own process
with its own plugin state (options, runners, plan counts: chunkvale.vllm_stats). Under tensor
parallelism a rank holds a slice of the heads and plans for it; under pipeline parallelism a
slice of the layers (``dense_layers`` counts the model's layers, not the rank's).

Refused at start-up with a message, never computed differently: sliding windows, ALiBi,
logit soft-capping, attention sinks, encoder / encoder-decoder attention, quantized (fp8) KV
caches, head sizes chunkvale has no kernel for, fused output quantization, decode or prefill
context parallelism (a rank would hold part of a sequence's blocks), and budgeted attention with
``selection="shared"`` under tensor parallelism (a block's shared score sums every KV head, so
ranks holding a slice each would select other blocks than one process does). Per-KV-head
selection, the default, runs under tensor parallelism: each KV head selects its own blocks from
its own digests and query heads, so a rank holding a slice of the heads selects as one process
does for those heads.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

import chunkvale
from chunkvale.vllm_options import Options, options
from chunkvale.vllm_stats import COUNTS

logger = init_logger("vllm.chunkvale")  # under vLLM's logger, so its handlers print it
HEAD_SIZES = [64, 80, 96, 128, 256]
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

@dataclass(frozen=True)
class _RunnerKey:
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    scale: float


@dataclass
class _ProcessState:
    """This process's plugin state: the engine's options (read once, while vLLM's config is
    current) and one PagedAttention per attention shape, shared by the model's layers."""

    options: Options | None = None
    runners: dict = dataclasses.field(default_factory=dict)  # _RunnerKey -> PagedAttention
    threads: dict = dataclasses.field(default_factory=dict)  # _RunnerKey -> the threads it was made with


_lock = threading.Lock()
_state = _ProcessState()


def _options_locked() -> Options:
    """Call with _lock held."""
    if _state.options is None:
        _state.options = options(get_current_vllm_config_or_none())
    return _state.options


def _options() -> Options:
    with _lock:
        return _options_locked()


def _worker_cpus(threads: int) -> list[int] | None:
    """CPUs for PagedAttention's worker threads. vLLM's CPU worker pins each of its OpenMP threads
    to one CPU, the calling (main) thread included, and a thread inherits its creator's
    affinity: unpinned, every chunkvale worker would share the main thread's one CPU. So the
    workers go to the CPUs of the process's other threads (vLLM's OpenMP threads), the calling
    thread's own first; None when the calling thread may already run on enough CPUs."""
    own = sorted(os.sched_getaffinity(0))
    if len(own) >= threads:
        return None
    seen = set(own)
    for tid in os.listdir("/proc/self/task"):
        try:
            seen |= os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended meanwhile
            pass
    cpus = own + sorted(seen - set(own))
    if len(cpus) < threads:
        logger.warning("chunkvale: %d attention threads share CPUs %s (the threads of this process may run on no "
                       "others)", threads, cpus)
    return cpus


def _runner(key: _RunnerKey) -> "chunkvale.PagedAttention":
    """One PagedAttention (one thread pool) per shape and scale, shared by the layers of the model."""
    with _lock:
        pa = _state.runners.get(key)
        if pa is None:
            opts = _options_locked()
            threads = torch.get_num_threads()
            pa = chunkvale.PagedAttention(key.q_heads, key.kv_heads, key.head_dim, key.block_size,
                                          dtype=_DTYPES[key.dtype], sm_scale=key.scale, threads=threads,
                                          share_threshold=opts.share_threshold, eviction=opts.eviction,
                                          cpus=_worker_cpus(threads))
            _state.runners[key] = pa
            _state.threads[key] = threads
            logger.info("chunkvale attention: %d threads (workers on CPUs %s)", threads,
                        pa.cpus or "as the calling thread's")
        return pa


def runner_state() -> dict:
    """This process's runners and options (chunkvale.vllm_stats reports them per rank); a budgeted
    runner adds its selection counts (blocks scored and dropped so far)."""
    with _lock:
        items = list(_state.runners.items())
        opts = _state.options
    runners = []
    for key, pa in items:
        r = {"q_heads": pa.q_heads, "kv_heads": pa.kv_heads, "head_dim": pa.head_dim, "dtype": pa.dtype,
             "threads": _state.threads[key], "cpus": list(pa.cpus), "budgeted": pa.budgeted}
        if pa.budgeted:
            r["selection_counts"] = pa.selection_counts
        runners.append(r)
    return {"runners": runners,
            "share_threshold": opts.share_threshold if opts else None,
            "eviction": dataclasses.asdict(opts.eviction) if opts and opts.eviction else None}


def _check_parallel(parallel_config, opts: Options) -> None:
    """Refuses the parallel modes whose result would differ from one process's."""
    for field, what in (("decode_context_parallel_size", "decode context parallelism"),
                        ("prefill_context_parallel_size", "prefill context parallelism")):
        size = getattr(parallel_config, field, 1)
        if size > 1:
            _refuse(f"{what} ({field}={size}: each rank would attend to part of a sequence's blocks)")
    tp = getattr(parallel_config, "tensor_parallel_size", 1)
    if tp > 1 and opts.eviction is not None and opts.eviction.resolved_selection() != "per_kv_head":
        _refuse(f"budgeted attention with selection='shared' under tensor parallelism (tensor_parallel_size={tp}: "
                "a block's shared score sums every KV head, and each rank holds a slice of them, so the ranks "
                "would select other blocks than one process does); use selection='per_kv_head' (the default: "
                "each KV head selects its own blocks, which a rank holding a slice of the heads does alike) or "
                "tensor_parallel_size=1")


def _refuse(what: str) -> None:
    raise NotImplementedError(
        f"chunkvale's vLLM backend does not support {what}; set CHUNKVALE_VLLM=0 to run vLLM's own CPU attention")


class ChunkvaleAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend with chunkvale's attention: same KV layout, same cache update."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_SIZES)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return ChunkvaleAttentionImpl

    @staticmethod
    def get_builder_cls():
        return ChunkvaleMetadataBuilder


@dataclass
class ChunkvaleMetadata(CPUAttentionMetadata):
    plan: "chunkvale.PagedPlan | None" = None


class ChunkvaleMetadataBuilder(CPUAttentionMetadataBuilder):
    """Plans each step once for every layer of its KV-cache group."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.is_cross_attention or self.is_encoder_only_attention:
            _refuse("cross or encoder-only attention")
        if self.window_size != -1:
            _refuse(f"a sliding window ({self.window_size} tokens)")
        _check_parallel(vllm_config.parallel_config, _options())
        self._num_blocks = None
        self._share_threshold = _options().share_threshold
        self._shared_seen = False
        logger.info("chunkvale attention backend: %d/%d heads of dim %d, block_size %d, %s, %s kernels, %d threads",
                    self.num_heads, self.num_kv_heads, self.head_dim, self.block_size, self.dtype,
                    chunkvale.kernel_isa(), torch.get_num_threads())
        ev = _options().eviction
        if ev is not None:
            logger.info("chunkvale budgeted attention: decode rows over %d tokens attend to %d sink + %d window + "
                        "%s top-k blocks (%s digests) from layer %d on; every block stays in vLLM's KV cache",
                        ev.budget_tokens, ev.sink_chunks, ev.window_chunks,
                        "the default" if ev.topk_chunks is None else ev.topk_chunks, ev.digest, ev.dense_layers)
            logger.info("chunkvale: blocks scored and dropped so far are in chunkvale.vllm_stats (per rank)")

    def _pool_blocks(self) -> int:
        """Blocks in this group's KV cache tensors (what block ids must stay below), looked up once
        they exist; every layer's run checks its own tensor against the plan again."""
        if self._num_blocks is None:
            layers = get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names)
            sizes = set()
            for layer in layers.values():
                kv = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
                if kv.dim() == 4:
                    sizes.add(int(kv.shape[0]))
            if not sizes:
                raise RuntimeError("chunkvale: the KV cache tensors of layers " + ", ".join(self.layer_names[:3]) +
                                   " are not allocated yet")
            self._num_blocks = min(sizes)
        return self._num_blocks

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ChunkvaleMetadata:
        m = common_attn_metadata
        if m.causal is not True:
            _refuse("non-causal or dynamically causal attention")
        n = m.num_reqs
        # CPU tensors already on the CPU platform; the slices are views (no copy).
        block_table = m.block_table_tensor[:n]
        seq_lens = m.seq_lens[:n]
        query_start_loc = m.query_start_loc[: n + 1]
        plan = chunkvale.plan_paged(block_table, seq_lens, query_start_loc, self._pool_blocks(),
                                    block_size=self.block_size, share_threshold=self._share_threshold)
        COUNTS.add(plan)
        if plan.chunk_first_units and not self._shared_seen:
            self._shared_seen = True
            logger.info("chunkvale: first step with shared blocks: %d chunk-first runs over %d blocks, %d sequences",
                        plan.chunk_first_units, plan.chunk_first_blocks, plan.num_seqs)
        return ChunkvaleMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len, query_start_loc=query_start_loc,
            max_seq_len=m.max_seq_len, seq_lens=seq_lens, block_table=block_table, slot_mapping=m.slot_mapping,
            scheduler_metadata=None, causal=True, plan=plan)


class ChunkvaleAttentionImpl(CPUAttentionBackendImpl):
    """KV writes and attention through chunkvale.PagedAttention, on vLLM's KV cache tensors."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        if alibi_slopes is not None:
            _refuse("ALiBi slopes")
        if sliding_window is not None:
            _refuse(f"a sliding window ({sliding_window} tokens)")
        if logits_soft_cap:
            _refuse(f"logit soft-capping ({logits_soft_cap})")
        if sinks is not None:
            _refuse("attention sinks")
        if attn_type != AttentionType.DECODER:
            _refuse(f"attention type {attn_type!r} (decoder self-attention only)")
        if kv_cache_dtype not in ("auto", None):
            _refuse(f"kv_cache_dtype={kv_cache_dtype!r} (the model's dtype only)")
        if head_size not in HEAD_SIZES:
            _refuse(f"head_size={head_size} (supported: {HEAD_SIZES})")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self._pa = None
        self._eviction = _options().eviction
        self._selects: bool | None = None  # this layer selects (budgeted, past dense_layers); known at first call
        self._digests: torch.Tensor | None = None
        self._digests_of = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            _refuse("fused output quantization")
        if attn_metadata is None:  # vLLM's warm-up: nothing to attend
            return output
        plan = attn_metadata.plan
        if plan is None:
            raise RuntimeError("chunkvale: attention metadata without a plan (built by another backend's builder?)")
        t = plan.num_tokens
        out = output[:t].view(t, self.num_heads, self.head_size)
        self._paged_for(kv_cache).run(plan, query[:t], kv_cache, out, digests=self._digests_for(layer, kv_cache))
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        n = slot_mapping.shape[0]
        self._paged_for(kv_cache).write_kv(kv_cache, key[:n], value[:n], slot_mapping,
                                           digests=self._digests_for(layer, kv_cache))

    def _paged_for(self, kv_cache) -> "chunkvale.PagedAttention":
        if self._pa is None:
            self._pa = _runner(_RunnerKey(self.num_heads, self.num_kv_heads, self.head_size, int(kv_cache.shape[2]),
                                          kv_cache.dtype, float(self.scale)))
        return self._pa

    def _digests_for(self, layer, kv_cache) -> torch.Tensor | None:
        """This layer's digest tensor, beside its KV cache (None where the layer attends densely)."""
        if self._selects is None:
            self._selects = (self._eviction is not None and
                             extract_layer_index(layer.layer_name) >= self._eviction.dense_layers)
        if not self._selects:
            return None
        # One digest tensor per KV cache tensor: a new cache (vLLM's profiling run uses another)
        # starts with blocks that have not been filled yet, so fresh digests are right for it.
        if self._digests is None or self._digests_of != (kv_cache.data_ptr(), kv_cache.shape[0]):
            self._digests = torch.zeros(self._paged_for(kv_cache).digest_shape(kv_cache.shape[0]), dtype=torch.float32)
            self._digests_of = (kv_cache.data_ptr(), kv_cache.shape[0])
        return self._digests
