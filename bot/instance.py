"""One running bot per database: a lock on a file beside it, held while `fluxbot run` runs.

Two bots on one ledger would both admit and charge every interaction, and the second would
re-queue the first's running job at its start. The lock is the kernel's (`flock`), so it dies
with its holder, SIGKILL included: a crashed bot never blocks its own restart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class AlreadyRunning(Exception):
    """Another process holds this database's lock; the message says which and what to do."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""


@contextlib.contextmanager
def exclusive(database: Path) -> Iterator[None]:
    """Hold the database's lock for the block, or raise `AlreadyRunning` at once, touching nothing."""
    path = lock_path(Path(database))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(
                    f"another fluxbot is already running on {database}{_holder(path)}: stop it first "
                    "(two bots on one database would charge and paint every job twice)"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
