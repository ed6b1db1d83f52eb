"""SQLite store: schema and migrations, daily quotas, and the job ledger.

The ledger is the truth. A job is accepted only when its row and its quota
charge are committed together (:meth:`Store.admit`), and a job row remembers
which UTC day it was charged to (``charged_day``), so a refund returns the unit
to that day, at most once.

Concurrency: one aiosqlite connection per :class:`Store`, used by one coroutine
at a time (an ``asyncio.Lock``); every multi-statement write runs in an
explicit ``BEGIN IMMEDIATE`` transaction, so several coroutines, and several
``Store`` objects or processes on the same file, can never exceed a limit.

All SQL lives in this module as named strings; migrations are the
``MIGRATIONS`` tuple, applied forward only, one transaction each together with
the ``PRAGMA user_version`` bump.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite

from .params import JobParams

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
"""How long a connection waits for another writer's lock before giving up."""

MAX_ERROR_CHARS = 2_000
"""Longer error texts are truncated before they are stored."""

ORIGINS = ("imagine", "reroll")
SETTING_DEFAULT_LIMIT = "default_daily_limit"


class StoreError(Exception):
    """The database cannot be opened, migrated or used, or a request makes no sense."""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    GENERATED = "generated"  # image saved to disk, not yet delivered
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.GENERATED)
"""Count toward queue caps; are resumed after a restart."""


@dataclass(frozen=True, kw_only=True)
class NewJob(JobParams):
    """A job to admit: its parameters plus who asked, where, and through which interaction."""

    user_id: int
    guild_id: int | None
    channel_id: int | None
    interaction_id: int | None = None
    interaction_token: str | None = None
    interaction_created_at: float | None = None  # unix seconds
    application_id: int | None = None
    origin: str = "imagine"  # "imagine" | "reroll"
    upload_limit: int | None = None  # bytes the interaction may upload (boosted servers allow more)


@dataclass(frozen=True, kw_only=True)
class JobRecord(JobParams):
    """One row of ``jobs``: the job's parameters plus its ledger state."""

    id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    status: JobStatus
    attempts: int
    charged_day: str | None  # the UTC day the quota unit was taken from; None once refunded
    queued_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    interaction_id: int | None
    interaction_token: str | None
    interaction_created_at: float | None
    application_id: int | None
    origin: str
    progress_message_id: int | None  # the message that shows queue position/progress
    result_path: str | None  # where the finished image waits for delivery
    result_message_id: int | None  # the delivered message
    duration_s: float | None  # generation seconds
    upload_limit: int | None  # bytes the interaction may upload; None: Discord's default


@dataclass(frozen=True)
class QuotaStatus:
    user_id: int
    day: str
    used: int
    limit: int
    remaining: int  # max(0, limit - used)
    resets_at: datetime  # next UTC midnight, tz-aware
    has_override: bool


class AdmissionStatus(enum.Enum):
    ACCEPTED = "accepted"
    QUEUE_FULL = "queue_full"
    USER_CAP = "user_cap"
    QUOTA_EXHAUSTED = "quota_exhausted"


@dataclass(frozen=True)
class Admission:
    status: AdmissionStatus
    job: JobRecord | None
    quota: QuotaStatus


# --------------------------------------------------------------------------- time


def _as_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass a timezone-aware datetime (UTC)")
    return now.astimezone(timezone.utc)


def utc_day(now: datetime) -> str:
    """The quota day of ``now``: its UTC date as ``YYYY-MM-DD``."""
    return _as_utc(now).date().isoformat()


def next_reset(now: datetime) -> datetime:
    """The next UTC midnight after ``now`` (tz-aware), when the quota day of ``now`` ends."""
    day = _as_utc(now).date() + timedelta(days=1)
    return datetime.combine(day, time(0), tzinfo=timezone.utc)


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    """One forward step of the schema. Never edit a released migration; append a new one."""

    version: int
    name: str
    sql: str

    @property
    def statements(self) -> list[str]:
        return split_sql(self.sql)


