"""The SQLite connection: opening it safely, migrating it, and handing it out one user at a time.

Opening refuses a corrupt file or one from a newer fluxbot before changing anything, then turns on
WAL (readers never wait for the writer) and applies the missing migrations, each in one
transaction together with its ``PRAGMA user_version`` bump.

One aiosqlite connection per :class:`Database`, used by one coroutine at a time (an
``asyncio.Lock``); every multi-statement write runs in an explicit ``BEGIN IMMEDIATE``
transaction, which takes SQLite's write lock at once, so several coroutines, and several
databases or processes on the same file, serialise their read-check-write steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .aiosqlite_shim import require_supported, run_in_connection_thread
from .records import StoreBusy, StoreError
from .schema import LATEST_VERSION, MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
"""How long a connection waits for another writer's lock before giving up."""

SQL_PRAGMA_BUSY_TIMEOUT = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
SQL_PRAGMA_BUSY_TIMEOUT_GET = "PRAGMA busy_timeout"
SQL_PRAGMA_WAL = "PRAGMA journal_mode = WAL"
SQL_PRAGMA_JOURNAL_MODE = "PRAGMA journal_mode"
SQL_PRAGMA_INTEGRITY_CHECK = "PRAGMA integrity_check"
SQL_PRAGMA_USER_VERSION = "PRAGMA user_version"
SQL_PRAGMA_SET_USER_VERSION = "PRAGMA user_version = {version:d}"  # PRAGMA takes no parameters
SQL_PRAGMA_JOURNAL_DELETE = "PRAGMA journal_mode = DELETE"

SQL_BEGIN = "BEGIN IMMEDIATE"
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"

SqlParams = Iterable[Any]
"""Positional values (a sequence) or named ones (a mapping, for ``:name`` placeholders)."""


async def execute(conn: aiosqlite.Connection, sql: str, params: SqlParams = ()) -> tuple[int, int | None]:
    """Run one statement; return (rowcount, lastrowid)."""
    async with conn.execute(sql, params) as cursor:
        return cursor.rowcount, cursor.lastrowid


async def fetch_all(conn: aiosqlite.Connection, sql: str, params: SqlParams = ()) -> list[sqlite3.Row]:
    return list(await conn.execute_fetchall(sql, params))


async def fetch_one(conn: aiosqlite.Connection, sql: str, params: SqlParams = ()) -> sqlite3.Row | None:
    rows = await fetch_all(conn, sql, params)
    return rows[0] if rows else None


async def fetch_value(conn: aiosqlite.Connection, sql: str, params: SqlParams = ()) -> Any:
    """The first column of the first row, or None when there is no row."""
    row = await fetch_one(conn, sql, params)
    return None if row is None else row[0]


async def _integrity_problems(conn: aiosqlite.Connection) -> list[str]:
    rows = await fetch_all(conn, SQL_PRAGMA_INTEGRITY_CHECK)
    messages = [str(row[0]) for row in rows]
    return [] if messages == ["ok"] else messages


