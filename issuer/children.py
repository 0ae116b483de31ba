"""Child processes that never outlive their parent (Linux `PR_SET_PDEATHSIG`)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(death_signal: int) -> Callable[[], None]:
    """A Popen `preexec_fn`: the child gets `death_signal` when this process dies, even by
    SIGKILL, so that no child outlives its owner."""
    parent = os.getpid()

    def arm() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return arm
