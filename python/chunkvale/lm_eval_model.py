"""lm-eval model backend ``chunkvale``: score any local model on lm-eval tasks through chunkvale,
with or without a KV budget.

    lm_eval --model chunkvale --model_args pretrained=DIR,kv_budget=1024,digest=cuboid_max --tasks ...

A thin front: lm-eval's own ``hf`` backend (``HFLM``) does the tokenizing, truncation, batching
and post-processing; only the model calls run through chunkvale. Log-likelihoods run on a
chunkvale ``KVCache`` with the model glue (``hf.ModelRunner``); generation runs on the
``Engine``. ``pretrained``: a local transformers model directory, or None / "smollm2" for the
embedded SmolLM2-135M-Instruct (``chunkvale.models.load_model``). Without ``kv_budget`` the cache
is full and scores equal the ``hf`` backend's to float32 rounding (tests/test_lm_eval_model.py).

With ``kv_budget`` (``chunkvale.Eviction``: ``digest``, ``selection``, ``sink_chunks``, ``window_chunks``,
``topk_chunks``, ``dense_layers``), budgeted attention applies where it does when serving: to
decode rows. A log-likelihood request's context is prefilled (attends to everything) and its
continuation is then fed one token a step, each a decode row that selects once the sequence is
longer than the budget; ``loglikelihood_rolling`` (a prefix token as context) therefore decodes
the whole text token by token, as if the model had generated it.

Importing this module registers the backend; ``lm_eval`` imports it at start-up through the
``chunkvale_lm_eval.pth`` hook that the package installs (lm-eval 0.4.13 has no model entry
points), so ``lm_eval --model chunkvale`` works from the command line.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import chunkvale

from . import hf
from .engine import Engine, Request
from .models import load_model


@register_model("chunkvale")
class ChunkvaleLM(HFLM):
    def __init__(self, pretrained=None, kv_budget=None, digest: str = "cuboid_max", sink_chunks: int = 1,
                 window_chunks: int = 2, topk_chunks=None, dense_layers: int = 2, chunk_size: int = 64,
                 threads: int = 0, dtype: str = "float32", selection=None, **kwargs):
        loaded = load_model(pretrained, dtype=dtype)
        self.eviction = None if kv_budget is None else chunkvale.Eviction(
            budget_tokens=kv_budget, digest=digest, sink_chunks=sink_chunks, window_chunks=window_chunks,
            topk_chunks=topk_chunks, dense_layers=dense_layers, selection=selection)
        kwargs.pop("device", None)  # the model stays where load_model put it
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", **kwargs)
        # Room for the longest request (max_length tokens) plus the partial chunk of each of a
        # batch's generated sequences.
        capacity = (self.max_length + chunk_size - 1) // chunk_size * max(1, int(self.batch_size)) + 2
        cfg = hf.cache_config(self.model, chunk_size=chunk_size, capacity_chunks=capacity, threads=threads)
        cfg.eviction = self.eviction
        self.kv_cache = chunkvale.KVCache(cfg)  # checks the eviction config against the model now
        self._runner = hf.ModelRunner(self.model, self.kv_cache)
        self._engine = Engine(self.model, self.tokenizer, cache=self.kv_cache,
                              max_batch_size=max(1, int(self.batch_size)))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per
        ``(cache key, context tokens, continuation tokens)``, the ``hf`` backend's inputs and outputs."""
        from tqdm.auto import tqdm

        out = []
        for key, context, continuation in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                               desc="chunkvale loglikelihood"):
            # As the hf backend: the last max_length + 1 tokens, the last one only predicted.
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            logprobs = self._continuation_logprobs(inp, len(continuation))
            cont = torch.tensor(continuation, dtype=torch.long)
            answer = (float(logprobs.gather(1, cont[:, None]).sum()), bool((logprobs.argmax(-1) == cont).all()))
            out.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def _continuation_logprobs(self, inp: list[int], n_cont: int) -> torch.Tensor:
        """Log-softmax [n_cont, vocab] of the positions predicting the last ``n_cont`` tokens after ``inp``.
        The context is prefilled; with a budget the continuation is then fed one decode row at a time."""
        first = len(inp) - n_cont  # the row predicting the first continuation token
        n_prefill = len(inp) if self.eviction is None else first + 1
        cache = self.kv_cache
        # A context cached by an earlier request (the other choices of a question) is shared, up
        # to the first row whose logits are needed.
        seq, n_cached = cache.add_sequence(inp[:n_prefill], max_reuse=first)
        try:
            with torch.inference_mode():
                step = cache.plan([(seq, n_prefill - n_cached)])
                rows = [self._runner.forward(step, inp[n_cached:n_prefill],
                                             list(range(first - n_cached, n_prefill - n_cached)))]
                step.commit()
                for token in inp[n_prefill:]:
                    step = cache.plan([(seq, [token])])
                    rows.append(self._runner.forward(step, [token], [0]))
                    step.commit()
            return torch.log_softmax(torch.cat(rows).to(self.softmax_dtype or torch.float32), dim=-1)
        finally:
            cache.remove(seq)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """``model.generate``'s output for the hf backend's left-padded ``context`` [B, T]: each row's
        prompt, then what the Engine generates (greedy unless the task asks for sampling), padded."""
        mask = generation_kwargs.pop("attention_mask", None)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        if not generation_kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        top_p = float(generation_kwargs.pop("top_p", 1.0) or 1.0)
        new = max_length - context.shape[1]
        reqs = []
        for row in range(context.shape[0]):
            tokens = context[row] if mask is None else context[row][mask[row].bool()]
            reqs.append(Request(token_ids=tokens.tolist(), max_new_tokens=new, stop=list(stop) or None,
                                temperature=temperature, top_p=top_p))
        results = self._engine.generate(reqs, progress=False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = torch.full((context.shape[0], max_length), pad, dtype=torch.long)
        out[:, :context.shape[1]] = context.cpu()
        for row, res in enumerate(results):
            if not res.ok:
                raise RuntimeError(f"chunkvale: request {row} failed: {res.error}")
            gen = res.samples[0].token_ids[:new]
            out[row, context.shape[1]:context.shape[1] + len(gen)] = torch.tensor(gen, dtype=torch.long)
        return out
