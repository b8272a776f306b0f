"""The rows a ``chunkvale.hf.ChunkvaleCache`` holds (one KVCache sequence each) and their release,
shared with the finalizer that runs when the cache is garbage-collected."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .cache import KVCache


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
            self.step.cancel()  # idempotent; a committed step stays committed
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
