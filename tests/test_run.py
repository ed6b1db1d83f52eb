"""`fluxbot run` as a process of its own, at its edges: Discord unreachable when the bot starts (it
retries, then serves), Discord ending the session for good (one line, no traceback), and a second
bot started on the same database (refused before it touches anything)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sqlite3

from botkit import ALICE, add_members, ephemeral_texts, has_image, images_for
from ceilings import START
from fake_discord import FakeDiscord
from processkit import BotProcess, until, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_run_retries_until_discord_can_be_reached(tmp_path, model_dir):
    fake = FakeDiscord()
    fake.port = free_port()  # nothing listens there yet: the bot starts with Discord unreachable
    fake.api_base = f"http://127.0.0.1:{fake.port}/api/v10"
    fake.gateway_url = f"ws://127.0.0.1:{fake.port}/gateway"
    proc = BotProcess(fake, write_config(tmp_path, model_dir, fake), tmp_path / "bot.log")
    await proc.start()
    try:
        await until(lambda: proc.log_tail(100_000).count("cannot reach Discord") >= 2, proc, START, "two failed logins")
        await fake.start()  # Discord is back (the same address)
        add_members(fake)
        await until(
            lambda: fake.gateway_connections > 0 and "imagine" in fake.synced_commands,
            proc,
            START,
            "the bot to log in, sync its commands and connect",
        )
        await fake.wait_ready()
        quota = await fake.slash("quota", {}, user_id=ALICE)
        await quota.response(timeout=START)
        assert "images today" in ephemeral_texts(fake, quota)[0]
        log = proc.log_tail(100_000)
        assert "Traceback" not in log
        assert "trying again in" in log
        assert await proc.stop(timeout=START) == 0
    finally:
        await proc.kill()
        await fake.stop()


async def test_a_token_reset_while_running_ends_with_one_line(fake, tmp_path, model_dir):
    proc = BotProcess(fake, write_config(tmp_path, model_dir, fake), tmp_path / "bot.log")
    await proc.start()
    try:
        await until(lambda: fake.gateway_connections > 0, proc, START, "the bot to connect")
        await fake.wait_ready()
        await fake.drop_gateway(4004, wait=False)  # what Discord sends once the token was reset
        assert proc.proc is not None
        code = await asyncio.wait_for(proc.proc.wait(), START)
        log = proc.log_tail(100_000)
        assert code == 1, log
        assert "Traceback" not in log
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert errors == [
            "error: Discord closed the connection (code 4004): authentication failed: the token was "
            "reset or revoked; put the new one in DISCORD_TOKEN"
        ], log
    finally:
        await proc.kill()


def ledger(db) -> tuple[list[tuple], list[tuple]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return (
            conn.execute("SELECT id, status, attempts, charged_day FROM jobs ORDER BY id").fetchall(),
            conn.execute("SELECT user_id, day, used FROM usage ORDER BY user_id").fetchall(),
        )


async def test_a_second_bot_on_the_same_database_is_refused_and_changes_nothing(fake, tmp_path, model_dir):
    config = write_config(tmp_path, model_dir, fake)
    first = BotProcess(fake, config, tmp_path / "first.log")
    others: list[BotProcess] = []
    await first.start()
    try:
        await until(lambda: fake.gateway_connections > 0, first, START, "the first bot to connect")
        await fake.wait_ready()
        await (await fake.slash("imagine", {"prompt": "a lighthouse"}, user_id=ALICE)).wait_original(has_image, START)
        await until(lambda: ledger(tmp_path / "fluxbot.db")[0][0][1] == "done", first, START, "the job to be done")
        before, connections = ledger(tmp_path / "fluxbot.db"), fake.gateway_connections
        assert before[0] and before[1]

        second = BotProcess(fake, config, tmp_path / "second.log")
        others.append(second)
        await second.start()
        assert second.proc is not None and first.proc is not None
        code = await asyncio.wait_for(second.proc.wait(), START)
        log = second.log_tail()
        assert code == 1, log
        assert f"another fluxbot is already running on {tmp_path / 'fluxbot.db'} (pid {first.proc.pid})" in log
        assert "Traceback" not in log
        assert fake.gateway_connections == connections  # it never reached Discord
        assert ledger(tmp_path / "fluxbot.db") == before
        quota = await fake.slash("quota", {}, user_id=ALICE)  # the first bot still answers
        await quota.response(timeout=START)

        await first.kill()  # SIGKILL: the kernel drops the lock with its holder
        third = BotProcess(fake, config, tmp_path / "third.log")
        others.append(third)
        await third.start()
        await until(lambda: fake.gateway_connections > connections, third, START, "the restarted bot to connect")
        assert await third.stop(timeout=START) == 0
    finally:
        for proc in (first, *others):
            await proc.kill()


async def test_sigterm_stops_the_job_at_its_next_step(fake, tmp_path, model_dir):
    """A slow card (each step 0.5 s longer): SIGTERM mid-job stops it at the next step, not after
    all 40; the job stays in the ledger for the next start."""
    proc = BotProcess(fake, write_config(tmp_path, model_dir, fake), tmp_path / "bot.log")
    await proc.start(step_delay=0.5)
    try:
        await until(lambda: fake.gateway_connections > 0, proc, START, "the bot to connect")
        await fake.wait_ready()
        inter = await fake.slash("imagine", {"prompt": "a long one", "steps": 40}, user_id=ALICE)
        await inter.wait_original(lambda m: "step 1/40" in (m.get("content") or ""), timeout=START)
        assert await proc.stop(timeout=START) == 0
        log = proc.log_tail(100_000)
        stopped = re.search(r"the job in progress stopped \(cancelled before step (\d+)/40\)", log)
        assert stopped and int(stopped.group(1)) < 40, log
        assert "Traceback" not in log
        assert ledger(tmp_path / "fluxbot.db")[0] == [(1, "running", 1, ledger(tmp_path / "fluxbot.db")[0][0][3])]
        assert not [m for m in fake.messages.values() if has_image(m)]
    finally:
        await proc.kill()


async def test_sigterm_does_not_wait_for_a_gpu_that_cannot_stop(fake, tmp_path, model_dir):
    """The GPU thread is inside something that cannot be interrupted (as a compile is: here the
    kill point holds step 1 for an hour): the bot exits anyway, and the job waits in the ledger."""
    marker = tmp_path / "marker"
    proc = BotProcess(fake, write_config(tmp_path, model_dir, fake), tmp_path / "bot.log")
    await proc.start(kill_point="during", marker=marker)
    try:
        await until(lambda: fake.gateway_connections > 0, proc, START, "the bot to connect")
        await fake.wait_ready()
        await fake.slash("imagine", {"prompt": "stuck"}, user_id=ALICE)
        await until(marker.exists, proc, START, "the GPU thread to hang")
        assert await proc.stop(timeout=START) == 0
        log = proc.log_tail(100_000)
        assert "the GPU is still busy" in log and "not waiting for it" in log
        assert [row[1] for row in ledger(tmp_path / "fluxbot.db")[0]] == ["running"]
    finally:
        await proc.kill()


def progress_message_ids(db) -> list[int | None]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT progress_message_id FROM jobs ORDER BY id")]


async def test_sigterm_while_the_model_loads_exits_and_the_job_waits_for_the_restart(fake, tmp_path, model_dir):
    """SIGTERM during start-up, while the engine loads (here a load that never ends; a real load and
    first compile take minutes): the bot exits as for any stop, without waiting for the load. The
    member's job, accepted meanwhile, waits in the ledger, charged once; the restarted bot paints it
    once."""
    marker = tmp_path / "marker"
    config = write_config(tmp_path, model_dir, fake)
    db = tmp_path / "fluxbot.db"
    proc = BotProcess(fake, config, tmp_path / "bot.log")
    restarted = BotProcess(fake, config, tmp_path / "restarted.log")
    await proc.start(kill_point="loading", marker=marker)
    try:
        await until(lambda: fake.gateway_connections > 0, proc, START, "the bot to connect")
        await fake.wait_ready()
        await until(marker.exists, proc, START, "the model load to begin")
        inter = await fake.slash("imagine", {"prompt": "while loading"}, user_id=ALICE)
        queued = await inter.wait_original(lambda m: "model is loading" in (m.get("content") or ""), timeout=START)
        await until(lambda: progress_message_ids(db) == [int(queued["id"])], proc, START, "the job's message recorded")
        assert await proc.stop(timeout=START) == 0
        log = proc.log_tail(100_000)
        assert "Traceback" not in log
        assert "the model is still loading; not waiting for it" in log, log
        jobs, usage = ledger(db)
        assert [row[:3] for row in jobs] == [(1, "queued", 0)]
        assert [row[2] for row in usage] == [1]

        connections = fake.gateway_connections
        await restarted.start()  # a normal loader this time
        await until(lambda: fake.gateway_connections > connections, restarted, START, "the restarted bot to connect")
        await until(lambda: ledger(db)[0][0][1] == "done", restarted, START, "the job to be delivered")
        jobs, usage = ledger(db)
        assert [row[:3] for row in jobs] == [(1, "done", 1)]
        assert [row[2] for row in usage] == [1]  # charged once
        [result] = images_for(fake, 1)
        assert result["id"] == queued["id"]  # the member's own message carries the image
        assert await restarted.stop(timeout=START) == 0
    finally:
        await proc.kill()
        await restarted.kill()
