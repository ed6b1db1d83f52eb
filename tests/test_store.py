"""bot/store against a real SQLite file (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bot.params import MemberSettings
from bot.store import (
    ACTIVE_STATUSES,
    LATEST_VERSION,
    Admission,
    AdmissionStatus,
    JobStatus,
    NewJob,
    Store,
    StoreBusy,
    StoreError,
    next_reset,
    utc_day,
)
from bot.store.aiosqlite_shim import run_in_connection_thread
from bot.store.schema import MIGRATIONS, Migration, split_sql, validate_migrations

UTC = timezone.utc
NOW = datetime(2025, 3, 10, 15, 30, tzinfo=UTC)
DAY = "2025-03-10"
BIG = 1_000


def new_job(user_id: int = 1, **overrides: Any) -> NewJob:
    fields: dict[str, Any] = {
        "user_id": user_id,
        "guild_id": 10,
        "channel_id": 20,
        "prompt": "a lighthouse at dusk",
        "seed": 42,
        "steps": 8,
        "width": 512,
        "height": 512,
    }
    fields.update(overrides)
    return NewJob(**fields)


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, always closed."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


def usage_rows(path: Path) -> dict[tuple[int, str], int]:
    with raw(path) as conn:
        return {(u, d): n for u, d, n in conn.execute("SELECT user_id, day, used FROM usage")}


def job_count(path: Path) -> int:
    with raw(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "fluxbot.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(db_path, default_daily_limit=5) as opened:
        yield opened


async def admit(store: Store, user_id: int = 1, now: datetime = NOW, **caps: int) -> Admission:
    return await store.admit(
        new_job(user_id),
        max_queue=caps.get("max_queue", BIG),
        max_per_user=caps.get("max_per_user", BIG),
        now=now,
    )


async def accepted_job_id(store: Store, user_id: int = 1, now: datetime = NOW) -> int:
    admission = await admit(store, user_id, now)
    assert admission.status is AdmissionStatus.ACCEPTED
    assert admission.job is not None
    return admission.job.id


# ----------------------------------------------------------------------------- open


async def test_open_creates_parent_and_wal_database(db_path: Path) -> None:
    assert not db_path.parent.exists()
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert db_path.exists()
        assert store.path == db_path
        assert await store.schema_version() == LATEST_VERSION
        pragmas = await store.pragmas()
        assert pragmas["journal_mode"] == "wal"
        assert pragmas["busy_timeout"] > 0
    with raw(db_path) as conn:  # WAL is persistent in the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"settings", "user_limits", "usage", "jobs"} <= tables


async def test_close_is_idempotent_and_closed_store_refuses(db_path: Path) -> None:
    store = await Store.open(db_path, default_daily_limit=5)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.quota_status(1, NOW)
    with pytest.raises(StoreError, match="closed"):
        await admit(store)


async def test_open_rejects_negative_default(db_path: Path) -> None:
    with pytest.raises(ValueError):
        await Store.open(db_path, default_daily_limit=-1)


# ----------------------------------------------------------------------------- admission


async def test_admission_charges_one_unit_and_writes_the_row(store: Store, db_path: Path) -> None:
    job = new_job(
        7,
        interaction_id=111,
        interaction_token="tok",
        interaction_created_at=1_741_620_000.5,
        application_id=222,
        origin="reroll",
    )
    admission = await store.admit(job, max_queue=10, max_per_user=3, now=NOW)
    assert admission.status is AdmissionStatus.ACCEPTED
    record = admission.job
    assert record is not None
    assert record.status is JobStatus.QUEUED
    assert record.charged_day == DAY
    assert record.queued_at == NOW.timestamp()
    assert record.attempts == 0
    assert (record.user_id, record.guild_id, record.channel_id) == (7, 10, 20)
    assert (record.prompt, record.seed, record.steps, record.width, record.height) == (
        "a lighthouse at dusk",
        42,
        8,
        512,
        512,
    )
    assert (record.interaction_id, record.interaction_token, record.application_id) == (111, "tok", 222)
    assert record.interaction_created_at == 1_741_620_000.5
    assert record.origin == "reroll"
    assert (record.started_at, record.finished_at, record.error) == (None, None, None)
    assert (record.progress_message_id, record.result_path, record.result_message_id) == (None, None, None)
    assert record.duration_s is None

    quota = admission.quota
    assert (quota.user_id, quota.day, quota.used, quota.limit, quota.remaining) == (7, DAY, 1, 5, 4)
    assert quota.resets_at == datetime(2025, 3, 11, tzinfo=UTC)
    assert not quota.has_override

    assert await store.get_job(record.id) == record
    assert usage_rows(db_path) == {(7, DAY): 1}
    assert (await store.quota_status(7, NOW)).used == 1


async def test_unknown_origin_is_refused(store: Store, db_path: Path) -> None:
    with pytest.raises(ValueError, match="origin"):
        await store.admit(new_job(origin="frobnicate"), max_queue=BIG, max_per_user=BIG, now=NOW)
    assert job_count(db_path) == 0


async def test_quota_exhausted_refuses_and_writes_nothing(store: Store, db_path: Path) -> None:
    await store.set_user_limit(1, 2)
    await accepted_job_id(store)
    await accepted_job_id(store)
    refused = await admit(store)
    assert refused.status is AdmissionStatus.QUOTA_EXHAUSTED
    assert refused.job is None
    assert (refused.quota.used, refused.quota.limit, refused.quota.remaining) == (2, 2, 0)
    assert job_count(db_path) == 2
    assert usage_rows(db_path) == {(1, DAY): 2}


async def test_limit_zero_refuses_everything(store: Store, db_path: Path) -> None:
    await store.set_user_limit(1, 0)
    assert (await admit(store)).status is AdmissionStatus.QUOTA_EXHAUSTED
    assert job_count(db_path) == 0
    assert usage_rows(db_path) == {}


async def test_queue_full_refuses_and_charges_nothing(store: Store, db_path: Path) -> None:
    await accepted_job_id(store, 1)
    await accepted_job_id(store, 2)
    refused = await admit(store, 3, max_queue=2)
    assert refused.status is AdmissionStatus.QUEUE_FULL
    assert refused.job is None
    assert refused.quota.used == 0
    assert job_count(db_path) == 2
    assert (3, DAY) not in usage_rows(db_path)


async def test_per_user_cap_refuses_and_charges_nothing(store: Store, db_path: Path) -> None:
    await accepted_job_id(store, 1)
    refused = await admit(store, 1, max_per_user=1)
    assert refused.status is AdmissionStatus.USER_CAP
    assert refused.quota.used == 1
    assert usage_rows(db_path) == {(1, DAY): 1}
    assert job_count(db_path) == 1
    # Another user is not capped by user 1's job.
    assert (await admit(store, 2, max_per_user=1)).status is AdmissionStatus.ACCEPTED


async def test_caps_count_all_active_statuses_and_only_them(store: Store) -> None:
    queued = await accepted_job_id(store)
    running = await accepted_job_id(store)
    generated = await accepted_job_id(store)
    await store.mark_running(running, now=NOW)
    await store.mark_running(generated, now=NOW)
    await store.mark_generated(generated, "/out/x.png", 3.0)
    assert {job.status for job in await store.active_jobs()} == set(ACTIVE_STATUSES)
    assert (await admit(store, 2, max_queue=3)).status is AdmissionStatus.QUEUE_FULL
    assert (await admit(store, 1, max_per_user=3)).status is AdmissionStatus.USER_CAP

    await store.mark_done(generated, 999, now=NOW)
    await store.mark_cancelled(queued, now=NOW)
    await store.mark_failed(running, "boom", now=NOW)
    assert await store.active_jobs() == []
    assert (await admit(store, 1, max_queue=1, max_per_user=1)).status is AdmissionStatus.ACCEPTED


async def test_refusal_order_queue_then_user_then_quota(store: Store) -> None:
    await store.set_user_limit(1, 1)
    await accepted_job_id(store, 1)
    # Everything is exceeded at once: the queue is reported first, then the per-user cap.
    assert (await admit(store, 1, max_queue=1, max_per_user=1)).status is AdmissionStatus.QUEUE_FULL
    assert (await admit(store, 1, max_per_user=1)).status is AdmissionStatus.USER_CAP
    assert (await admit(store, 1)).status is AdmissionStatus.QUOTA_EXHAUSTED


async def test_fifty_concurrent_admissions_take_exactly_the_limit(store: Store, db_path: Path) -> None:
    results = await asyncio.gather(*(admit(store, 1) for _ in range(50)))
    statuses = [result.status for result in results]
    assert statuses.count(AdmissionStatus.ACCEPTED) == 5
    assert statuses.count(AdmissionStatus.QUOTA_EXHAUSTED) == 45
    assert job_count(db_path) == 5
    assert usage_rows(db_path) == {(1, DAY): 5}
    assert len({result.job.id for result in results if result.job is not None}) == 5


async def test_two_stores_on_one_file_never_exceed_the_limit(db_path: Path) -> None:
    async with (
        await Store.open(db_path, default_daily_limit=5) as a,
        await Store.open(db_path, default_daily_limit=5) as b,
    ):
        results = await asyncio.gather(*(admit(s, 1) for _ in range(25) for s in (a, b)))
        accepted = [r for r in results if r.status is AdmissionStatus.ACCEPTED]
        assert len(accepted) == 5
        assert (await a.quota_status(1, NOW)).used == 5
        assert (await b.quota_status(1, NOW)).used == 5
    assert job_count(db_path) == 5
    assert usage_rows(db_path) == {(1, DAY): 5}


async def test_two_stores_never_exceed_the_queue_cap(db_path: Path) -> None:
    async with (
        await Store.open(db_path, default_daily_limit=5) as a,
        await Store.open(db_path, default_daily_limit=5) as b,
    ):
        results = await asyncio.gather(*(admit(s, user, max_queue=3) for user in range(20) for s in (a, b)))
        statuses = [r.status for r in results]
        assert statuses.count(AdmissionStatus.ACCEPTED) == 3
        assert statuses.count(AdmissionStatus.QUEUE_FULL) == 37
    assert job_count(db_path) == 3
    assert sum(usage_rows(db_path).values()) == 3


async def test_cancelled_admissions_leave_no_half_transaction(store: Store, db_path: Path) -> None:
    """Cancel admissions at many points; the charge and the row always go together."""
    await store.set_user_limit(1, BIG)
    # Loop turns, then short real delays: cancellation lands before, inside and after the transaction.
    delays = [None] * 12 + [i * 0.00005 for i in range(40)]
    for index, delay in enumerate(delays):
        task = asyncio.ensure_future(admit(store, 1))
        if delay is None:
            for _ in range(index):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # The connection is usable, no transaction was left open, and the ledger is consistent.
    await accepted_job_id(store)
    with raw(db_path) as conn:
        charged = conn.execute("SELECT COUNT(*) FROM jobs WHERE charged_day = ?", (DAY,)).fetchone()[0]
    assert usage_rows(db_path)[(1, DAY)] == charged == job_count(db_path)


# ----------------------------------------------------------------------------- relax mode


async def admit_relax(store: Store, user_id: int = 1, now: datetime = NOW, **caps: int) -> Admission:
    """An admission as the bot makes it with `[quota] relax = true`."""
    return await store.admit(
        new_job(user_id),
        max_queue=caps.get("max_queue", BIG),
        max_per_user=caps.get("max_per_user", BIG),
        now=now,
        relax=True,
    )


async def test_relax_admission_only_once_the_quota_is_used_up_and_charges_nothing(store: Store, db_path: Path) -> None:
    await store.set_user_limit(1, 2)
    first = await admit_relax(store)  # quota left: an ordinary, charged job even with relax on
    assert first.status is AdmissionStatus.ACCEPTED and not first.relax
    assert first.job is not None and (first.job.relax, first.job.charged_day) == (False, DAY)
    await accepted_job_id(store)
    assert usage_rows(db_path) == {(1, DAY): 2}
    assert (await admit(store)).status is AdmissionStatus.QUOTA_EXHAUSTED  # relax off: refused as before
    free = await admit_relax(store)
    assert free.status is AdmissionStatus.ACCEPTED and free.relax
    job = free.job
    assert job is not None and job.relax and job.charged_day is None and job.status is JobStatus.QUEUED
    assert (free.quota.used, free.quota.limit, free.quota.remaining) == (2, 2, 0)  # nothing taken
    assert usage_rows(db_path) == {(1, DAY): 2} and job_count(db_path) == 3
    assert await store.get_job(job.id) == job
    with raw(db_path) as conn:
        rows = conn.execute("SELECT relax, charged_day FROM jobs ORDER BY id").fetchall()
    assert rows == [(0, DAY), (0, DAY), (1, None)]
    assert [j.relax for j in await store.active_jobs()] == [False, False, True]


async def test_relax_admission_keeps_the_caps_and_a_zero_limit_shuts_out(store: Store, db_path: Path) -> None:
    await store.set_user_limit(1, 1)
    await accepted_job_id(store)
    assert (await admit_relax(store, max_per_user=2)).relax
    refused = await admit_relax(store, max_per_user=2)  # her third active job: over the per-user cap
    assert refused.status is AdmissionStatus.USER_CAP and refused.job is None
    assert (await admit_relax(store, max_queue=2)).status is AdmissionStatus.QUEUE_FULL
    await store.set_user_limit(2, 0)  # an admin's limit of 0: no quota to use up, so no relax either
    shut = await admit_relax(store, 2)
    assert shut.status is AdmissionStatus.QUOTA_EXHAUSTED and shut.job is None
    assert job_count(db_path) == 2 and usage_rows(db_path) == {(1, DAY): 1}


async def test_a_relax_job_that_fails_or_is_cancelled_refunds_nothing(store: Store, db_path: Path) -> None:
    await store.set_user_limit(1, 1)
    charged = await accepted_job_id(store)
    failing = (await admit_relax(store)).job
    cancelled = (await admit_relax(store)).job
    assert failing is not None and cancelled is not None
    await store.mark_running(failing.id, now=NOW)
    assert (await store.mark_failed(failing.id, "boom", now=NOW)).relax
    assert (await store.mark_cancelled(cancelled.id, now=NOW)).charged_day is None
    assert await store.refund(failing.id) is False
    assert usage_rows(db_path) == {(1, DAY): 1}  # the charged job's unit is still taken, nothing more
    await store.mark_failed(charged, "boom", now=NOW)  # the charged job's refund still returns its unit
    assert usage_rows(db_path) == {(1, DAY): 0}


async def test_a_relax_job_stays_relax_through_requeue_and_a_reopen(db_path: Path) -> None:
    async with await Store.open(db_path, default_daily_limit=0) as store:
        await store.set_user_limit(1, 1)
        await accepted_job_id(store)
        job = (await admit_relax(store)).job
        assert job is not None
        await store.mark_running(job.id, now=NOW)
    async with await Store.open(db_path, default_daily_limit=0) as store:  # a restart
        running = await store.get_job(job.id)
        assert running is not None and running.relax and running.status is JobStatus.RUNNING
        requeued = await store.requeue(job.id)
        assert requeued.relax and requeued.charged_day is None
        assert [(j.id, j.relax) for j in await store.active_jobs()] == [(1, False), (job.id, True)]


# ----------------------------------------------------------------------------- quotas


async def test_limit_precedence_override_then_db_default_then_config(db_path: Path) -> None:
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.default_limit() == 5
        assert (await store.quota_status(1, NOW)).limit == 5

        await store.set_default_limit(7)
        assert await store.default_limit() == 7
        assert (await store.quota_status(1, NOW)).limit == 7

        await store.set_user_limit(1, 2)
        quota = await store.quota_status(1, NOW)
        assert (quota.limit, quota.has_override) == (2, True)
        assert (await store.quota_status(2, NOW)).limit == 7

        await store.set_user_limit(1, 0)
        assert (await store.quota_status(1, NOW)).limit == 0

        await store.set_user_limit(1, None)
        quota = await store.quota_status(1, NOW)
        assert (quota.limit, quota.has_override) == (7, False)
        await store.set_user_limit(1, None)  # removing a missing override is fine

        with pytest.raises(ValueError):
            await store.set_user_limit(1, -1)
        with pytest.raises(ValueError):
            await store.set_default_limit(-3)
    # The stored default wins over a different configured one after a restart.
    async with await Store.open(db_path, default_daily_limit=3) as store:
        assert await store.default_limit() == 7
        assert (await store.quota_status(2, NOW)).limit == 7


async def test_remaining_never_negative_when_limit_lowered(store: Store) -> None:
    for _ in range(4):
        await accepted_job_id(store)
    await store.set_user_limit(1, 2)
    quota = await store.quota_status(1, NOW)
    assert (quota.used, quota.limit, quota.remaining) == (4, 2, 0)


async def test_reset_usage_clears_today_only(store: Store, db_path: Path) -> None:
    yesterday = NOW - timedelta(days=1)
    await accepted_job_id(store, 1, yesterday)
    old_today = await accepted_job_id(store, 1)
    await accepted_job_id(store, 1)
    await accepted_job_id(store, 2)
    await store.reset_usage(1, NOW)
    quota = await store.quota_status(1, NOW)
    assert (quota.used, quota.remaining) == (0, 5)
    assert usage_rows(db_path) == {(1, "2025-03-09"): 1, (1, DAY): 0, (2, DAY): 1}

    # A job charged before the reset no longer holds a unit: refunding it credits nothing.
    await accepted_job_id(store, 1)
    assert (await store.get_job(old_today)).charged_day is None  # type: ignore[union-attr]
    assert await store.refund(old_today) is False
    failed = await store.mark_failed(old_today, "gpu fell over", now=NOW)
    assert failed.charged_day is None
    assert (await store.quota_status(1, NOW)).used == 1


async def test_day_rollover_at_utc_midnight(store: Store) -> None:
    before = datetime(2025, 3, 10, 23, 59, 59, tzinfo=UTC)
    after = datetime(2025, 3, 11, 0, 0, 0, tzinfo=UTC)
    for _ in range(5):
        await accepted_job_id(store, 1, before)
    assert (await admit(store, 1, before)).status is AdmissionStatus.QUOTA_EXHAUSTED
    quota = await store.quota_status(1, before)
    assert quota.resets_at == after

    quota = await store.quota_status(1, after)
    assert (quota.day, quota.used, quota.remaining) == ("2025-03-11", 0, 5)
    assert quota.resets_at == datetime(2025, 3, 12, tzinfo=UTC)
    job = await admit(store, 1, after)
    assert job.status is AdmissionStatus.ACCEPTED
    assert job.job is not None and job.job.charged_day == "2025-03-11"


async def test_non_utc_times_use_the_utc_day(store: Store) -> None:
    # 21:30 in New York (UTC-5) on the 10th is 02:30 UTC on the 11th.
    new_york = timezone(timedelta(hours=-5))
    local = datetime(2025, 3, 10, 21, 30, tzinfo=new_york)
    admission = await admit(store, 1, local)
    assert admission.quota.day == "2025-03-11"
    assert admission.quota.resets_at == datetime(2025, 3, 12, tzinfo=UTC)
    assert admission.quota.resets_at.tzinfo is not None


async def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.quota_status(1, datetime(2025, 3, 10, 12, 0))


def test_utc_day_and_next_reset() -> None:
    assert utc_day(NOW) == DAY
    assert next_reset(NOW) == datetime(2025, 3, 11, tzinfo=UTC)
    midnight = datetime(2025, 3, 11, tzinfo=UTC)
    assert utc_day(midnight) == "2025-03-11"
    assert next_reset(midnight) == datetime(2025, 3, 12, tzinfo=UTC)
    year_end = datetime(2024, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert (utc_day(year_end), next_reset(year_end)) == ("2024-12-31", datetime(2025, 1, 1, tzinfo=UTC))
    tokyo = timezone(timedelta(hours=9))
    assert utc_day(datetime(2025, 3, 11, 8, 0, tzinfo=tokyo)) == DAY
    assert next_reset(datetime(2025, 3, 11, 8, 0, tzinfo=tokyo)).utcoffset() == timedelta(0)
    with pytest.raises(ValueError):
        utc_day(datetime(2025, 3, 10))


# ----------------------------------------------------------------------------- refunds


async def test_refund_is_idempotent_and_returns_the_unit_to_the_charged_day(store: Store, db_path: Path) -> None:
    day1 = NOW
    day2 = NOW + timedelta(days=1)
    job1 = await accepted_job_id(store, 1, day1)
    await accepted_job_id(store, 1, day1)
    await accepted_job_id(store, 1, day2)
    assert usage_rows(db_path) == {(1, "2025-03-10"): 2, (1, "2025-03-11"): 1}

    assert await store.refund(job1) is True
    assert usage_rows(db_path) == {(1, "2025-03-10"): 1, (1, "2025-03-11"): 1}
    assert (await store.quota_status(1, day2)).used == 1  # no extra unit today
    assert (await store.get_job(job1)).charged_day is None  # type: ignore[union-attr]

    assert await store.refund(job1) is False
    assert usage_rows(db_path) == {(1, "2025-03-10"): 1, (1, "2025-03-11"): 1}


async def test_refund_never_goes_below_zero(store: Store, db_path: Path) -> None:
    job = await accepted_job_id(store)
    with raw(db_path) as conn:  # e.g. an operator edited the table by hand
        conn.execute("UPDATE usage SET used = 0")
    assert await store.refund(job) is True
    assert usage_rows(db_path) == {(1, DAY): 0}


async def test_refund_of_unknown_job_raises(store: Store) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await store.refund(12345)


async def test_mark_failed_refunds_in_the_same_step(store: Store) -> None:
    job = await accepted_job_id(store)
    await store.mark_running(job, now=NOW)
    failed = await store.mark_failed(job, "out of memory", now=NOW + timedelta(seconds=5))
    assert failed.status is JobStatus.FAILED
    assert failed.error == "out of memory"
    assert failed.finished_at == (NOW + timedelta(seconds=5)).timestamp()
    assert failed.charged_day is None
    assert (await store.quota_status(1, NOW)).used == 0


async def test_mark_failed_without_refund_keeps_the_charge(store: Store) -> None:
    job = await accepted_job_id(store)
    failed = await store.mark_failed(job, "nsfw filter", refund=False, now=NOW)
    assert failed.charged_day == DAY
    assert (await store.quota_status(1, NOW)).used == 1
    assert await store.refund(job) is True  # an operator can still refund it later
    assert (await store.quota_status(1, NOW)).used == 0


async def test_mark_failed_truncates_huge_errors(store: Store) -> None:
    job = await accepted_job_id(store)
    failed = await store.mark_failed(job, "x" * 100_000, now=NOW)
    assert failed.error is not None and 0 < len(failed.error) <= 2_000


async def test_mark_cancelled_refunds_unless_told_not_to(store: Store) -> None:
    a = await accepted_job_id(store)
    b = await accepted_job_id(store)
    assert (await store.mark_cancelled(a, now=NOW)).charged_day is None
    cancelled = await store.mark_cancelled(b, refund=False, now=NOW)
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.charged_day == DAY
    assert (await store.quota_status(1, NOW)).used == 1


async def test_full_lifecycle_and_mark_done_keeps_the_charge(store: Store) -> None:
    job = await accepted_job_id(store)
    await store.set_progress_message(job, 555)
    t_run = NOW + timedelta(seconds=2)
    running = await store.mark_running(job, now=t_run)
    assert (running.status, running.attempts, running.started_at) == (JobStatus.RUNNING, 1, t_run.timestamp())
    generated = await store.mark_generated(job, "/out/1.png", 12.5)
    assert (generated.status, generated.result_path, generated.duration_s) == (
        JobStatus.GENERATED,
        "/out/1.png",
        12.5,
    )
    assert [j.id for j in await store.active_jobs()] == [job]  # awaiting delivery is still active
    t_done = NOW + timedelta(seconds=16)
    done = await store.mark_done(job, 777, now=t_done)
    assert (done.status, done.result_message_id, done.finished_at) == (JobStatus.DONE, 777, t_done.timestamp())
    assert done.progress_message_id == 555
    assert done.charged_day == DAY
    assert (await store.quota_status(1, NOW)).used == 1
    assert await store.active_jobs() == []


# ----------------------------------------------------------------------------- transitions


async def _job_in(store: Store, status: JobStatus) -> int:
    job = await accepted_job_id(store)
    if status is JobStatus.QUEUED:
        return job
    if status is JobStatus.CANCELLED:
        await store.mark_cancelled(job, now=NOW)
        return job
    await store.mark_running(job, now=NOW)
    if status is JobStatus.FAILED:
        await store.mark_failed(job, "x", now=NOW)
    if status in (JobStatus.GENERATED, JobStatus.DONE):
        await store.mark_generated(job, "/out/x.png", 1.0)
    if status is JobStatus.DONE:
        await store.mark_done(job, 1, now=NOW)
    return job


INVALID = [
    ("mark_done", JobStatus.CANCELLED),
    ("mark_done", JobStatus.QUEUED),
    ("mark_done", JobStatus.RUNNING),
    ("mark_done", JobStatus.DONE),
    ("mark_running", JobStatus.RUNNING),
    ("mark_running", JobStatus.DONE),
    ("mark_running", JobStatus.FAILED),
    ("mark_generated", JobStatus.QUEUED),
    ("mark_generated", JobStatus.CANCELLED),
    ("mark_failed", JobStatus.DONE),
    ("mark_failed", JobStatus.FAILED),
    ("mark_cancelled", JobStatus.CANCELLED),
    ("mark_cancelled", JobStatus.DONE),
    ("requeue", JobStatus.QUEUED),
    ("requeue", JobStatus.GENERATED),
    ("requeue", JobStatus.FAILED),
]


async def _call(store: Store, method: str, job_id: int) -> Any:
    if method == "mark_running":
        return await store.mark_running(job_id, now=NOW)
    if method == "mark_generated":
        return await store.mark_generated(job_id, "/out/y.png", 2.0)
    if method == "mark_done":
        return await store.mark_done(job_id, 2, now=NOW)
    if method == "mark_failed":
        return await store.mark_failed(job_id, "late failure", now=NOW)
    if method == "mark_cancelled":
        return await store.mark_cancelled(job_id, now=NOW)
    assert method == "requeue"
    return await store.requeue(job_id)


@pytest.mark.parametrize(("method", "status"), INVALID, ids=[f"{m}-on-{s.value}" for m, s in INVALID])
async def test_invalid_transitions_raise_and_change_nothing(store: Store, method: str, status: JobStatus) -> None:
    job = await _job_in(store, status)
    before = await store.get_job(job)
    used_before = (await store.quota_status(1, NOW)).used
    with pytest.raises(StoreError, match=f"job {job} cannot go from {status.value}"):
        await _call(store, method, job)
    assert await store.get_job(job) == before
    assert (await store.quota_status(1, NOW)).used == used_before


METHODS = ["mark_running", "mark_generated", "mark_done", "mark_failed", "mark_cancelled", "requeue"]


@pytest.mark.parametrize("method", METHODS)
async def test_transitions_on_unknown_jobs_raise(store: Store, method: str) -> None:
    with pytest.raises(StoreError, match="job 404 does not exist"):
        await _call(store, method, 404)


async def test_set_progress_message_on_unknown_job_raises(store: Store) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await store.set_progress_message(404, 1)


async def test_requeue_keeps_attempts_and_queue_order(store: Store) -> None:
    first = await accepted_job_id(store)
    second = await accepted_job_id(store)
    await store.mark_running(first, now=NOW)
    requeued = await store.requeue(first)
    assert (requeued.status, requeued.attempts, requeued.started_at) == (JobStatus.QUEUED, 1, None)
    assert requeued.charged_day == DAY  # still charged: it will run again
    assert [j.id for j in await store.active_jobs()] == [first, second]
    again = await store.mark_running(first, now=NOW + timedelta(minutes=1))
    assert again.attempts == 2
    assert (await store.quota_status(1, NOW)).used == 2


async def test_a_jobs_upload_limit_is_kept_in_the_ledger(db_path: Path) -> None:
    """The interaction's upload limit is stored with the job and read back after the store (the
    bot) restarts; a job admitted without one keeps None."""
    async with await Store.open(db_path, default_daily_limit=5) as store:
        boosted = await store.admit(new_job(1, upload_limit=50 * 2**20), max_queue=BIG, max_per_user=BIG, now=NOW)
        plain = await admit(store, 2)
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert (await store.get_job(boosted.job.id)).upload_limit == 50 * 2**20  # type: ignore[union-attr]
        assert (await store.get_job(plain.job.id)).upload_limit is None  # type: ignore[union-attr]


async def test_recent_jobs_newest_first(store: Store) -> None:
    ids = [await accepted_job_id(store, user) for user in (1, 2, 3)]
    assert [j.id for j in await store.recent_jobs()] == ids[::-1]
    assert [j.id for j in await store.recent_jobs(2)] == ids[:0:-1]
    assert await store.recent_jobs(0) == []
    assert await store.get_job(999) is None


# ----------------------------------------------------------------------------- members' settings


async def test_member_settings_change_only_what_is_given_and_reset_forgets(store: Store, db_path: Path) -> None:
    assert await store.member_settings(1) == MemberSettings()
    assert await store.update_member_settings(1, MemberSettings(steps=30, count=4)) == MemberSettings(steps=30, count=4)
    mixed = await store.update_member_settings(1, MemberSettings(size="landscape", previews=False))
    assert mixed == MemberSettings(size="landscape", steps=30, count=4, previews=False)
    assert await store.member_settings(2) == MemberSettings()  # another member's are their own
    after_reset = await store.update_member_settings(1, MemberSettings(steps=9), reset=True)
    assert after_reset == MemberSettings(steps=9)
    assert await store.update_member_settings(1, MemberSettings(), reset=True) == MemberSettings()
    with raw(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM member_settings WHERE user_id = 1").fetchone()[0] == 0


@pytest.mark.parametrize(
    "bad",
    [
        MemberSettings(steps=0),
        MemberSettings(count=5),
        MemberSettings(count=True),  # type: ignore[arg-type]
        MemberSettings(previews=1),  # type: ignore[arg-type]
        MemberSettings(size=""),
    ],
)
async def test_member_settings_out_of_range_are_refused_and_nothing_is_written(store: Store, bad) -> None:
    await store.update_member_settings(1, MemberSettings(steps=5))
    with pytest.raises(ValueError):
        await store.update_member_settings(1, bad, reset=True)
    assert await store.member_settings(1) == MemberSettings(steps=5)


async def test_member_settings_answer_busy_within_the_deadline(store: Store) -> None:
    async with store._db.locked():  # another operation holds the connection
        with pytest.raises(StoreBusy):
            await store.member_settings(1, deadline_s=0.05)
        with pytest.raises(StoreBusy):
            await store.update_member_settings(1, MemberSettings(steps=3), deadline_s=0.05)
    assert await store.member_settings(1) == MemberSettings()


# ----------------------------------------------------------------------------- migrations


def build_db_at(path: Path, version: int) -> None:
    """A database as an older fluxbot left it: the first `version` migrations, nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with raw(path) as conn:
        for migration in MIGRATIONS[:version]:
            conn.execute("BEGIN")
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")


