"""The keys a worker checks signatures with, read again on SIGHUP and whenever the keys file
changes on disk (a stat every POLL_S). A file is taken whole or not at all: the new keys
replace the old in one assignment, so a request already verified finishes with its key and
the next one meets the new set; a file that cannot be read leaves the old keys in force,
and is logged and counted (`issuer_keys_reload_errors_total`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from issuer import metrics
from issuer.auth import ApiKey, KeysFileError, read_keys

log = logging.getLogger("issuer.keys")
POLL_S = 1.0  # a change on disk is in force in every worker within about this


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (None: it is not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Keyring:
    """The keys in force (`current`) and the file they come from."""

    def __init__(self, path: Path, keys: dict[str, ApiKey]) -> None:
        self.path = path
        self.current = keys
        self._stamp = _stamp(path)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """The file's keys; KeysFileError if it cannot be read (at start: nothing to keep)."""
        stamp = _stamp(path)
        ring = cls(path, read_keys(path))
        ring._stamp = stamp  # a change during the read is noticed by the next poll
        return ring

    def reload(self) -> bool:
        """Read the file again; True if its keys are now in force."""
        stamp = _stamp(self.path)
        try:
            keys = read_keys(self.path)
        except KeysFileError as exc:
            if _stamp(self.path) != stamp:  # read mid-write: the finished file comes next
                return False
            self._stamp = stamp
            metrics.count(metrics.KEYS_RELOAD_ERRORS)
            log.error("keys file not reloaded, the old keys stay", extra={"error": str(exc)})
            return False
        if _stamp(self.path) != stamp:
            return False
        self._stamp = stamp
        old = self.current
        self.current = keys
        log.info(
            "keys reloaded",
            extra={
                "keys": len(keys),
                "added": sorted(keys.keys() - old.keys()),
                "removed": sorted(old.keys() - keys.keys()),
                "changed": sorted(i for i in keys.keys() & old.keys() if keys[i] != old[i]),
            },
        )
        return True

    def poll(self) -> None:
        """Reload if the file changed since it was last read."""
        if _stamp(self.path) != self._stamp:
            self.reload()

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
            self.poll()
