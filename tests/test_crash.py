"""SIGKILL crash tests: the bot in its own process is killed at a chosen point, then started again.

The promise under test: no job or quota unit is lost, and nothing is delivered twice. The bot is
the real `fluxbot run` (tests/bot_process.py) talking to a FakeDiscord served from this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from bot.store import JobStatus, Store

from botkit import ALICE, BOB, CAROL, images_for, make_settings, running_bot
from ceilings import START
from processkit import BotProcess, until, write_config

START_TIMEOUT = START  # import torch + diffsynth, load the tiny model, connect
FINISH_TIMEOUT = START
REQUESTS = [
    (ALICE, "a lighthouse at dusk"),
    (BOB, "a red cat"),
    (CAROL, "a quiet harbour"),
    (ALICE, "a second lighthouse"),
    (BOB, "a second cat"),
]
# what the ledger must say about the interrupted job at the moment of the kill
STATE_AT_KILL = {
    "before": "running",
    "during": "running",
    "after_generation": "generated",
    "after_delivery": "generated",
}


def read_jobs(db: Path) -> list[dict]:
    """The ledger, read with the stdlib through a read-only connection (the bot may be writing)."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in conn.execute(
                "SELECT id, user_id, status, attempts, charged_day, result_message_id FROM jobs ORDER BY id"
            )
        ]


def read_usage(db: Path) -> dict[tuple[int, str], int]:
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as conn:
        return {(u, d): n for u, d, n in conn.execute("SELECT user_id, day, used FROM usage")}


@pytest.mark.parametrize("kill_point", list(STATE_AT_KILL))
async def test_sigkill_loses_nothing_and_sends_nothing_twice(fake, tmp_path, model_dir, kill_point):
    # `fake` (conftest) is also installed in this process, which is harmless: the bot process is what talks to it
    db = tmp_path / "fluxbot.db"
    marker, go = tmp_path / "killed-here", tmp_path / "go"
    config = write_config(tmp_path, model_dir, fake)
    first = BotProcess(fake, config, tmp_path / "first.log")
    bot = BotProcess(fake, config, tmp_path / "second.log")  # the restart
    try:
        # ---- first life: five jobs from three members, then SIGKILL at the kill point
        await first.start(kill_point, marker)
        await bot.start(wait_for=go)  # imports meanwhile; runs the bot only once `go` exists
        await until(lambda: fake.gateway_connections > 0, first, START_TIMEOUT, "the bot to connect")
        await fake.wait_connected(0, timeout=START)
        await fake.wait_commands_synced(names=["imagine"])
        for user, prompt in REQUESTS:
            inter = await fake.slash("imagine", {"prompt": prompt}, user_id=user)
            ack = await inter.response(timeout=START)
            assert ack.json["type"] == 5, ack.json  # admitted and deferred, not refused
        await until(marker.exists, first, FINISH_TIMEOUT, f"the kill point {kill_point!r}")
        await first.kill()

        jobs = read_jobs(db)
        assert len(jobs) == len(REQUESTS)
        interrupted = [j for j in jobs if j["status"] != "queued"]
        assert [j["status"] for j in interrupted] == [STATE_AT_KILL[kill_point]], jobs
        victim = interrupted[0]["id"]
        sent_before_restart = len(images_for(fake, victim))
        assert sent_before_restart == (1 if kill_point == "after_delivery" else 0)

        # ---- second life: no kill point; every job must finish
        connections = fake.gateway_connections
        go.touch()
        await until(
            lambda: [j["status"] for j in read_jobs(db)] == ["done"] * len(REQUESTS),
            bot,
            START_TIMEOUT + FINISH_TIMEOUT,
            "every job to be done",
        )
        await until(lambda: fake.gateway_connections > connections, bot, START, "the restarted bot to connect")
        await fake.wait_connected(connections, timeout=START)
        assert await bot.stop() == 0, bot.log_tail()
    finally:
        await first.kill()
        await bot.kill()

    # ---- nothing lost, nothing twice
    jobs = read_jobs(db)
    assert [j["status"] for j in jobs] == ["done"] * len(REQUESTS)
    for job in jobs:
        images = images_for(fake, job["id"])
        assert len(images) == 1, f"job {job['id']} was delivered {len(images)} times ({kill_point})"
        assert job["result_message_id"] == int(images[0]["id"])
        assert job["charged_day"] is not None  # still charged: a done job is never refunded
    assert len([m for m in fake.messages.values() if m.get("attachments")]) == len(REQUESTS)
    if kill_point == "after_delivery":
        assert len(images_for(fake, victim)) == 1  # found after the restart, not sent again
    by_id = {j["id"]: j for j in jobs}
    assert by_id[victim]["attempts"] == (2 if kill_point in ("before", "during") else 1)
    assert all(j["attempts"] == 1 for j in jobs if j["id"] != victim)

    # quotas: one unit per job, none charged twice, none lost
    per_user = Counter(user for user, _ in REQUESTS)
    assert Counter(j["user_id"] for j in jobs) == per_user
    usage = read_usage(db)
    assert sum(usage.values()) == len(REQUESTS)
    store = await Store.open(db, default_daily_limit=10)
    try:
        for user, n in per_user.items():
            q = await store.quota_status(user)
            assert q.used == n, (user, q)
            assert q.remaining == 10 - n
    finally:
        await store.close()


