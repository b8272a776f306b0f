"""Generation requests, their results, and the rules about them: validation (every field is checked
when a request is submitted, so a bad value is a TypeError/ValueError naming ``request.<field>``
there, never a failure in the middle of a batch; docs/API.md "Engine"), refusing what the cache
could never hold, and when a sample stops."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import RequestMetrics

# Below this, softmax(logits / T) equals the argmax in float32 for any realistic logit gap
# (a gap of 0.1 at T = 1e-3 is e^-100 < 2^-126), so a smaller T is greedy with extra cost; and
# logits / 1e-40 overflows float32 to inf (inf - inf = NaN probabilities). Use 0 for greedy.
MIN_TEMPERATURE = 1e-3


@dataclass
class Request:
    """One generation request: exactly one of ``prompt`` (text), ``messages`` (chat, the
    tokenizer's chat template is applied) or ``token_ids``."""

    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: Sequence[int] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    # Extra stop strings / token ids (EOS always stops). A bare str is one stop string (as in
    # OpenAI's API), not a list of characters.
    stop: str | Sequence[str | int] | None = ()
    namespace: str = ""  # prefixes are shared only within one namespace
    ignore_eos: bool = False  # for benchmarks that need a fixed number of tokens
    id: Any = None


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error" (the request failed first) | "cancelled"


@dataclass
class Result:
    request: Request
    index: int  # order of submission
    samples: list[Sample]
    metrics: RequestMetrics
    # None, or why the request failed while running ("CapacityError: ..."): then the samples
    # hold the tokens generated until then, unfinished ones with finish_reason "error".
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Checked:
    """A request's normalised generation parameters (the prompt is tokenized separately)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    n: int
    stop_ids: frozenset
    stop_strings: tuple
    namespace: str
    ignore_eos: bool


def _what(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int(name: str, value, low: int) -> int:
    if not _is_int(value):
        raise TypeError(f"request.{name}: expected an int >= {low}, got {_what(value)}")
    if value < low:
        raise ValueError(f"request.{name}: expected an int >= {low}, got {value}")
    return int(value)


def _real(name: str, value, expected: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"request.{name}: expected {expected}, got {_what(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"request.{name}: expected {expected}, got {value}")
    return value


def token_id_list(name: str, values, vocab_size: int) -> list[int]:
    """``values`` as a list of ints in [0, vocab_size); errors name ``request.<name>[i]``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"request.{name}: expected a list of int token ids, got {type(values).__name__}")
    if hasattr(values, "tolist") and getattr(getattr(values, "dtype", None), "is_floating_point", False):
        raise TypeError(f"request.{name}: expected int token ids, got a {values.dtype} tensor")
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"request.{name}: expected a 1-D array of ints, got {values.ndim}-D {values.dtype}")
    out = []
    for i, t in enumerate(values.tolist() if hasattr(values, "tolist") else values):
        if not _is_int(t):
            raise TypeError(f"request.{name}[{i}]: expected an int token id, got {_what(t)}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"request.{name}[{i}]: token id {t} outside the vocabulary [0, {vocab_size})")
        out.append(int(t))
    return out


def _stop(value, vocab_size: int, has_tokenizer: bool) -> tuple[frozenset, tuple]:
    if value is None:
        return frozenset(), ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"request.stop: expected a str or a list of str / int token ids, got {type(value).__name__}")
    ids, strings = set(), []
    for i, s in enumerate(items):
        if isinstance(s, str):
            if not s:
                raise ValueError(f"request.stop[{i}]: expected a non-empty stop string, got ''")
            if not has_tokenizer:
                raise ValueError(f"request.stop[{i}]: stop strings need a tokenizer (give the engine one, "
                                 f"or stop on token ids), got {s!r}")
            strings.append(s)
        elif _is_int(s):
            if not 0 <= s < vocab_size:
                raise ValueError(f"request.stop[{i}]: token id {s} outside the vocabulary [0, {vocab_size})")
            ids.add(int(s))
        else:
            raise TypeError(f"request.stop[{i}]: expected a stop string or an int token id, got {_what(s)}")
    return frozenset(ids), tuple(strings)


def check(request: Request, *, vocab_size: int, has_tokenizer: bool) -> Checked:
    """Validate every generation parameter of ``request`` (not the prompt)."""
    temperature = _real("temperature", request.temperature,
                        f"0 (greedy) or a finite float >= {MIN_TEMPERATURE:g} (smaller ones are greedy in "
                        f"float32 and overflow the logits; use 0)")
    if temperature != 0.0 and temperature < MIN_TEMPERATURE:
        raise ValueError(f"request.temperature: expected 0 (greedy) or a finite float >= {MIN_TEMPERATURE:g} "
                         f"(smaller ones are greedy in float32 and overflow the logits; use 0), got {temperature:g}")
    top_p = _real("top_p", request.top_p, "a finite float in (0, 1]")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"request.top_p: expected a finite float in (0, 1], got {top_p:g}")
    if request.seed is not None and not _is_int(request.seed):
        raise TypeError(f"request.seed: expected an int or None, got {_what(request.seed)}")
    if not isinstance(request.namespace, str):
        raise TypeError(f"request.namespace: expected a str, got {_what(request.namespace)}")
    if not isinstance(request.ignore_eos, (bool, np.bool_)):
        raise TypeError(f"request.ignore_eos: expected a bool, got {_what(request.ignore_eos)}")
    stop_ids, stop_strings = _stop(request.stop, vocab_size, has_tokenizer)
    return Checked(max_new_tokens=_int("max_new_tokens", request.max_new_tokens, 1), temperature=temperature,
                   top_p=top_p, seed=None if request.seed is None else int(request.seed),
                   n=_int("n", request.n, 1), stop_ids=stop_ids, stop_strings=stop_strings,
                   namespace=request.namespace, ignore_eos=bool(request.ignore_eos))