def seed_v1_rows(path: Path) -> None:
    """Rows that only use the columns of schema version 1 (present in every later one)."""
    with raw(path) as conn:
        conn.execute("INSERT INTO settings (key, value) VALUES ('default_daily_limit', '9')")
        conn.execute("INSERT INTO user_limits (user_id, daily_limit) VALUES (1, 3)")
        conn.execute(f"INSERT INTO usage (user_id, day, used) VALUES (1, '{DAY}', 2), (2, '{DAY}', 1)")
        conn.execute(
            """INSERT INTO jobs (id, user_id, guild_id, channel_id, prompt, seed, steps, width, height,
                   status, attempts, charged_day, queued_at, started_at, interaction_id, interaction_token,
                   interaction_created_at, application_id, origin)
               VALUES (1, 1, 10, 20, 'old queued', 1, 8, 512, 512, 'queued', 0, ?, 100.0, NULL,
                       31, 'tok31', 99.5, 41, 'imagine'),
                      (2, 1, NULL, NULL, 'old running', 2, 4, 768, 512, 'running', 1, ?, 101.0, 102.0,
                       NULL, NULL, NULL, NULL, 'reroll'),
                      (3, 2, 10, 20, 'old done', 3, 8, 512, 512, 'done', 1, ?, 103.0, 104.0,
                       NULL, NULL, NULL, NULL, 'imagine')""",
            (DAY, DAY, DAY),
        )