@pytest.mark.parametrize("progress_message", ["deleted", "never_recorded"])
async def test_result_sent_as_a_new_message_is_found_after_a_crash(fake, tmp_path, model_dir, engine, progress_message):
    """The result went out as a message of its own (its progress message was deleted by a moderator, or
    its id never reached the ledger), then the bot died before recording it: the restart must find that
    message in the channel instead of sending the image twice. In-process (the kill point is the same
    as `after_delivery` above; what differs is where the result went)."""
    settings = make_settings(tmp_path, model_dir, fake)
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        stuck = asyncio.Event()
        real_mark_done = bot.store.mark_done

        async def die_before_recording(job_id, message_id, now=None):
            stuck.set()
            await asyncio.Event().wait()

        bot.store.mark_done = die_before_recording
        inter = await fake.slash("imagine", {"prompt": "a message of its own"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        job = (await bot.store.recent_jobs(1))[0]
        if progress_message == "deleted":
            fake._delete(int(original["id"]))
        else:  # as if the worker delivered before the command handler recorded the progress message
            with contextlib.closing(sqlite3.connect(settings.storage.database, timeout=10)) as conn, conn:
                conn.execute("UPDATE jobs SET progress_message_id = NULL WHERE id = ?", (job.id,))
        engine.gate.set()
        await asyncio.wait_for(stuck.wait(), 30)
        bot.store.mark_done = real_mark_done
        [sent] = images_for(fake, job.id)
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        job = await bot.store.get_job(job.id)
        assert job.status is JobStatus.DONE
        assert images_for(fake, job.id) == [sent]  # found, not sent again
        assert job.result_message_id == int(sent["id"])
        assert engine.calls.count("a message of its own") == 1
        assert (await bot.store.quota_status(ALICE)).used == 1


async def test_a_result_hundreds_of_messages_back_is_found_after_a_crash(fake, tmp_path, model_dir, engine):
    """A busy channel: 250 messages arrived after the result, before the restart (#15 item 6)."""
    settings = make_settings(tmp_path, model_dir, fake)
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        stuck = asyncio.Event()
        real_mark_done = bot.store.mark_done

        async def die_before_recording(job_id, message_id, now=None):
            stuck.set()
            await asyncio.Event().wait()

        bot.store.mark_done = die_before_recording
        inter = await fake.slash("imagine", {"prompt": "deep in the channel"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        job = (await bot.store.recent_jobs(1))[0]
        fake._delete(int(original["id"]))  # the result goes out as a message of its own
        engine.gate.set()
        await asyncio.wait_for(stuck.wait(), 30)
        bot.store.mark_done = real_mark_done
        [sent] = images_for(fake, job.id)
    for i in range(250):
        fake.add_message(f"chatter {i}")
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        job = await bot.store.get_job(job.id)
        assert job.status is JobStatus.DONE
        assert images_for(fake, job.id) == [sent]  # found, not sent again
        assert job.result_message_id == int(sent["id"])
