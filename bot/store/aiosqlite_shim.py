"""The store's one use of aiosqlite's private API, checked instead of trusted.

aiosqlite has no public way to run our own function in its thread, where the sqlite3 connection
lives, in order with the requests already queued; running a whole transaction there in one hop
needs exactly that. aiosqlite 0.20 through 0.22 queue a callable with ``Connection._execute(fn,
*args)`` and expose the sqlite3 connection as ``Connection._conn``. A release that drops either is
reported when a database is opened, naming the versions known to work, instead of failing on the
first admission.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Callable
from typing import TypeVar, cast

import aiosqlite

from .records import StoreError

T = TypeVar("T")

SUPPORTED_VERSIONS = "aiosqlite 0.20 to 0.22"


def _problem() -> str | None:
    connection = aiosqlite.Connection
    if not inspect.iscoroutinefunction(getattr(connection, "_execute", None)):
        return "aiosqlite.Connection._execute is gone or no longer a coroutine function"
    if not isinstance(getattr(connection, "_conn", None), property):
        return "aiosqlite.Connection._conn is gone or no longer a property"
    return None


_PROBLEM = _problem()  # once, at import: the installed aiosqlite does not change under us


def require_supported() -> None:
    """Raise :class:`StoreError` if the installed aiosqlite lacks the private API used here."""
    if _PROBLEM is not None:
        version = getattr(aiosqlite, "__version__", "of unknown version")
        raise StoreError(
            f"the installed aiosqlite {version} is not supported: {_PROBLEM}; "
            f"install {SUPPORTED_VERSIONS} (pip install 'aiosqlite>=0.20,<0.23')"
        )


async def run_in_connection_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn(sqlite3 connection)`` in ``conn``'s thread, after the requests queued before it and
    before those queued after; its result or exception comes back here."""
    require_supported()
    return cast(T, await conn._execute(fn, conn._conn))
