"""The ledger: daily quotas and the jobs charged to them, and every move a job makes.

The ledger is the truth. A job is accepted only when its row and its quota charge are committed
together (:meth:`Store.admit`), and a job row remembers which UTC day it was charged to
(``charged_day``), so a refund returns the unit to that day, at most once. A relax-mode job
(``[quota] relax``, quota used up) is recorded with ``relax`` set and no ``charged_day``: it took
nothing, so nothing is refunded for it. Each status change is
checked against where the job may come from, in the same transaction that makes it.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from ..params import MAX_COUNT, MemberSettings
from .database import Database, execute, fetch_all, fetch_one, fetch_value
from .days import as_utc, next_reset, utc_day
from .records import (
    ACTIVE_STATUSES,
    ORIGINS,
    Admission,
    AdmissionStatus,
    InvalidTransition,
    JobRecord,
    JobStatus,
    LedgerStats,
    NewJob,
    QuotaStatus,
    StoreError,
)

MAX_ROWID = 2**63 - 1
"""SQLite's largest integer: no job id is above it."""

MAX_ERROR_CHARS = 2_000
"""Longer error texts are truncated before they are stored."""

SETTING_DEFAULT_LIMIT = "default_daily_limit"

_JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobRecord))
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)
_ACTIVE_IN = ", ".join(f"'{status.value}'" for status in ACTIVE_STATUSES)

# --------------------------------------------------------------------------- stats SQL

SQL_STATS = """
SELECT
    SUM(status = 'done' AND finished_at >= :today) AS images_today,
    SUM(status = 'done') AS images_week,
    SUM(status = 'failed' AND finished_at >= :today) AS failed_today,
    SUM(status = 'failed') AS failed_week,
    AVG(CASE WHEN status = 'done' THEN duration_s END) AS mean_seconds_week
FROM jobs WHERE finished_at >= :week
"""
SQL_BUSIEST = """
SELECT user_id, COUNT(*) AS images FROM jobs
WHERE status = 'done' AND finished_at >= :week
GROUP BY user_id ORDER BY images DESC, user_id LIMIT 5
"""

# --------------------------------------------------------------------------- quota SQL

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
# A job takes its `units` (Upscale 2, every other job 1) and a refund gives them all back.
SQL_CHARGE = """
INSERT INTO usage (user_id, day, used) VALUES (?, ?, ?)
ON CONFLICT (user_id, day) DO UPDATE SET used = used + excluded.used
"""
SQL_UNCHARGE = "UPDATE usage SET used = MAX(used - ?, 0) WHERE user_id = ? AND day = ?"
SQL_CLEAR_CHARGE = "UPDATE jobs SET charged_day = NULL WHERE id = ?"
SQL_RESET_USAGE = "UPDATE usage SET used = 0 WHERE user_id = ? AND day = ?"
# After a reset, today's charged jobs no longer hold a unit: a later refund must not credit one.
SQL_FORGIVE_CHARGES = "UPDATE jobs SET charged_day = NULL WHERE user_id = ? AND charged_day = ?"

# --------------------------------------------------------------------------- members' settings SQL

SQL_GET_MEMBER_SETTINGS = "SELECT size, steps, count, previews FROM member_settings WHERE user_id = ?"
SQL_DELETE_MEMBER_SETTINGS = "DELETE FROM member_settings WHERE user_id = ?"
# Only what is given (not NULL) changes; the rest keeps its stored value.
SQL_UPSERT_MEMBER_SETTINGS = """
INSERT INTO member_settings (user_id, size, steps, count, previews)
VALUES (:user_id, :size, :steps, :count, :previews)
ON CONFLICT (user_id) DO UPDATE SET
    size = COALESCE(excluded.size, size),
    steps = COALESCE(excluded.steps, steps),
    count = COALESCE(excluded.count, count),
    previews = COALESCE(excluded.previews, previews)
"""

# --------------------------------------------------------------------------- job SQL

