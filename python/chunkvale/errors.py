"""chunkvale's own exception. Every other error is a built-in type (ValueError, TypeError,
KeyError, OSError) whose message names the argument, what was expected and what was given."""
from __future__ import annotations

from typing import Optional


class CapacityError(RuntimeError):
    """A step, sequence or fork does not fit the cache; nothing changed.

    ``resource`` names the config field that bounds what ran out ("capacity_chunks",
    "eviction.device_chunks" or "eviction.host_bytes"); ``needed`` and ``available`` are in
    its unit (pool chunks, device chunks per evicting layer, host blocks). Callers decide on
    these fields, never on the message text.
    """

    def __init__(self, message: str, resource: Optional[str] = None, needed: Optional[int] = None,
                 available: Optional[int] = None):
        super().__init__(message)
        self.resource = resource
        self.needed = needed
        self.available = available

    def __reduce__(self):  # pickling keeps the fields (multiprocessing, logging handlers)
        return (type(self), (str(self), self.resource, self.needed, self.available))


def _hand_to_native() -> None:
    """The native module raises this class for the core's CapacityError; it is handed in here
    rather than imported from there, so that the module never imports the package above it."""
    from . import _native

    _native.set_capacity_error_type(CapacityError)


_hand_to_native()
