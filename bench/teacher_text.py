"""The teacher-forced text of bench/fidelity.py and bench/explore_selection.py: which text, how
many of its tokens, and how they split into the prompt (prefilled), the tokens fed one a step,
and the true next tokens those steps are scored against."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# The GNU GPL version 3, as Debian's base-files package ships it: natural language on every
# Debian machine, no download.
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def add_arguments(ap, positions: int) -> None:
    """--text, --context, --positions (default ``positions``)."""
    ap.add_argument("--text", default=DEFAULT_TEXT, help="a UTF-8 text file of natural language")
    ap.add_argument("--context", type=int, default=4096, help="tokens of the text: prefill + decoded positions")
    ap.add_argument("--positions", type=int, default=positions, help="last positions decoded one token at a time")


def check_arguments(ap, args) -> None:
    if not 0 < args.positions < args.context:
        ap.error(f"--positions: expected 1 .. --context - 1 = {args.context - 1}, got {args.positions}")


def text_tokens(tokenizer, path: str, n: int) -> list[int]:
    """The first ``n`` tokens of the text at ``path`` (no special tokens)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        sys.exit(f"--text {path}: {len(ids)} tokens, fewer than the {n} needed (--context + 1)")
    return ids[:n]


@dataclass(frozen=True)
class TeacherText:
    prompt: list[int]   # the first context - positions tokens: prefilled
    fed: list[int]      # the next positions tokens: fed one a step
    targets: list[int]  # the token after each fed one: what each step is scored against

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)


def split(tokenizer, args) -> TeacherText:
    ids = text_tokens(tokenizer, args.text, args.context + 1)
    n = args.context - args.positions
    return TeacherText(ids[:n], ids[n:args.context], ids[n + 1:args.context + 1])