MIGRATION_1_INITIAL = """
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE user_limits (
    user_id     INTEGER PRIMARY KEY,
    daily_limit INTEGER NOT NULL CHECK (daily_limit >= 0)
);

CREATE TABLE usage (
    user_id INTEGER NOT NULL,
    day     TEXT    NOT NULL,
    used    INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (user_id, day)
) WITHOUT ROWID;

CREATE TABLE jobs (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id                INTEGER NOT NULL,
    guild_id               INTEGER,
    channel_id             INTEGER,
    prompt                 TEXT    NOT NULL,
    seed                   INTEGER NOT NULL,
    steps                  INTEGER NOT NULL,
    width                  INTEGER NOT NULL,
    height                 INTEGER NOT NULL,
    status                 TEXT    NOT NULL CHECK (status IN
                               ('queued', 'running', 'generated', 'done', 'failed', 'cancelled')),
    attempts               INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    charged_day            TEXT,
    queued_at              REAL    NOT NULL,
    started_at             REAL,
    finished_at            REAL,
    error                  TEXT,
    interaction_id         INTEGER,
    interaction_token      TEXT,
    interaction_created_at REAL,
    application_id         INTEGER,
    origin                 TEXT    NOT NULL DEFAULT 'imagine'
);

CREATE INDEX jobs_status ON jobs (status);
"""

MIGRATION_2_DELIVERY_RECOVERY = """
ALTER TABLE jobs ADD COLUMN progress_message_id INTEGER;
ALTER TABLE jobs ADD COLUMN result_path TEXT;
ALTER TABLE jobs ADD COLUMN result_message_id INTEGER;
ALTER TABLE jobs ADD COLUMN duration_s REAL;

DROP INDEX jobs_status;
CREATE INDEX jobs_active ON jobs (status, id)
    WHERE status IN ('queued', 'running', 'generated');
CREATE INDEX jobs_user_active ON jobs (user_id, status)
    WHERE status IN ('queued', 'running', 'generated');
CREATE INDEX jobs_charged ON jobs (user_id, charged_day)
    WHERE charged_day IS NOT NULL;
"""

MIGRATION_3_UPLOAD_LIMIT = """
ALTER TABLE jobs ADD COLUMN upload_limit INTEGER;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial: settings, user_limits, usage, jobs", MIGRATION_1_INITIAL),
    Migration(2, "delivery and recovery columns, active-job indexes", MIGRATION_2_DELIVERY_RECOVERY),
    Migration(3, "the interaction's upload limit, kept across restarts", MIGRATION_3_UPLOAD_LIMIT),
)


def split_sql(script: str) -> list[str]:
    """Split a script into complete statements (semicolons inside strings or triggers are kept)."""
    statements: list[str] = []
    parts = script.split(";")
    buffer = ""
    for index, part in enumerate(parts):
        buffer += part
        if index == len(parts) - 1:
            break
        buffer += ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: {buffer.strip()[:80]!r}")
    return statements


def validate_migrations(migrations: Sequence[Migration]) -> int:
    """Check that versions run 1, 2, ... N without gaps; return N (the latest version)."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise StoreError(
                f"migration list is broken: expected version {expected}, found {migration.version} "
                f"({migration.name!r}); versions must run 1..N without gaps"
            )
        if not migration.statements:
            raise StoreError(f"migration {migration.version} ({migration.name!r}) has no statements")
    return len(migrations)


LATEST_VERSION = validate_migrations(MIGRATIONS)


# --------------------------------------------------------------------------- SQL

_JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobRecord))
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_ACTIVE_IN = ", ".join(f"'{status.value}'" for status in ACTIVE_STATUSES)

