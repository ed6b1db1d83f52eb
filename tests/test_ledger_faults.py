"""The ledger locked by another process for longer than the worker's retries (#15 item 3): the job
still ends in the ledger once it answers again, without a restart, and the member is told; no ghost
row keeps a place under max_per_user or a unit of quota."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot import jobs
from bot.discord import messages
from bot.store import JobRecord, JobStatus, database

from botkit import ALICE, eventually, has_image, images_for, make_settings, running_bot
from ceilings import START, WAIT
from processkit import write_lock_held

MAX_PER_USER = 2


@pytest.fixture
def quick_retries(monkeypatch):
    """The worker's ledger retries as they are, only quicker: a try waits 0.1 s for another
    writer's lock instead of 10 s, and the pauses between tries are short. Nothing below waits for
    time to pass: each step waits for what the bot does (a message, a log line, a ledger row)."""
    monkeypatch.setattr(database, "SQL_PRAGMA_BUSY_TIMEOUT", "PRAGMA busy_timeout = 100")
    monkeypatch.setattr(jobs, "LEDGER_RETRY_DELAYS_S", (0.05, 0.05, 0.05))
    monkeypatch.setattr(jobs, "LEDGER_RETRY_CAP_S", 0.2)


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake, queue={"max_per_user": MAX_PER_USER}, quota={"daily_limit": 5})


async def ledger_says(bot, job_id: int, check: Callable[[JobRecord], bool], what: str) -> JobRecord:
    deadline = time.monotonic() + WAIT
    while True:
        job = await bot.store.get_job(job_id)
        if job is not None and check(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the ledger has {job}")
        await asyncio.sleep(0.02)


def jobs_ended(bot, status: str) -> float:
    name = f'fluxbot_jobs_total{{status="{status}"}} '
    [line] = [line for line in bot.metrics.text().decode().splitlines() if line.startswith(name)]
    return float(line.split()[-1])


def logged(caplog, text: str) -> int:
    """How many log records so far carry `text`."""
    return sum(text in record.getMessage() for record in caplog.records)


def job_row(db: Path, job_id: int) -> tuple[str, str | None]:
    """The job's status and charged day, read from the file (a reader passes another's write lock)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT status, charged_day FROM jobs WHERE id = ?", (job_id,)).fetchone()


async def painting(fake, bot, engine, prompt: str):
    """Alice's /imagine of `prompt`, once its message is in the ledger and the GPU paints it: (interaction, job)."""
    inter = await fake.slash("imagine", {"prompt": prompt}, user_id=ALICE)
    await inter.response()
    [job] = await bot.store.recent_jobs(1)
    await ledger_says(bot, job.id, lambda j: j.progress_message_id is not None, "the job's message recorded")
    await eventually(engine.busy.is_set, what="GPU busy")
    return inter, job


async def queue_up_to_the_cap(fake, bot, engine) -> None:
    """The member queues max_per_user images at once: every one is accepted and painted."""
    inters = [await fake.slash("imagine", {"prompt": f"again {i}"}, user_id=ALICE) for i in range(MAX_PER_USER)]
    for inter in inters:
        await inter.wait_original(has_image)
    await bot.queue.wait_idle(WAIT)
    assert [engine.calls.count(f"again {i}") for i in range(MAX_PER_USER)] == [1] * MAX_PER_USER


async def test_a_ledger_locked_past_the_retries_ends_the_job_once_it_answers(
    fake, settings, engine, quick_retries, caplog
):
    """Another program holds the write lock while the image is finished, past all of the worker's
    tries: the member is told the database is not answering; once it lets go, the job is failed
    and refunded in the ledger (no restart), the member's message says so, and they can queue up
    to max_per_user again. The job is not painted again."""
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        inter, job = await painting(fake, bot, engine, "stranded")
        async with write_lock_held(Path(settings.storage.database)):
            engine.gate.set()  # the image is painted and saved; the ledger will not take it
            down = await inter.wait_original(lambda m: jobs.LEDGER_DOWN in (m.get("content") or ""), START)
            assert down["content"] == messages.failed(jobs.LEDGER_DOWN)
            still = await bot.store.get_job(job.id)  # readers still read: the row is a ghost for now
            assert still is not None and still.status is JobStatus.RUNNING and still.charged_day is not None
            assert (await bot.store.quota_status(ALICE)).used == 1
        final = await inter.wait_original(lambda m: jobs.LEDGER_DOWN not in (m.get("content") or ""), START)
        assert final["content"].startswith(messages.failed("")), final["content"]
        assert "database was busy" in final["content"] and "quota was refunded" in final["content"]
        ended = await bot.store.get_job(job.id)
        assert ended is not None and ended.status is JobStatus.FAILED and ended.charged_day is None
        assert (await bot.store.quota_status(ALICE)).used == 0
        await bot.queue.wait_idle(WAIT)
        assert await bot.store.active_jobs() == []
        assert jobs_ended(bot, "failed") == 1

        await queue_up_to_the_cap(fake, bot, engine)
        assert (await bot.store.quota_status(ALICE)).used == MAX_PER_USER
        assert engine.calls.count("stranded") == 1 and images_for(fake, job.id) == []
        assert (await bot.store.get_job(job.id)).status is JobStatus.FAILED  # type: ignore[union-attr]


