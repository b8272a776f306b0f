"""One user at a time: the rule that keeps a ChunkvaleCache, and a KVCache a model runs on,
consistent when threads share them.

A ChunkvaleCache holds one generation's rows, and a KVCache has one open step at a time; two
threads driving either at once would interleave their steps (one thread's step ended by the
other's ``add_sequence``, sequences added by one and never removed). So every use claims what
it touches for its thread:

- a ``generate()`` call its ChunkvaleCache, from its start (when transformers prepares the
  cache) until it returns;
- a forward with a ChunkvaleCache that cache and its KVCache, for the forward;
- ``ChunkvaleCache.reset()`` / ``release()`` that cache and its KVCache, for the call;
- ``Engine.step()`` / ``Engine.cancel()`` the engine's KVCache, for the call.

A use on another thread while a claim holds raises RuntimeError at once, before anything
changes, naming the use that holds it. A claim lapses when the frame that made it has returned
or raised (looked up on its thread's stack): nothing has to remember to release it, and a
forward interrupted by Ctrl-C never locks a cache for good. Uses on one thread never refuse
one another.
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass
from types import CodeType, FrameType

_lock = threading.Lock()
_of_kv: "weakref.WeakKeyDictionary[object, Users]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Claim:
    thread: int
    thread_name: str
    frame: int  # id() of the frame whose return ends the claim, with its code
    code: CodeType
    what: str

    def live(self, stacks) -> bool:
        f = stacks.get(self.thread)
        while f is not None:
            if id(f) == self.frame and f.f_code is self.code:
                return True
            f = f.f_back
        return False


class Users:
    """The claims on one object; ``label`` and ``rule`` say what it is and why one at a time."""

    def __init__(self, label: str, rule: str):
        self.label, self.rule = label, rule
        self._claims: list[_Claim] = []


def of_kv(kv) -> Users | None:
    """The claims on a KVCache (None for an object that cannot be tracked, e.g. a test double)."""
    with _lock:
        try:
            users = _of_kv.get(kv)
            if users is None:
                users = _of_kv[kv] = Users("its kv_cache", "a KVCache runs one step at a time; give each thread its "
                                           "own kv_cache, or batch requests with chunkvale.engine.Engine")
            return users
        except TypeError:
            return None


def claim(frame: FrameType, what: str, *users: Users | None) -> None:
    """Claim ``users`` for this thread until ``frame`` returns; RuntimeError naming ``what`` and
    the holder if another thread's claim on one of them is live. All or nothing."""
    me = threading.get_ident()
    users = [u for u in users if u is not None]
    with _lock:
        stacks = sys._current_frames()
        for u in users:
            u._claims = [c for c in u._claims if c.live(stacks)]
            held = next((c for c in u._claims if c.thread != me), None)
            if held is not None:
                raise RuntimeError(f"{what}: {u.label} is in use by {held.what} on thread {held.thread_name!r} "
                                   f"({u.rule}); refused, nothing was changed")
        c = _Claim(me, threading.current_thread().name, id(frame), frame.f_code, what)
        for u in users:
            u._claims.append(c)


def forward_frame(hook_frame: FrameType) -> FrameType:
    """The frame of the module call a forward hook runs in (torch's ``_call_impl``, which runs the
    pre-hook, the forward and the post-hooks, also those called after the forward raised)."""
    f = hook_frame.f_back
    while f is not None:
        if f.f_code.co_name == "_call_impl":
            return f
        f = f.f_back
    return hook_frame.f_back