SQL_PRAGMA_BUSY_TIMEOUT = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
SQL_PRAGMA_BUSY_TIMEOUT_GET = "PRAGMA busy_timeout"
SQL_PRAGMA_WAL = "PRAGMA journal_mode = WAL"
SQL_PRAGMA_JOURNAL_MODE = "PRAGMA journal_mode"
SQL_PRAGMA_FOREIGN_KEYS_ON = "PRAGMA foreign_keys = ON"
SQL_PRAGMA_FOREIGN_KEYS = "PRAGMA foreign_keys"
SQL_PRAGMA_FOREIGN_KEY_CHECK = "PRAGMA foreign_key_check"
SQL_PRAGMA_INTEGRITY_CHECK = "PRAGMA integrity_check"
SQL_PRAGMA_USER_VERSION = "PRAGMA user_version"
SQL_PRAGMA_SET_USER_VERSION = "PRAGMA user_version = {version:d}"  # PRAGMA takes no parameters
SQL_PRAGMA_JOURNAL_DELETE = "PRAGMA journal_mode = DELETE"

SQL_BEGIN = "BEGIN IMMEDIATE"
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"

SQL_GET_SETTING = "SELECT value FROM settings WHERE key = ?"
SQL_SET_SETTING = """
INSERT INTO settings (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
SQL_SET_USER_LIMIT = """
INSERT INTO user_limits (user_id, daily_limit) VALUES (?, ?)
ON CONFLICT (user_id) DO UPDATE SET daily_limit = excluded.daily_limit
"""
SQL_DELETE_USER_LIMIT = "DELETE FROM user_limits WHERE user_id = ?"

SQL_QUOTA = f"""
SELECT
    (SELECT daily_limit FROM user_limits WHERE user_id = :user_id) AS override,
    (SELECT value FROM settings WHERE key = '{SETTING_DEFAULT_LIMIT}') AS db_default,
    COALESCE((SELECT used FROM usage WHERE user_id = :user_id AND day = :day), 0) AS used
"""
SQL_ACTIVE_COUNTS = f"""
SELECT
    (SELECT COUNT(*) FROM jobs WHERE status IN ({_ACTIVE_IN})) AS active_total,
    (SELECT COUNT(*) FROM jobs WHERE user_id = :user_id AND status IN ({_ACTIVE_IN})) AS active_user