@pytest.mark.parametrize("from_version", range(LATEST_VERSION))
async def test_migrates_from_every_earlier_version(db_path: Path, from_version: int) -> None:
    build_db_at(db_path, from_version)
    if from_version >= 1:
        seed_v1_rows(db_path)
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.schema_version() == LATEST_VERSION
        assert await store.integrity_ok()
        if from_version >= 1:
            assert await store.default_limit() == 9
            quota = await store.quota_status(1, NOW)
            assert (quota.used, quota.limit, quota.has_override) == (2, 3, True)
            assert (await store.quota_status(2, NOW)).used == 1
            assert [j.id for j in await store.active_jobs()] == [1, 2]
            old = await store.get_job(1)
            assert old is not None
            assert (old.prompt, old.status, old.charged_day, old.queued_at) == (
                "old queued",
                JobStatus.QUEUED,
                DAY,
                100.0,
            )
            assert (old.interaction_id, old.interaction_token, old.interaction_created_at) == (31, "tok31", 99.5)
            assert (old.progress_message_id, old.result_path, old.result_message_id, old.duration_s) == (
                None,
                None,
                None,
                None,
            )
            assert old.upload_limit is None  # delivery falls back to Discord's default
            running = await store.get_job(2)
            assert running is not None and (running.status, running.attempts, running.origin) == (
                JobStatus.RUNNING,
                1,
                "reroll",
            )
            assert (await store.get_job(3)).status is JobStatus.DONE  # type: ignore[union-attr]
            # The migrated ledger works with the new columns.
            await store.requeue(2)
            await store.mark_running(1, now=NOW)
            await store.mark_generated(1, "/out/1.png", 4.0)
            assert (await store.mark_done(1, 5, now=NOW)).result_message_id == 5
            assert (await admit(store, 1)).status is AdmissionStatus.ACCEPTED
            assert (await admit(store, 1)).status is AdmissionStatus.QUOTA_EXHAUSTED
            assert (await store.get_job(4)) is not None  # ids continue after the old rows
        else:
            assert (await admit(store, 1)).status is AdmissionStatus.ACCEPTED
        # Members' settings (migration 4): none chosen yet, and they can be.
        assert await store.member_settings(1) == MemberSettings()
        saved = await store.update_member_settings(1, MemberSettings(size="portrait", previews=False))
        assert saved == MemberSettings(size="portrait", previews=False)
        # Relax mode (migration 5): the rows from before are charged jobs; a relax job can be admitted.
        assert not any(j.relax for j in await store.active_jobs())
        await store.set_user_limit(7, 1)
        assert not (await admit(store, 7)).relax
        relaxed = await admit_relax(store, 7)
        assert relaxed.relax and relaxed.job is not None and relaxed.job.charged_day is None
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_active", "jobs_user_active", "jobs_charged"} <= indexes