class Database:
    """An open, migrated SQLite database. Open with :meth:`Database.open`; close with :meth:`close`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self._lock = asyncio.Lock()
        self.path = path

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (creating it and its parent folder if needed), check and migrate the database."""
        require_supported()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder for database {path}: {exc}") from exc
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        database = cls(conn, path)
        try:
            await database._prepare(conn)
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return database

    async def _prepare(self, conn: aiosqlite.Connection) -> None:
        await execute(conn, SQL_PRAGMA_BUSY_TIMEOUT)
        problems = await _integrity_problems(conn)
        if problems:
            shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
            raise StoreError(
                f"database {self.path} failed its integrity check ({shown}); restore it from a backup or move it aside"
            )
        self._check_version(int(await fetch_value(conn, SQL_PRAGMA_USER_VERSION)))
        mode = await self._enable_wal(conn)
        if mode != "wal":
            raise StoreError(f"database {self.path} cannot use WAL journal mode (got {mode!r})")
        await self._migrate()

    async def _enable_wal(self, conn: aiosqlite.Connection) -> str:
        """Switch to WAL. SQLite answers "locked" at once, without the busy handler, when another
        connection switches the same new file at the same moment: retry briefly."""
        delay = 0.01
        for _ in range(40):
            try:
                return str(await fetch_value(conn, SQL_PRAGMA_WAL)).lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        return str(await fetch_value(conn, SQL_PRAGMA_WAL)).lower()

    def _check_version(self, version: int) -> None:
        if version > LATEST_VERSION:
            raise StoreError(
                f"database schema version {version} is newer than this fluxbot supports "
                f"({LATEST_VERSION}); upgrade fluxbot or use a matching backup ({self.path})"
            )
        if version < 0:
            raise StoreError(f"database {self.path} has an invalid schema version {version}")

    async def _migrate(self) -> None:
        """Apply missing migrations forward, each in one transaction with its user_version bump.

        The version is re-read inside each write transaction, so two processes opening the
        same file at once never apply a step twice.
        """
        while True:
            async with self.transaction() as conn:
                version = int(await fetch_value(conn, SQL_PRAGMA_USER_VERSION))
                self._check_version(version)
                if version == LATEST_VERSION:
                    return
                migration = MIGRATIONS[version]
                try:
                    for statement in migration.statements:
                        await execute(conn, statement)
                    await execute(conn, SQL_PRAGMA_SET_USER_VERSION.format(version=migration.version))
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"migration {migration.version} ({migration.name}) of {self.path} failed: {exc}; "
                        f"the database is left at version {version}"
                    ) from exc
            log.info("database %s migrated to schema version %d (%s)", self.path, migration.version, migration.name)

    async def close(self) -> None:
        """Close the connection (idempotent). Waits for the operation in progress, if any."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    # ---------------------------------------------------------------- using the connection

    def _open_connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @contextlib.asynccontextmanager
    async def locked(self, deadline_s: float | None = None) -> AsyncIterator[aiosqlite.Connection]:
        """The connection under the lock, sqlite errors as StoreError, and no transaction of its
        own: for reads (each statement is its own snapshot) and as the base of the transactions.
        With `deadline_s`, waiting longer than that for the lock raises `StoreBusy`."""
        try:
            await asyncio.wait_for(self._lock.acquire(), deadline_s)
        except asyncio.TimeoutError:
            raise StoreBusy(f"database {self.path} is busy (another operation held it over {deadline_s} s)") from None
        try:
            conn = self._open_connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"database error on {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block succeeds, else rolled back."""
        async with self._lock:
            conn = self._open_connection()
            try:
                await execute(conn, SQL_BEGIN)
                yield conn
                await execute(conn, SQL_COMMIT)
            except BaseException as exc:
                # Also on cancellation, even while BEGIN was awaited: aiosqlite runs requests
                # in order, so this ROLLBACK follows any statement still in flight.
                await self._rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database error on {self.path}: {exc}") from exc
                raise

    async def transaction_in_db_thread(
        self, fn: Callable[[sqlite3.Connection], tuple[bool, T]], *, deadline_s: float | None = None
    ) -> T:
        """`fn(connection) -> (commit, result)` as one ``BEGIN IMMEDIATE`` transaction, run whole in
        aiosqlite's thread: one hop instead of a loop<->thread hand-off per statement (a burst of
        /imagine on a busy CPU waited on a dozen of them per admission). Committed when `fn` says
        so, rolled back when it does not or raises."""

        start = time.monotonic()

        def begin(db: sqlite3.Connection) -> None:
            if deadline_s is None:
                db.execute(SQL_BEGIN)
                return
            # Wait for another writer's lock only as long as the deadline leaves, then give up.
            left_ms = max(1, int((deadline_s - (time.monotonic() - start)) * 1000))
            db.execute(f"PRAGMA busy_timeout = {left_ms}")
            try:
                db.execute(SQL_BEGIN)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreBusy(f"database {self.path} is locked by another writer") from None
                raise
            finally:
                db.execute(SQL_PRAGMA_BUSY_TIMEOUT)

        def run(db: sqlite3.Connection) -> T:
            begin(db)
            try:
                commit, result = fn(db)
                db.execute(SQL_COMMIT if commit else SQL_ROLLBACK)
                return result
            except BaseException:
                if db.in_transaction:
                    db.execute(SQL_ROLLBACK)
                raise

        async with self.locked(deadline_s) as conn:  # the lock and the error mapping; `run` opens its own transaction
            return await run_in_connection_thread(conn, run)

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        try:
            await execute(conn, SQL_ROLLBACK)
        except sqlite3.OperationalError as exc:
            if "no transaction is active" not in str(exc):
                log.warning("rollback on %s failed: %s", self.path, exc)

    # ---------------------------------------------------------------- maintenance

    async def schema_version(self) -> int:
        async with self.locked() as conn:
            return int(await fetch_value(conn, SQL_PRAGMA_USER_VERSION))

    async def pragmas(self) -> dict[str, Any]:
        """This connection's journal_mode and busy_timeout (for tests)."""
        async with self.locked() as conn:
            return {
                "journal_mode": await fetch_value(conn, SQL_PRAGMA_JOURNAL_MODE),
                "busy_timeout": await fetch_value(conn, SQL_PRAGMA_BUSY_TIMEOUT_GET),
            }

    async def integrity_ok(self) -> bool:
        async with self.locked() as conn:
            return not await _integrity_problems(conn)

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """Copy the database online (SQLite backup API) to the new file ``dest``.

        The copy is written beside ``dest``, checked, switched to a single-file journal
        mode and only then renamed into place; an existing ``dest`` is refused.
        """
        target_path = Path(dest)
        tmp_path = _new_partial_file(target_path)
        try:
            await self._backup_to(tmp_path)
            _move_into_place(tmp_path, target_path)
        except OSError as exc:
            raise StoreError(f"cannot write backup {target_path}: {exc}") from exc
        finally:
            _unlink_quietly(tmp_path, Path(f"{tmp_path}-journal"), Path(f"{tmp_path}-wal"), Path(f"{tmp_path}-shm"))
        log.info("database %s backed up to %s", self.path, target_path)

    async def _backup_to(self, tmp_path: Path) -> None:
        # The backup runs on this database's thread, so the target must accept use from it.
        target = await aiosqlite.connect(tmp_path, isolation_level=None, check_same_thread=False)
        try:
            async with self.locked() as conn:  # holding the lock: never copy a half-done transaction
                await conn.backup(target)
            problems = await _integrity_problems(target)
            if problems:
                raise StoreError(f"the backup copy failed its integrity check: {'; '.join(problems[:5])}")
            await execute(target, SQL_PRAGMA_JOURNAL_DELETE)
        except sqlite3.Error as exc:
            raise StoreError(f"backup of {self.path} failed: {exc}") from exc
        finally:
            await target.close()


# The file steps of a backup are quick local calls, made on the event loop; the copy itself, which
# may take a while, runs on aiosqlite's thread.


def _new_partial_file(target_path: Path) -> Path:
    """An empty file beside ``target_path`` to copy into, so a failed backup never leaves a
    half-written file under the name asked for."""
    if target_path.exists():
        raise StoreError(f"backup destination {target_path} already exists")
    try:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target_path.name}.", suffix=".partial", dir=target_path.parent)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot write backup {target_path}: {exc}") from exc
    return Path(tmp_name)


def _move_into_place(tmp_path: Path, target_path: Path) -> None:
    if target_path.exists():
        raise StoreError(f"backup destination {target_path} already exists")
    os.replace(tmp_path, target_path)


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