"""
SQL_CHARGE = """
INSERT INTO usage (user_id, day, used) VALUES (?, ?, 1)
ON CONFLICT (user_id, day) DO UPDATE SET used = used + 1
"""
SQL_UNCHARGE = "UPDATE usage SET used = MAX(used - 1, 0) WHERE user_id = ? AND day = ?"
SQL_CLEAR_CHARGE = "UPDATE jobs SET charged_day = NULL WHERE id = ?"
SQL_RESET_USAGE = "UPDATE usage SET used = 0 WHERE user_id = ? AND day = ?"
# After a reset, today's charged jobs no longer hold a unit: a later refund must not credit one.
SQL_FORGIVE_CHARGES = "UPDATE jobs SET charged_day = NULL WHERE user_id = ? AND charged_day = ?"

# A new row: every field of NewJob (the job's parameters among them) plus its starting state.
_INSERT_FIELDS = (*(f.name for f in dataclasses.fields(NewJob)), "status", "charged_day", "queued_at")
SQL_INSERT_JOB = (f"INSERT INTO jobs ({', '.join(_INSERT_FIELDS)}, attempts) "
                  f"VALUES ({', '.join(':' + name for name in _INSERT_FIELDS)}, 0)")
SQL_SELECT_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs"
SQL_GET_JOB = SQL_SELECT_JOBS + " WHERE id = ?"
SQL_ACTIVE_JOBS = SQL_SELECT_JOBS + f" WHERE status IN ({_ACTIVE_IN}) ORDER BY id"
SQL_RECENT_JOBS = SQL_SELECT_JOBS + " ORDER BY id DESC LIMIT ?"
SQL_JOB_STATE = "SELECT status, user_id, charged_day FROM jobs WHERE id = ?"

SQL_MARK_RUNNING = "UPDATE jobs SET status = :status, attempts = attempts + 1, started_at = :now WHERE id = :id"
SQL_MARK_GENERATED = """
UPDATE jobs SET status = :status, result_path = :result_path, duration_s = :duration_s WHERE id = :id
"""
SQL_MARK_DONE = """
UPDATE jobs SET status = :status, result_message_id = :result_message_id, finished_at = :now WHERE id = :id
"""
SQL_MARK_FAILED = "UPDATE jobs SET status = :status, error = :error, finished_at = :now WHERE id = :id"
SQL_MARK_CANCELLED = "UPDATE jobs SET status = :status, finished_at = :now WHERE id = :id"
SQL_REQUEUE = "UPDATE jobs SET status = :status, started_at = NULL WHERE id = :id"
SQL_SET_PROGRESS_MESSAGE = "UPDATE jobs SET progress_message_id = ? WHERE id = ?"

# Which statuses a job may come from to reach each status.
_ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED}),
    JobStatus.GENERATED: frozenset({JobStatus.RUNNING}),
    JobStatus.DONE: frozenset({JobStatus.GENERATED}),
    JobStatus.FAILED: frozenset(ACTIVE_STATUSES),
    JobStatus.CANCELLED: frozenset(ACTIVE_STATUSES),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),  # requeue after a crash
}


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    values: dict[str, Any] = {name: row[name] for name in _JOB_FIELDS}
    values["status"] = JobStatus(values["status"])
    return JobRecord(**values)


def _check_limit(limit: int, what: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {limit!r}")
    return limit


# --------------------------------------------------------------------------- store


async def _execute(conn: aiosqlite.Connection, sql: str, params: Any = ()) -> tuple[int, int | None]:
    """Run one statement; return (rowcount, lastrowid)."""
    async with conn.execute(sql, params) as cursor:
        return cursor.rowcount, cursor.lastrowid


async def _fetchall(conn: aiosqlite.Connection, sql: str, params: Any = ()) -> list[sqlite3.Row]:
    return list(await conn.execute_fetchall(sql, params))


async def _job_state(conn: aiosqlite.Connection, job_id: int) -> sqlite3.Row:
    state = await _fetchone(conn, SQL_JOB_STATE, (job_id,))
    if state is None:
        raise StoreError(f"job {job_id} does not exist")
    return state


async def _fetchone(conn: aiosqlite.Connection, sql: str, params: Any = ()) -> sqlite3.Row | None:
    rows = await _fetchall(conn, sql, params)
    return rows[0] if rows else None


async def _scalar(conn: aiosqlite.Connection, sql: str, params: Any = ()) -> Any:
    row = await _fetchone(conn, sql, params)
    return None if row is None else row[0]


async def _integrity_problems(conn: aiosqlite.Connection) -> list[str]:
    rows = await _fetchall(conn, SQL_PRAGMA_INTEGRITY_CHECK)
    messages = [str(row[0]) for row in rows]
    return [] if messages == ["ok"] else messages


class Store:
    """The bot's SQLite database. Open with :meth:`Store.open`; close with :meth:`close` or ``async with``."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, default_daily_limit: int) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self._lock = asyncio.Lock()
        self._config_default_limit = default_daily_limit
        self.path = path

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, default_daily_limit: int) -> Store:
        """Open (creating it and its parent folder if needed), check and migrate the database."""
        _check_limit(default_daily_limit, "default_daily_limit")
        db_path = Path(path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder for database {db_path}: {exc}") from exc
        try:
            conn = await aiosqlite.connect(db_path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {db_path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, db_path, default_daily_limit)
        try:
            await store._prepare(conn)
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot open database {db_path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return store

    async def _prepare(self, conn: aiosqlite.Connection) -> None:
        await _execute(conn, SQL_PRAGMA_BUSY_TIMEOUT)
        problems = await _integrity_problems(conn)
        if problems:
            shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
            raise StoreError(
                f"database {self.path} failed its integrity check ({shown}); restore it from a backup or move it aside"
            )
        self._check_version(int(await _scalar(conn, SQL_PRAGMA_USER_VERSION)))
        mode = await self._enable_wal(conn)
        if mode != "wal":
            raise StoreError(f"database {self.path} cannot use WAL journal mode (got {mode!r})")
        await _execute(conn, SQL_PRAGMA_FOREIGN_KEYS_ON)
        if await _scalar(conn, SQL_PRAGMA_FOREIGN_KEYS) != 1:
            raise StoreError("this SQLite build cannot enforce foreign keys")
        await self._migrate()

    async def _enable_wal(self, conn: aiosqlite.Connection) -> str:
        """Switch to WAL. SQLite answers "locked" at once, without the busy handler, when another
        connection switches the same new file at the same moment: retry briefly."""
        delay = 0.01
        for _ in range(40):
            try:
                return str(await _scalar(conn, SQL_PRAGMA_WAL)).lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        return str(await _scalar(conn, SQL_PRAGMA_WAL)).lower()

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
            async with self._transaction() as conn:
                version = int(await _scalar(conn, SQL_PRAGMA_USER_VERSION))
                self._check_version(version)
                if version == LATEST_VERSION:
                    return
                migration = MIGRATIONS[version]
                try:
                    for statement in migration.statements:
                        await _execute(conn, statement)
                    await _execute(conn, SQL_PRAGMA_SET_USER_VERSION.format(version=migration.version))
                    violations = await _fetchall(conn, SQL_PRAGMA_FOREIGN_KEY_CHECK)
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"migration {migration.version} ({migration.name}) of {self.path} failed: {exc}; "
                        f"the database is left at version {version}"
                    ) from exc
                if violations:
                    raise StoreError(
                        f"migration {migration.version} ({migration.name}) of {self.path} "
                        f"left {len(violations)} foreign key violation(s); rolled back"
                    )
            log.info("database %s migrated to schema version %d (%s)", self.path, migration.version, migration.name)

    async def close(self) -> None:
        """Close the connection (idempotent). Waits for the operation in progress, if any."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- plumbing

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """Use the connection under the store's lock, sqlite errors as StoreError: for reads (each
        statement is its own snapshot) and for a transaction run whole in aiosqlite's thread."""
        async with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"database error on {self.path}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block succeeds, else rolled back."""
        async with self._lock:
            conn = self._connection()
            try:
                await _execute(conn, SQL_BEGIN)
                yield conn
                await _execute(conn, SQL_COMMIT)
            except BaseException as exc:
                # Also on cancellation, even while BEGIN was awaited: aiosqlite runs requests
                # in order, so this ROLLBACK follows any statement still in flight.
                await self._rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database error on {self.path}: {exc}") from exc
                raise

    async def _transaction_in_db_thread(self, fn: Callable[[sqlite3.Connection], tuple[bool, T]]) -> T:
        """`fn(connection) -> (commit, result)` as one ``BEGIN IMMEDIATE`` transaction, run whole in
        aiosqlite's thread: one hop instead of a loop<->thread hand-off per statement (a burst of
        /imagine on a busy CPU waited on a dozen of them per admission). Committed when `fn` says
        so, rolled back when it does not or raises."""
        def run(db: sqlite3.Connection) -> T:
            db.execute(SQL_BEGIN)
            try:
                commit, result = fn(db)
                db.execute(SQL_COMMIT if commit else SQL_ROLLBACK)
                return result
            except BaseException:
                if db.in_transaction:
                    db.execute(SQL_ROLLBACK)
                raise

        async with self._reading() as conn:  # the lock and the error mapping; `run` opens its own transaction
            # aiosqlite's private API: `run(sqlite3 connection)` in its thread, in order with other requests.
            return await conn._execute(run, conn._conn)

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        try:
            await _execute(conn, SQL_ROLLBACK)
        except sqlite3.OperationalError as exc:
            if "no transaction is active" not in str(exc):
                log.warning("rollback on %s failed: %s", self.path, exc)

    async def schema_version(self) -> int:
        async with self._reading() as conn:
            return int(await _scalar(conn, SQL_PRAGMA_USER_VERSION))

    async def pragmas(self) -> dict[str, Any]:
        """This connection's journal_mode, foreign_keys and busy_timeout (for tests)."""
        async with self._reading() as conn:
            return {
                "journal_mode": await _scalar(conn, SQL_PRAGMA_JOURNAL_MODE),
                "foreign_keys": await _scalar(conn, SQL_PRAGMA_FOREIGN_KEYS),
                "busy_timeout": await _scalar(conn, SQL_PRAGMA_BUSY_TIMEOUT_GET),
            }

    # ---------------------------------------------------------------- quotas

    def _parse_db_default(self, value: Any) -> int | None:
        if value is None:
            return None
        try:
            return _check_limit(int(value), SETTING_DEFAULT_LIMIT)
        except ValueError as exc:
            raise StoreError(f"setting {SETTING_DEFAULT_LIMIT} in {self.path} is invalid: {value!r}") from exc

    async def _quota(self, conn: aiosqlite.Connection, user_id: int, now: datetime) -> QuotaStatus:
        row = await _fetchone(conn, SQL_QUOTA, {"user_id": user_id, "day": utc_day(now)})
        assert row is not None  # a SELECT without FROM always yields one row
        return self._quota_from_row(row, user_id, now)

    def _quota_from_row(self, row: sqlite3.Row, user_id: int, now: datetime) -> QuotaStatus:
        day = utc_day(now)
        override = row["override"]
        db_default = self._parse_db_default(row["db_default"])
        if override is not None:
            limit = int(override)
        elif db_default is not None:
            limit = db_default
        else:
            limit = self._config_default_limit
        used = int(row["used"])
        return QuotaStatus(
            user_id=user_id,
            day=day,
            used=used,
            limit=limit,
            remaining=max(0, limit - used),
            resets_at=next_reset(now),
            has_override=override is not None,
        )

    async def quota_status(self, user_id: int, now: datetime | None = None) -> QuotaStatus:
        now = _as_utc(now)
        async with self._reading() as conn:
            return await self._quota(conn, user_id, now)

    async def set_user_limit(self, user_id: int, limit: int | None) -> None:
        """Set a per-user daily limit (>= 0); ``None`` removes the override."""
        if limit is None:
            async with self._transaction() as conn:
                await _execute(conn, SQL_DELETE_USER_LIMIT, (user_id,))
            return
        _check_limit(limit, "limit")
        async with self._transaction() as conn:
            await _execute(conn, SQL_SET_USER_LIMIT, (user_id, limit))

    async def set_default_limit(self, limit: int) -> None:
        """Store the default daily limit in the database; it wins over the configured one."""
        _check_limit(limit, "limit")
        async with self._transaction() as conn:
            await _execute(conn, SQL_SET_SETTING, (SETTING_DEFAULT_LIMIT, str(limit)))

    async def default_limit(self) -> int:
        async with self._reading() as conn:
            stored = self._parse_db_default(await _scalar(conn, SQL_GET_SETTING, (SETTING_DEFAULT_LIMIT,)))
        return self._config_default_limit if stored is None else stored

    async def reset_usage(self, user_id: int, now: datetime | None = None) -> None:
        """Set the user's usage of today (UTC) to 0.

        Jobs charged today are uncharged too, so refunding one of them later does not
        hand out a unit the reset already gave back.
        """
        day = utc_day(_as_utc(now))
        async with self._transaction() as conn:
            await _execute(conn, SQL_RESET_USAGE, (user_id, day))
            await _execute(conn, SQL_FORGIVE_CHARGES, (user_id, day))

    # ---------------------------------------------------------------- admission

    async def admit(self, job: NewJob, *, max_queue: int, max_per_user: int, now: datetime | None = None) -> Admission:
        """Check caps and quota and, if all pass, insert the job and charge one unit, atomically.

        Refusals, in order: QUEUE_FULL (active jobs of everyone >= max_queue), USER_CAP
        (the user's active jobs >= max_per_user), QUOTA_EXHAUSTED (used >= limit).
        A refusal writes nothing.
        """
        if job.origin not in ORIGINS:
            raise ValueError(f"job origin must be one of {ORIGINS}, got {job.origin!r}")
        now = _as_utc(now)
        day = utc_day(now)
        params = dataclasses.asdict(job)
        params.update(status=JobStatus.QUEUED.value, charged_day=day, queued_at=now.timestamp())

        def admit_in_db_thread(db: sqlite3.Connection) -> tuple[bool, Admission]:
            counts = db.execute(SQL_ACTIVE_COUNTS, {"user_id": job.user_id}).fetchone()
            quota_row = db.execute(SQL_QUOTA, {"user_id": job.user_id, "day": day}).fetchone()
            quota = self._quota_from_row(quota_row, job.user_id, now)
            if counts["active_total"] >= max_queue:
                return False, Admission(AdmissionStatus.QUEUE_FULL, None, quota)
            if counts["active_user"] >= max_per_user:
                return False, Admission(AdmissionStatus.USER_CAP, None, quota)
            if quota.used >= quota.limit:
                return False, Admission(AdmissionStatus.QUOTA_EXHAUSTED, None, quota)
            job_id = db.execute(SQL_INSERT_JOB, params).lastrowid
            db.execute(SQL_CHARGE, (job.user_id, day))
            row = db.execute(SQL_GET_JOB, (job_id,)).fetchone()
            used = quota.used + 1
            charged = dataclasses.replace(quota, used=used, remaining=max(0, quota.limit - used))
            return True, Admission(AdmissionStatus.ACCEPTED, _job_from_row(row), charged)

        return await self._transaction_in_db_thread(admit_in_db_thread)

    # ---------------------------------------------------------------- ledger

    async def get_job(self, job_id: int) -> JobRecord | None:
        async with self._reading() as conn:
            row = await _fetchone(conn, SQL_GET_JOB, (job_id,))
        return None if row is None else _job_from_row(row)

    async def active_jobs(self) -> list[JobRecord]:
        """Queued, running and generated jobs, in queue order (by id)."""
        async with self._reading() as conn:
            rows = await _fetchall(conn, SQL_ACTIVE_JOBS)
        return [_job_from_row(row) for row in rows]

    async def recent_jobs(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        if limit <= 0:
            return []
        async with self._reading() as conn:
            rows = await _fetchall(conn, SQL_RECENT_JOBS, (limit,))
        return [_job_from_row(row) for row in rows]

    async def _transition(
        self,
        job_id: int,
        target: JobStatus,
        sql: str,
        params: dict[str, Any],
        *,
        refund: bool = False,
    ) -> JobRecord:
        async with self._transaction() as conn:
            state = await _job_state(conn, job_id)
            current = JobStatus(state["status"])
            if current not in _ALLOWED_FROM[target]:
                raise StoreError(f"job {job_id} cannot go from {current.value} to {target.value}")
            await _execute(conn, sql, {**params, "status": target.value, "id": job_id})
            if refund:
                await self._refund_in(conn, job_id, state["user_id"], state["charged_day"])
            row = await _fetchone(conn, SQL_GET_JOB, (job_id,))
            assert row is not None
            return _job_from_row(row)

    async def mark_running(self, job_id: int, now: datetime | None = None) -> JobRecord:
        """queued -> running; attempts += 1; started_at = now."""
        ts = _as_utc(now).timestamp()
        return await self._transition(job_id, JobStatus.RUNNING, SQL_MARK_RUNNING, {"now": ts})

    async def mark_generated(self, job_id: int, result_path: str, duration_s: float) -> JobRecord:
        """running -> generated: the image is on disk at ``result_path``, awaiting delivery."""
        params = {"result_path": str(result_path), "duration_s": float(duration_s)}
        return await self._transition(job_id, JobStatus.GENERATED, SQL_MARK_GENERATED, params)

    async def mark_done(self, job_id: int, result_message_id: int | None, now: datetime | None = None) -> JobRecord:
        """generated -> done: delivered (``result_message_id``); finished_at = now."""
        params = {"result_message_id": result_message_id, "now": _as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.DONE, SQL_MARK_DONE, params)

    async def mark_failed(
        self, job_id: int, error: str, *, refund: bool = True, now: datetime | None = None
    ) -> JobRecord:
        """active -> failed; with ``refund`` the quota unit goes back in the same transaction."""
        params = {"error": str(error)[:MAX_ERROR_CHARS], "now": _as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.FAILED, SQL_MARK_FAILED, params, refund=refund)

    async def mark_cancelled(self, job_id: int, *, refund: bool = True, now: datetime | None = None) -> JobRecord:
        """active -> cancelled; with ``refund`` the quota unit goes back in the same transaction."""
        params = {"now": _as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.CANCELLED, SQL_MARK_CANCELLED, params, refund=refund)

    async def requeue(self, job_id: int) -> JobRecord:
        """running -> queued (crash recovery); keeps attempts, clears started_at."""
        return await self._transition(job_id, JobStatus.QUEUED, SQL_REQUEUE, {})

    async def set_progress_message(self, job_id: int, message_id: int) -> None:
        async with self._transaction() as conn:
            changed, _ = await _execute(conn, SQL_SET_PROGRESS_MESSAGE, (message_id, job_id))
            if changed == 0:
                raise StoreError(f"job {job_id} does not exist")

    async def _refund_in(self, conn: aiosqlite.Connection, job_id: int, user_id: int, charged_day: str | None) -> bool:
        if charged_day is None:
            return False
        await _execute(conn, SQL_UNCHARGE, (user_id, charged_day))
        await _execute(conn, SQL_CLEAR_CHARGE, (job_id,))
        return True

    async def refund(self, job_id: int) -> bool:
        """Return the job's unit to the usage of the day it was charged (never below 0).

        Idempotent: False when the job is not (or no longer) charged.
        """
        async with self._transaction() as conn:
            state = await _job_state(conn, job_id)
            return await self._refund_in(conn, job_id, state["user_id"], state["charged_day"])

    # ---------------------------------------------------------------- maintenance

    async def integrity_ok(self) -> bool:
        async with self._reading() as conn:
            return not await _integrity_problems(conn)

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """Copy the database online (SQLite backup API) to the new file ``dest``.

        The copy is written beside ``dest``, checked, switched to a single-file journal
        mode and only then renamed into place; an existing ``dest`` is refused.
        """
        target_path = Path(dest)
        if target_path.exists():
            raise StoreError(f"backup destination {target_path} already exists")
        try:
            target_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target_path.name}.", suffix=".partial", dir=target_path.parent)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot write backup {target_path}: {exc}") from exc
        tmp_path = Path(tmp_name)
        try:
            await self._backup_to(tmp_path)
            if target_path.exists():
                raise StoreError(f"backup destination {target_path} already exists")
            os.replace(tmp_path, target_path)
        except OSError as exc:
            raise StoreError(f"cannot write backup {target_path}: {exc}") from exc
        finally:
            _unlink_quietly(tmp_path, Path(f"{tmp_path}-journal"), Path(f"{tmp_path}-wal"), Path(f"{tmp_path}-shm"))
        log.info("database %s backed up to %s", self.path, target_path)

    async def _backup_to(self, tmp_path: Path) -> None:
        # The backup runs on this store's thread, so the target must accept use from it.
        target = await aiosqlite.connect(tmp_path, isolation_level=None, check_same_thread=False)
        try:
            async with self._reading() as conn:  # holding the lock: never copy a half-done transaction
                await conn.backup(target)
            problems = await _integrity_problems(target)
            if problems:
                raise StoreError(f"the backup copy failed its integrity check: {'; '.join(problems[:5])}")
            await _execute(target, SQL_PRAGMA_JOURNAL_DELETE)
        except sqlite3.Error as exc:
            raise StoreError(f"backup of {self.path} failed: {exc}") from exc
        finally:
            await target.close()


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