SQL_ACTIVE_COUNTS = f"""
SELECT
    (SELECT COUNT(*) FROM jobs WHERE status IN ({_ACTIVE_IN})) AS active_total,
    (SELECT COUNT(*) FROM jobs WHERE user_id = :user_id AND status IN ({_ACTIVE_IN})) AS active_user
"""
# A new row: every field of NewJob (the job's parameters among them) plus its starting state.
_INSERT_FIELDS = (*(f.name for f in dataclasses.fields(NewJob)), "status", "charged_day", "queued_at", "relax")
SQL_INSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(_INSERT_FIELDS)}, attempts) "
    f"VALUES ({', '.join(':' + name for name in _INSERT_FIELDS)}, 0)"
)
SQL_SELECT_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs"
SQL_GET_JOB = SQL_SELECT_JOBS + " WHERE id = ?"
SQL_ACTIVE_JOBS = SQL_SELECT_JOBS + f" WHERE status IN ({_ACTIVE_IN}) ORDER BY id"
SQL_RECENT_JOBS = SQL_SELECT_JOBS + " ORDER BY id DESC LIMIT ?"
SQL_JOB_STATE = "SELECT status, user_id, charged_day, units FROM jobs WHERE id = ?"
SQL_MARK_RESULT_DELETED = "UPDATE jobs SET result_deleted_at = ? WHERE id = ? AND result_deleted_at IS NULL"

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
    values["relax"] = bool(values["relax"])
    return JobRecord(**values)