def encode(tokenizer, request: Request, vocab_size: int) -> list[int]:
    """Token ids of a request's prompt (chat template applied for ``messages``), each checked
    to be an int in [0, vocab_size)."""
    given = [name for name in ("prompt", "messages", "token_ids") if getattr(request, name) is not None]
    if len(given) != 1:
        raise ValueError(f"request: give exactly one of prompt, messages, token_ids (got {given or 'none'})")
    if request.token_ids is not None:
        ids = token_id_list("token_ids", request.token_ids, vocab_size)
    else:
        if tokenizer is None:
            raise ValueError(f"request.{given[0]}: text prompts need a tokenizer; pass token_ids or give the "
                             "engine a tokenizer")
        if request.messages is not None:
            if not isinstance(request.messages, (list, tuple)) or not all(
                    isinstance(m, dict) for m in request.messages):
                raise TypeError(f"request.messages: expected a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {_what(request.messages)}")
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("request.messages: the model's tokenizer has no chat template; pass prompt text "
                                 "instead")
            # Render to text, then tokenize without special tokens: the template already holds
            # them, and this behaves the same across transformers versions (whose tokenize=True
            # return types differ).
            text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                                 tokenize=False)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            if not isinstance(request.prompt, str):
                raise TypeError(f"request.prompt: expected a str, got {_what(request.prompt)}")
            ids = list(tokenizer(request.prompt)["input_ids"])
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"request.{given[0]}: the tokenizer gave ids {bad[:5]} outside the model's vocabulary "
                             f"[0, {vocab_size})")
    if not ids:
        raise ValueError(f"request.{given[0]}: prompt is empty after tokenization")
    return ids


def refuse_unfittable(field: str, prompt_tokens: int, max_new_tokens: int, n: int, needs, *, chunk_size: int,
                      budget_tokens: int | None) -> None:
    """Refuse (ValueError naming ``field``) a request that could not take a step even alone in an
    empty cache. ``needs``: what its largest step needs and an empty cache has (StepNeeds fields);
    ``budget_tokens``: the eviction budget, for the device-tier message."""
    if needs.pool_chunks > needs.pool_available:
        capacity = needs.pool_available
        raise ValueError(
            f"{field}: {prompt_tokens} tokens{f' with n={n} samples' if n > 1 else ''} need {needs.pool_chunks} "
            f"chunks of {chunk_size} tokens to start decoding, but the KV cache holds {capacity} "
            f"({capacity * chunk_size} tokens); raise capacity_tokens (--kv-tokens) or shorten the prompt")
    if needs.device_chunks > needs.device_available:
        raise ValueError(
            f"{field}: {prompt_tokens} tokens (+ up to {max_new_tokens} new"
            f"{f', n={n} samples' if n > 1 else ''}) need up to {needs.device_chunks} chunks of {chunk_size} tokens "
            f"on the device at once (prefill, and decode within budget_tokens={budget_tokens}, "
            f"attend to every chunk{'; each other sample keeps its partial chunk there' if n > 1 else ''}), but "
            f"eviction.device_chunks={needs.device_available}; raise device_chunks, lower budget_tokens, "
            f"or shorten the request")


def finish_reason(tokens: list[int], length: int, p: Checked, stop_ids: frozenset, max_context: int | None,
                  decode: Callable[[list[int]], str] | None) -> tuple[str | None, str | None]:
    """Whether a sample ends with its newest token ``tokens[-1]``: (reason, text), reason None
    while it goes on; text is the output cut before a stop string, else None (decode it all).
    ``length``: the sample's tokens in the cache, the new one included; ``decode``: token ids to
    text (needed only with stop strings, which validation allows only with a tokenizer)."""
    if tokens[-1] in stop_ids:
        return "stop", None
    if p.stop_strings:
        text = decode(tokens)
        cut = min((text.find(x) for x in p.stop_strings if x in text), default=-1)
        if cut >= 0:
            return "stop", text[:cut]
    if len(tokens) >= p.max_new_tokens:
        return "length", None
    if max_context and length >= max_context:
        # The next step would feed this token at position ``length``, past what the model (or
        # its sliding window, which chunkvale does not apply) supports.
        return "length", None
    return None, None