async def test_empty_file_is_version_zero_and_migrates(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.schema_version() == LATEST_VERSION


async def test_failed_migration_rolls_back_with_its_version_bump(db_path: Path) -> None:
    build_db_at(db_path, 1)
    seed_v1_rows(db_path)
    with raw(db_path) as conn:  # something in the way of migration 2
        conn.execute("CREATE INDEX jobs_charged ON jobs (user_id)")
    with pytest.raises(StoreError, match=r"migration 2 .* failed.*left at version 1"):
        await Store.open(db_path, default_daily_limit=5)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        assert "progress_message_id" not in columns  # ALTERs of the failed step were undone
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3


async def test_migration_4_adds_member_settings_and_its_checks_keep_bad_rows_out(db_path: Path) -> None:
    build_db_at(db_path, 3)
    seed_v1_rows(db_path)
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.schema_version() == LATEST_VERSION
        assert [j.id for j in await store.active_jobs()] == [1, 2]  # the ledger is untouched
    with raw(db_path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(member_settings)")]
        assert columns == ["user_id", "size", "steps", "count", "previews"]
        conn.execute("INSERT INTO member_settings (user_id) VALUES (7)")  # nothing chosen: all NULL
        for bad in ("count = 5", "count = 0", "steps = 0", "previews = 2", "size = ''"):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute(f"UPDATE member_settings SET {bad} WHERE user_id = 7")
        conn.execute(
            "UPDATE member_settings SET count = 4, steps = 50, previews = 0, size = 'square' WHERE user_id = 7"
        )


async def test_failed_migration_4_leaves_version_3(db_path: Path) -> None:
    build_db_at(db_path, 3)
    seed_v1_rows(db_path)
    with raw(db_path) as conn:  # something in the way of migration 4
        conn.execute("CREATE TABLE member_settings (x)")
    with pytest.raises(StoreError, match=r"migration 4 .* failed.*left at version 3"):
        await Store.open(db_path, default_daily_limit=5)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3


async def test_migration_5_adds_relax_to_jobs_and_old_rows_are_charged_jobs(db_path: Path) -> None:
    build_db_at(db_path, 4)
    seed_v1_rows(db_path)
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.schema_version() == LATEST_VERSION
        assert [(j.id, j.relax, j.charged_day) for j in await store.active_jobs()] == [(1, False, DAY), (2, False, DAY)]
    with raw(db_path) as conn:
        assert conn.execute("SELECT relax FROM jobs ORDER BY id").fetchall() == [(0,), (0,), (0,)]
        for bad in ("2", "NULL", "-1"):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK|NOT NULL"):
                conn.execute(f"UPDATE jobs SET relax = {bad} WHERE id = 1")


async def test_failed_migration_5_leaves_version_4(db_path: Path) -> None:
    build_db_at(db_path, 4)
    seed_v1_rows(db_path)
    with raw(db_path) as conn:  # something in the way of migration 5
        conn.execute("ALTER TABLE jobs ADD COLUMN relax TEXT")
    with pytest.raises(StoreError, match=r"migration 5 .* failed.*left at version 4"):
        await Store.open(db_path, default_daily_limit=5)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3


async def test_two_stores_opening_a_new_file_at_once_migrate_once(db_path: Path) -> None:
    a, b = await asyncio.gather(Store.open(db_path, default_daily_limit=5), Store.open(db_path, default_daily_limit=5))
    async with a, b:
        assert await a.schema_version() == await b.schema_version() == LATEST_VERSION


async def test_newer_database_is_refused_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
        conn.execute("CREATE TABLE future (x)")
    expected = f"database schema version {LATEST_VERSION + 1} is newer than this fluxbot supports ({LATEST_VERSION})"
    with pytest.raises(StoreError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        await Store.open(db_path, default_daily_limit=5)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION + 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_migration_list_is_contiguous_and_gaps_are_refused() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    assert LATEST_VERSION >= 2
    assert validate_migrations(MIGRATIONS) == LATEST_VERSION
    gap = (MIGRATIONS[0], Migration(3, "skips two", "CREATE TABLE t (x);"))
    with pytest.raises(StoreError, match="without gaps"):
        validate_migrations(gap)


def test_the_schema_declares_no_foreign_keys(db_path: Path) -> None:
    """Foreign-key enforcement is off because nothing declares one; a migration that adds a
    REFERENCES must turn it on (see bot/store/schema.py), and this test says so."""
    build_db_at(db_path, LATEST_VERSION)
    with raw(db_path) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        declared = {table: conn.execute(f"PRAGMA foreign_key_list({table})").fetchall() for table in tables}
    assert "jobs" in declared
    assert not any(declared.values()), f"foreign keys declared, turn on PRAGMA foreign_keys: {declared}"


def test_split_sql_keeps_semicolons_inside_statements() -> None:
    script = """
    CREATE TABLE t (x TEXT DEFAULT ';');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 'a;b'; END;
    """
    statements = split_sql(script)
    assert len(statements) == 2
    assert statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_sql("CREATE TABLE t (x); CREATE TABLE u (y)")


# ----------------------------------------------------------------------------- integrity, backup, persistence


async def test_integrity_ok_on_a_healthy_database(store: Store) -> None:
    await accepted_job_id(store)
    assert await store.integrity_ok() is True


async def test_corrupt_database_is_refused_at_open(db_path: Path) -> None:
    async with await Store.open(db_path, default_daily_limit=5) as store:
        await accepted_job_id(store)
    with raw(db_path) as conn:
        # Make an index disagree with its table: integrity_check reports missing rows.
        conn.execute("CREATE TABLE t (a, b)")
        conn.execute("CREATE INDEX t_a ON t (a)")
        conn.execute("INSERT INTO t VALUES (1, 'x'), (2, 'y')")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX t_a ON t (b)' WHERE name = 't_a'")
    with pytest.raises(StoreError, match=r"failed its integrity check.*missing from index t_a"):
        await Store.open(db_path, default_daily_limit=5)


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite, just text " * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        await Store.open(db_path, default_daily_limit=5)


async def test_backup_is_a_readable_copy_with_the_same_rows(store: Store, tmp_path: Path) -> None:
    for user in (1, 1, 2):
        await accepted_job_id(store, user)
    await store.set_user_limit(2, 8)
    await store.set_default_limit(6)
    await store.mark_running(1, now=NOW)
    dest = tmp_path / "backups" / "copy.db"
    await store.backup(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.db"]  # no partial or -wal files left
    with raw(dest) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
    async with await Store.open(dest, default_daily_limit=1) as copy:
        assert await copy.recent_jobs() == await store.recent_jobs()
        assert await copy.default_limit() == 6
        assert await copy.quota_status(1, NOW) == await store.quota_status(1, NOW)
        assert await copy.quota_status(2, NOW) == await store.quota_status(2, NOW)
    # The source keeps working, and an existing file is never overwritten.
    await accepted_job_id(store, 3)
    with pytest.raises(StoreError, match="already exists"):
        await store.backup(dest)
    with raw(dest) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3


async def test_backup_copies_committed_data_only(store: Store, db_path: Path, tmp_path: Path) -> None:
    """A write transaction open on another connection during the backup is not in the copy,
    and admissions running beside the backup are copied whole: each job with its charge."""
    await accepted_job_id(store, 1)
    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO usage (user_id, day, used) VALUES (99, '2001-01-01', 7)")
        await store.backup(tmp_path / "open.db")
        other.execute("COMMIT")
    assert (99, "2001-01-01") not in usage_rows(tmp_path / "open.db")
    assert usage_rows(db_path)[(99, "2001-01-01")] == 7
    await asyncio.gather(
        *(admit(store, 1) for _ in range(3)), store.backup(tmp_path / "mid.db"), *(admit(store, 1) for _ in range(3))
    )
    with raw(tmp_path / "mid.db") as conn:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        used = conn.execute("SELECT COALESCE(SUM(used), 0) FROM usage WHERE user_id = 1").fetchone()[0]
    assert jobs == used >= 1  # every copied job comes with its charge


async def test_data_persists_after_close_and_reopen(db_path: Path) -> None:
    async with await Store.open(db_path, default_daily_limit=5) as store:
        a = await accepted_job_id(store, 1)
        b = await accepted_job_id(store, 2)
        await store.mark_running(a, now=NOW)
        await store.set_progress_message(b, 4242)
        await store.set_user_limit(2, 1)
        await store.set_default_limit(4)
        before = await store.recent_jobs()
    async with await Store.open(db_path, default_daily_limit=5) as store:
        assert await store.recent_jobs() == before
        assert (await store.get_job(b)).progress_message_id == 4242  # type: ignore[union-attr]
        assert (await store.quota_status(1, NOW)).used == 1
        assert (await store.quota_status(2, NOW)).limit == 1
        assert await store.default_limit() == 4
        assert [j.status for j in await store.active_jobs()] == [JobStatus.RUNNING, JobStatus.QUEUED]
        assert (await admit(store, 2)).status is AdmissionStatus.QUOTA_EXHAUSTED


# ----------------------------------------------------------------------------- aiosqlite's private API


async def test_the_shim_runs_a_function_in_aiosqlites_thread_in_order(tmp_path: Path) -> None:
    """The function sees what the requests queued before it did and nothing queued after it, on
    the thread where aiosqlite runs every statement of that connection."""
    import threading

    import aiosqlite

    async with aiosqlite.connect(tmp_path / "shim.db", isolation_level=None) as conn:
        await conn.create_function("thread_id", 0, threading.get_ident)
        await conn.execute("CREATE TABLE t (x INTEGER)")

        def read(db: sqlite3.Connection) -> tuple[list[int], int]:
            return [row[0] for row in db.execute("SELECT x FROM t ORDER BY x")], threading.get_ident()

        _, (seen, thread), _, sql_thread = await asyncio.gather(
            conn.execute_fetchall("INSERT INTO t VALUES (1)"),
            run_in_connection_thread(conn, read),
            conn.execute_fetchall("INSERT INTO t VALUES (2)"),
            conn.execute_fetchall("SELECT thread_id()"),
        )
        assert seen == [1]
        assert thread == list(sql_thread)[0][0] != threading.get_ident()
        with pytest.raises(ZeroDivisionError):  # its exception comes back to the caller
            await run_in_connection_thread(conn, lambda db: 1 // 0)
        assert [row[0] for row in await conn.execute_fetchall("SELECT x FROM t ORDER BY x")] == [1, 2]


async def test_an_aiosqlite_without_the_private_api_is_refused_at_open(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiosqlite

    from bot.store import aiosqlite_shim

    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    problem = aiosqlite_shim._problem()
    assert problem is not None and "_execute" in problem
    monkeypatch.setattr(aiosqlite_shim, "_PROBLEM", problem)
    with pytest.raises(StoreError, match=r"not supported: .*_execute.*aiosqlite 0\.20 to 0\.22"):
        await Store.open(db_path, default_daily_limit=5)
    assert not db_path.exists()


async def test_stats_count_finished_jobs_by_day_and_week(store: Store) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)

    async def finished(user: int, when: datetime, *, done: bool = True, seconds: float = 2.0) -> None:
        admission = await store.admit(new_job(user), max_queue=BIG, max_per_user=BIG, now=when)
        assert admission.job is not None
        await store.mark_running(admission.job.id, now=when)
        if done:
            await store.mark_generated(admission.job.id, "x.png", seconds)
            await store.mark_done(admission.job.id, 1, now=when)
        else:
            await store.mark_failed(admission.job.id, "boom", now=when)

    await finished(1, now - timedelta(hours=1), seconds=2.0)  # today
    await finished(1, now - timedelta(days=1), seconds=4.0)  # this week
    await finished(2, now - timedelta(days=2), seconds=6.0)
    await finished(2, now - timedelta(days=9))  # older than a week: not counted
    await finished(3, now - timedelta(minutes=5), done=False)
    await store.admit(new_job(4), max_queue=BIG, max_per_user=BIG, now=now)  # still queued: not finished
    stats = await store.stats(now)
    assert (stats.images_today, stats.images_week, stats.failed_today, stats.failed_week) == (1, 3, 1, 1)
    assert stats.mean_seconds_week == pytest.approx(4.0)
    assert stats.busiest_week == ((1, 2), (2, 1))
    empty = await store.stats(now + timedelta(days=30))
    assert (empty.images_week, empty.mean_seconds_week, empty.busiest_week) == (0, None, ())