async def test_a_delivery_the_ledger_cannot_record_is_recorded_once_it_answers(
    fake, settings, engine, quick_retries, caplog
):
    """The result reaches Discord while another program holds the write lock, past all of the
    worker's tries to record it: once the lock goes, the job is done exactly once (never refunded:
    the member has the image), charged once, posted once, and the member can queue up to
    max_per_user again."""
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        upload = fake.hold_next("PATCH", r"/webhooks/", file_prefix="fluxbot-")  # the result, not a preview
        inter = await fake.slash("imagine", {"prompt": "delivered"}, user_id=ALICE)
        await asyncio.wait_for(upload.arrived.wait(), WAIT)  # the image is on its way to Discord
        [job] = await bot.store.recent_jobs(1)
        assert job.status is JobStatus.GENERATED
        async with write_lock_held(Path(settings.storage.database)):
            upload.release.set()
            result = await inter.wait_original(has_image)
            await eventually(
                lambda: logged(caplog, "delivered, but the ledger did not record it"),
                timeout=START,
                what="the worker's tries to record the delivery to run out",
            )
            still = await bot.store.get_job(job.id)
            assert still is not None and still.status is JobStatus.GENERATED
        done = await ledger_says(bot, job.id, lambda j: j.status is JobStatus.DONE, "the delivery recorded")
        assert done.result_message_id == int(result["id"]) and done.charged_day is not None
        await bot.queue.wait_idle(WAIT)
        assert await bot.store.active_jobs() == []
        assert (await bot.store.quota_status(ALICE)).used == 1
        assert jobs_ended(bot, "done") == 1 and jobs_ended(bot, "failed") == 0
        assert [m["id"] for m in images_for(fake, job.id)] == [result["id"]]
        assert engine.calls == ["delivered"]

        await queue_up_to_the_cap(fake, bot, engine)
        assert (await bot.store.quota_status(ALICE)).used == 1 + MAX_PER_USER
        assert [m["id"] for m in images_for(fake, job.id)] == [result["id"]]


async def test_a_stop_while_the_ledger_is_still_locked_leaves_the_job_to_the_next_start(
    fake, settings, engine, quick_retries, caplog
):
    """The bot stops while it still tries, in the background, to end a job the ledger would not
    take: the stop does not wait for the ledger, the row stays active, and the next start paints
    the job and delivers it once, charged once."""
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        inter, job = await painting(fake, bot, engine, "stopped while stranded")
        async with write_lock_held(Path(settings.storage.database)):
            engine.gate.set()
            await inter.wait_original(lambda m: jobs.LEDGER_DOWN in (m.get("content") or ""), START)
            refusals = logged(caplog, "did not take its failure")
            await eventually(
                lambda: logged(caplog, "did not take its failure") > refusals,
                timeout=START,
                what="a background try refused by the lock",
            )
            await bot.close()  # what a stop does (running_bot's exit closes it again: a no-op)
            await bot.queue.wait_idle(WAIT)  # nothing is left trying: the stop ended the background tries
            assert job_row(Path(settings.storage.database), job.id) == ("running", job.charged_day)
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        await bot.queue.wait_idle(WAIT)
        done = await bot.store.get_job(job.id)
        assert done is not None and done.status is JobStatus.DONE and done.attempts == 2
        assert (await bot.store.quota_status(ALICE)).used == 1
        assert [m["id"] for m in images_for(fake, job.id)] == [(await inter.original())["id"]]