def _check_limit(limit: int, what: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {limit!r}")
    return limit


def _check_member_settings(changes: MemberSettings) -> MemberSettings:
    """What the store accepts; the bot's own checks (`bot.validation`) come first and name the option."""
    if changes.size is not None and (not isinstance(changes.size, str) or not changes.size):
        raise ValueError(f"size must be a preset name, got {changes.size!r}")
    for name, low, high in (("steps", 1, None), ("count", 1, MAX_COUNT)):
        value = getattr(changes, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ValueError(
                f"{name} must be an integer from {low}" + (f" to {high}" if high else "") + f", got {value!r}"
            )
    if changes.previews is not None and not isinstance(changes.previews, bool):
        raise ValueError(f"previews must be true or false, got {changes.previews!r}")
    return changes


def _member_settings_from_row(row: sqlite3.Row | None) -> MemberSettings:
    if row is None:
        return MemberSettings()
    previews = row["previews"]
    return MemberSettings(
        size=row["size"],
        steps=row["steps"],
        count=row["count"],
        previews=None if previews is None else bool(previews),
    )


async def _job_state(conn: aiosqlite.Connection, job_id: int) -> sqlite3.Row:
    state = await fetch_one(conn, SQL_JOB_STATE, (job_id,))
    if state is None:
        raise StoreError(f"job {job_id} does not exist")
    return state


async def _refund_in(
    conn: aiosqlite.Connection, job_id: int, user_id: int, charged_day: str | None, units: int = 1
) -> bool:
    if charged_day is None:
        return False
    await execute(conn, SQL_UNCHARGE, (units, user_id, charged_day))
    await execute(conn, SQL_CLEAR_CHARGE, (job_id,))
    return True


class Store:
    """The bot's SQLite database. Open with :meth:`Store.open`; close with :meth:`close` or ``async with``."""

    def __init__(self, database: Database, default_daily_limit: int) -> None:
        self._db = database
        self._config_default_limit = default_daily_limit

    @property
    def path(self) -> Path:
        return self._db.path

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, default_daily_limit: int) -> Store:
        """Open (creating it and its parent folder if needed), check and migrate the database."""
        _check_limit(default_daily_limit, "default_daily_limit")
        return cls(await Database.open(Path(path)), default_daily_limit)

    async def close(self) -> None:
        """Close the connection (idempotent). Waits for the operation in progress, if any."""
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- maintenance

    async def schema_version(self) -> int:
        return await self._db.schema_version()

    async def pragmas(self) -> dict[str, Any]:
        """This connection's journal_mode and busy_timeout (for tests)."""
        return await self._db.pragmas()

    async def integrity_ok(self) -> bool:
        return await self._db.integrity_ok()

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """Copy the database online to the new file ``dest`` (see :meth:`Database.backup`)."""
        await self._db.backup(dest)

    # ---------------------------------------------------------------- quotas

    def _parse_db_default(self, value: Any) -> int | None:
        if value is None:
            return None
        try:
            return _check_limit(int(value), SETTING_DEFAULT_LIMIT)
        except ValueError as exc:
            raise StoreError(f"setting {SETTING_DEFAULT_LIMIT} in {self.path} is invalid: {value!r}") from exc

    async def _quota(self, conn: aiosqlite.Connection, user_id: int, now: datetime) -> QuotaStatus:
        row = await fetch_one(conn, SQL_QUOTA, {"user_id": user_id, "day": utc_day(now)})
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

    async def quota_status(
        self, user_id: int, now: datetime | None = None, *, deadline_s: float | None = None
    ) -> QuotaStatus:
        """With `deadline_s`, `StoreBusy` if the database is not free by then."""
        now = as_utc(now)
        async with self._db.locked(deadline_s) as conn:
            return await self._quota(conn, user_id, now)

    async def set_user_limit(self, user_id: int, limit: int | None) -> None:
        """Set a per-user daily limit (>= 0); ``None`` removes the override."""
        if limit is None:
            async with self._db.transaction() as conn:
                await execute(conn, SQL_DELETE_USER_LIMIT, (user_id,))
            return
        _check_limit(limit, "limit")
        async with self._db.transaction() as conn:
            await execute(conn, SQL_SET_USER_LIMIT, (user_id, limit))

    async def set_default_limit(self, limit: int) -> None:
        """Store the default daily limit in the database; it wins over the configured one."""
        _check_limit(limit, "limit")
        async with self._db.transaction() as conn:
            await execute(conn, SQL_SET_SETTING, (SETTING_DEFAULT_LIMIT, str(limit)))

    async def default_limit(self) -> int:
        async with self._db.locked() as conn:
            stored = self._parse_db_default(await fetch_value(conn, SQL_GET_SETTING, (SETTING_DEFAULT_LIMIT,)))
        return self._config_default_limit if stored is None else stored

    async def reset_usage(self, user_id: int, now: datetime | None = None) -> None:
        """Set the user's usage of today (UTC) to 0.

        Jobs charged today are uncharged too, so refunding one of them later does not
        hand out a unit the reset already gave back.
        """
        day = utc_day(as_utc(now))
        async with self._db.transaction() as conn:
            await execute(conn, SQL_RESET_USAGE, (user_id, day))
            await execute(conn, SQL_FORGIVE_CHARGES, (user_id, day))

    # ---------------------------------------------------------------- members' settings

    async def member_settings(self, user_id: int, *, deadline_s: float | None = None) -> MemberSettings:
        """The member's own defaults (all None when they chose none). With `deadline_s`, `StoreBusy`
        if the database is not free by then."""
        async with self._db.locked(deadline_s) as conn:
            return _member_settings_from_row(await fetch_one(conn, SQL_GET_MEMBER_SETTINGS, (user_id,)))

    async def update_member_settings(
        self, user_id: int, changes: MemberSettings, *, reset: bool = False, deadline_s: float | None = None
    ) -> MemberSettings:
        """In one transaction: with `reset` forget every choice first, then store those `changes`
        gives (a None there keeps what is stored). Returns what is stored now. With `deadline_s`,
        `StoreBusy` (nothing written) when another writer holds the database past it."""
        _check_member_settings(changes)
        values = {
            "user_id": user_id,
            "size": changes.size,
            "steps": changes.steps,
            "count": changes.count,
            "previews": None if changes.previews is None else int(changes.previews),
        }

        def update_in_db_thread(db: sqlite3.Connection) -> tuple[bool, MemberSettings]:
            if reset:
                db.execute(SQL_DELETE_MEMBER_SETTINGS, (user_id,))
            if not changes.is_empty():
                db.execute(SQL_UPSERT_MEMBER_SETTINGS, values)
            return True, _member_settings_from_row(db.execute(SQL_GET_MEMBER_SETTINGS, (user_id,)).fetchone())

        return await self._db.transaction_in_db_thread(update_in_db_thread, deadline_s=deadline_s)

    # ---------------------------------------------------------------- admission

    async def admit(
        self,
        job: NewJob,
        *,
        max_queue: int,
        max_per_user: int,
        now: datetime | None = None,
        deadline_s: float | None = None,
        relax: bool = False,
    ) -> Admission:
        """Check caps and quota and, if all pass, insert the job and charge its `units` (one, an
        Upscale two), atomically.

        Refusals, in order: QUEUE_FULL (active jobs of everyone >= max_queue), USER_CAP
        (the user's active jobs >= max_per_user), QUOTA_EXHAUSTED (used + units > limit). With `relax`
        ([quota] relax), a quota that cannot pay for the job (used up, or short of its units) is no
        refusal: the job is inserted in relax mode instead
        (`relax` set, `charged_day` NULL, no unit taken, so nothing is ever refunded for it), unless
        the limit is 0 (no quota at all: a member an admin shut out). The caps hold for relax jobs too.
        A refusal writes nothing. With `deadline_s`, `StoreBusy` (nothing written) when another
        writer holds the database past it.
        """
        if job.origin not in ORIGINS:
            raise ValueError(f"job origin must be one of {ORIGINS}, got {job.origin!r}")
        if isinstance(job.units, bool) or not isinstance(job.units, int) or job.units < 1:
            raise ValueError(f"job units must be an integer >= 1, got {job.units!r}")
        now = as_utc(now)
        day = utc_day(now)
        params = dataclasses.asdict(job)
        params.update(status=JobStatus.QUEUED.value, charged_day=day, queued_at=now.timestamp(), relax=0)
        relax_params = {**params, "charged_day": None, "relax": 1}

        def admit_in_db_thread(db: sqlite3.Connection) -> tuple[bool, Admission]:
            counts = db.execute(SQL_ACTIVE_COUNTS, {"user_id": job.user_id}).fetchone()
            quota_row = db.execute(SQL_QUOTA, {"user_id": job.user_id, "day": day}).fetchone()
            quota = self._quota_from_row(quota_row, job.user_id, now)
            if counts["active_total"] >= max_queue:
                return False, Admission(AdmissionStatus.QUEUE_FULL, None, quota)
            if counts["active_user"] >= max_per_user:
                return False, Admission(AdmissionStatus.USER_CAP, None, quota)
            if quota.used + job.units > quota.limit:
                if not relax or quota.limit == 0:
                    return False, Admission(AdmissionStatus.QUOTA_EXHAUSTED, None, quota)
                job_id = db.execute(SQL_INSERT_JOB, relax_params).lastrowid  # free: no unit taken
                row = db.execute(SQL_GET_JOB, (job_id,)).fetchone()
                return True, Admission(AdmissionStatus.ACCEPTED, _job_from_row(row), quota)
            job_id = db.execute(SQL_INSERT_JOB, params).lastrowid
            db.execute(SQL_CHARGE, (job.user_id, day, job.units))
            row = db.execute(SQL_GET_JOB, (job_id,)).fetchone()
            used = quota.used + job.units
            charged = dataclasses.replace(quota, used=used, remaining=max(0, quota.limit - used))
            return True, Admission(AdmissionStatus.ACCEPTED, _job_from_row(row), charged)

        return await self._db.transaction_in_db_thread(admit_in_db_thread, deadline_s=deadline_s)

    async def record_pick(
        self, job: NewJob, result_path: str, *, now: datetime | None = None, deadline_s: float | None = None
    ) -> JobRecord:
        """A grid's U button: one of its images, already painted, as a result of its own (a row born
        `generated`, its file `result_path`). Nothing is charged (no `charged_day`), so nothing is
        refunded either; no cap applies (nothing is painted)."""
        now = as_utc(now)
        params = dataclasses.asdict(job)
        params.update(status=JobStatus.GENERATED.value, charged_day=None, queued_at=now.timestamp(), relax=0)

        def record_in_db_thread(db: sqlite3.Connection) -> tuple[bool, JobRecord]:
            job_id = db.execute(SQL_INSERT_JOB, params).lastrowid
            db.execute("UPDATE jobs SET result_path = ?, duration_s = 0 WHERE id = ?", (result_path, job_id))
            return True, _job_from_row(db.execute(SQL_GET_JOB, (job_id,)).fetchone())

        return await self._db.transaction_in_db_thread(record_in_db_thread, deadline_s=deadline_s)

    # ---------------------------------------------------------------- jobs

    async def stats(self, now: datetime | None = None) -> LedgerStats:
        """Finished jobs since today's UTC midnight and over the last 7 days (see `LedgerStats`)."""
        now = as_utc(now)
        params = {
            "today": datetime.combine(now.date(), time(0), tzinfo=timezone.utc).timestamp(),
            "week": (now - timedelta(days=7)).timestamp(),
        }
        async with self._db.locked() as conn:
            counts = await fetch_one(conn, SQL_STATS, params)
            busiest = await fetch_all(conn, SQL_BUSIEST, params)
        assert counts is not None  # an aggregate always yields one row
        mean = counts["mean_seconds_week"]
        return LedgerStats(
            images_today=int(counts["images_today"] or 0),
            images_week=int(counts["images_week"] or 0),
            failed_today=int(counts["failed_today"] or 0),
            failed_week=int(counts["failed_week"] or 0),
            mean_seconds_week=None if mean is None else float(mean),
            busiest_week=tuple((int(row["user_id"]), int(row["images"])) for row in busiest),
        )

    async def ping(self, *, deadline_s: float) -> None:
        """Raise `StoreError` (`StoreBusy` past the deadline) unless the database answers a read."""
        async with self._db.locked(deadline_s) as conn:
            await fetch_value(conn, "SELECT 1")

    async def get_job(self, job_id: int, *, deadline_s: float | None = None) -> JobRecord | None:
        """The job's row, or None. With `deadline_s`, `StoreBusy` if the database is not free by then."""
        if not 0 < job_id <= MAX_ROWID:  # a forged id (a button's custom id): no such job, not an error
            return None
        async with self._db.locked(deadline_s) as conn:
            row = await fetch_one(conn, SQL_GET_JOB, (job_id,))
        return None if row is None else _job_from_row(row)

    async def active_jobs(self) -> list[JobRecord]:
        """Queued, running and generated jobs, in queue order (by id)."""
        async with self._db.locked() as conn:
            rows = await fetch_all(conn, SQL_ACTIVE_JOBS)
        return [_job_from_row(row) for row in rows]

    async def recent_jobs(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        if limit <= 0:
            return []
        async with self._db.locked() as conn:
            rows = await fetch_all(conn, SQL_RECENT_JOBS, (limit,))
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
        async with self._db.transaction() as conn:
            state = await _job_state(conn, job_id)
            current = JobStatus(state["status"])
            if current not in _ALLOWED_FROM[target]:
                raise InvalidTransition(f"job {job_id} cannot go from {current.value} to {target.value}")
            await execute(conn, sql, {**params, "status": target.value, "id": job_id})
            if refund:
                await _refund_in(conn, job_id, state["user_id"], state["charged_day"], state["units"])
            row = await fetch_one(conn, SQL_GET_JOB, (job_id,))
            assert row is not None
            return _job_from_row(row)

    async def mark_running(self, job_id: int, now: datetime | None = None) -> JobRecord:
        """queued -> running; attempts += 1; started_at = now."""
        ts = as_utc(now).timestamp()
        return await self._transition(job_id, JobStatus.RUNNING, SQL_MARK_RUNNING, {"now": ts})

    async def mark_generated(self, job_id: int, result_path: str, duration_s: float) -> JobRecord:
        """running -> generated: the image is on disk at ``result_path``, awaiting delivery."""
        params = {"result_path": str(result_path), "duration_s": float(duration_s)}
        return await self._transition(job_id, JobStatus.GENERATED, SQL_MARK_GENERATED, params)

    async def mark_done(self, job_id: int, result_message_id: int | None, now: datetime | None = None) -> JobRecord:
        """generated -> done: delivered (``result_message_id``); finished_at = now."""
        params = {"result_message_id": result_message_id, "now": as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.DONE, SQL_MARK_DONE, params)

    async def mark_failed(
        self, job_id: int, error: str, *, refund: bool = True, now: datetime | None = None
    ) -> JobRecord:
        """active -> failed; with ``refund`` the quota unit goes back in the same transaction."""
        params = {"error": str(error)[:MAX_ERROR_CHARS], "now": as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.FAILED, SQL_MARK_FAILED, params, refund=refund)

    async def mark_cancelled(self, job_id: int, *, refund: bool = True, now: datetime | None = None) -> JobRecord:
        """active -> cancelled; with ``refund`` the quota unit goes back in the same transaction."""
        params = {"now": as_utc(now).timestamp()}
        return await self._transition(job_id, JobStatus.CANCELLED, SQL_MARK_CANCELLED, params, refund=refund)

    async def requeue(self, job_id: int) -> JobRecord:
        """running -> queued (crash recovery); keeps attempts, clears started_at."""
        return await self._transition(job_id, JobStatus.QUEUED, SQL_REQUEUE, {})

    async def set_progress_message(self, job_id: int, message_id: int) -> None:
        async with self._db.transaction() as conn:
            changed, _ = await execute(conn, SQL_SET_PROGRESS_MESSAGE, (message_id, job_id))
            if changed == 0:
                raise StoreError(f"job {job_id} does not exist")

    async def refund(self, job_id: int) -> bool:
        """Return the job's units to the usage of the day it was charged (never below 0).

        Idempotent: False when the job is not (or no longer) charged.
        """
        async with self._db.transaction() as conn:
            state = await _job_state(conn, job_id)
            return await _refund_in(conn, job_id, state["user_id"], state["charged_day"], state["units"])

    async def mark_result_deleted(self, job_id: int, now: datetime | None = None) -> bool:
        """Record that the job's result message was deleted (its Delete button): its other buttons,
        should a stale copy of the message still be clicked, refuse from now on. False when the job
        does not exist or was marked already. Changes neither the status nor the quota."""
        async with self._db.transaction() as conn:
            changed, _ = await execute(conn, SQL_MARK_RESULT_DELETED, (as_utc(now).timestamp(), job_id))
        return changed > 0
