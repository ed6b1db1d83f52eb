"""Relax mode end to end (`[quota] relax`): a member whose daily quota is used up may still /imagine
and Re-roll; the job is free, waits until no charged job does (in turns between the members waiting
in relax mode), is bounded by the per-user cap, is marked in /queue for admins, comes back as a relax
job after a restart, and refunds nothing when it fails. With relax off the quota refuses as before.
The real discord.py client against the fake Discord, the tiny engine, a real SQLite file."""

from __future__ import annotations

import threading
import time

import pytest

from bot.engine.api import GenerationCancelled
from bot.store import JobStatus, Store

from botkit import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    MOD,
    ControlledEngine,
    embed_field,
    ephemeral_texts,
    eventually,
    has_image,
    make_settings,
    running_bot,
)
from ceilings import WAIT


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 1, "relax": True})


class SteppedEngine(ControlledEngine):
    """The tiny engine where each image waits for a permit of its own (`step`) before it is painted,
    so a test can let exactly one job finish and see which one the queue starts next."""

    def __init__(self, engine):
        super().__init__(engine)
        self.permits = threading.Semaphore(0)

    def step(self) -> None:
        self.permits.release()

    def generate(self, request, *, on_progress=None, should_cancel=None):
        self.calls.append(request.prompt)
        deadline = time.monotonic() + WAIT
        while not self.permits.acquire(timeout=0.02):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled("cancelled while waiting for its permit")
            if time.monotonic() > deadline:
                raise TimeoutError("the test never let this image be painted")
        return self.engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)


async def imagine(fake, user, prompt):
    inter = await fake.slash("imagine", {"prompt": prompt}, user_id=user)
    ack = await inter.response()
    return inter, ack


def status_texts(fake, inter) -> list[str]:
    """Every text the interaction's public message was edited to, in order (the reply, then the worker's)."""
    return [
        e.json.get("content") or ""
        for e in fake.events
        if e.method == "PATCH" and e.json and f"/{inter.token}/messages/" in e.path and e.json.get("content")
    ]


async def private_answer(fake, inter) -> str:
    await inter.response()
    texts = ephemeral_texts(fake, inter)
    assert len(texts) == 1, texts
    return texts[0]


def relax_counter(bot) -> float:
    for line in bot.metrics.text().decode().splitlines():
        if line.startswith("fluxbot_relax_jobs_total "):
            return float(line.split()[-1])
    raise AssertionError("fluxbot_relax_jobs_total is not in the metrics")


async def test_relax_off_refuses_a_used_up_quota_with_todays_message(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 1})
    assert settings.quota.relax is False  # the default
    async with running_bot(fake, settings, engine) as bot:
        first, _ = await imagine(fake, ALICE, "a paid pear")
        final = await first.wait_original(has_image)
        second, _ = await imagine(fake, ALICE, "one pear too many")
        text = await private_answer(fake, second)
        assert text.startswith("Your daily quota of 1 images is used up. It resets <t:"), text
        assert "relax" not in text.lower()
        job_id = (await bot.store.recent_jobs(1))[0].id
        click = await fake.click(int(final["id"]), f"fluxbot:reroll:{job_id}", user_id=ALICE)
        assert "daily quota of 1 images is used up" in await private_answer(fake, click)
        await bot.queue.wait_idle(WAIT)
        assert [j.relax for j in await bot.store.recent_jobs(10)] == [False]
        assert (await bot.store.quota_status(ALICE)).used == 1
        assert relax_counter(bot) == 0


async def test_relax_on_paints_a_used_up_quota_for_free_and_says_so(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        paid, _ = await imagine(fake, ALICE, "a paid pear")
        paid_final = await paid.wait_original(has_image)
        paid_job = (await bot.store.recent_jobs(1))[0]
        assert not paid_job.relax and paid_job.charged_day is not None  # quota left: an ordinary job
        assert not any("relax" in t for t in status_texts(fake, paid))
        assert embed_field(paid_final, "Mode") is None

        free, ack = await imagine(fake, ALICE, "a free pear")
        assert ack.json["type"] == 5  # admitted and deferred, not refused
        assert ephemeral_texts(fake, free) == []
        final = await free.wait_original(has_image)
        reply = status_texts(fake, free)[0]  # the command's own answer: it started at once
        assert "relax mode" in reply.lower() and "quota is used up" in reply and "free" in reply, reply
        assert embed_field(final, "Mode") == "Relax (free)"
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert (job.prompt, job.relax, job.charged_day, job.status) == ("a free pear", True, None, JobStatus.DONE)
        assert (await bot.store.quota_status(ALICE)).used == 1  # charged nothing

        # Re-roll with the quota used up: relax too, charged to nobody.
        click = await fake.click(int(paid_final["id"]), f"fluxbot:reroll:{paid_job.id}", user_id=ALICE)
        await click.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        reroll = (await bot.store.recent_jobs(1))[0]
        assert (reroll.origin, reroll.relax, reroll.charged_day) == ("reroll", True, None)
        assert (await bot.store.quota_status(ALICE)).used == 1
        assert relax_counter(bot) == 2

        q = await fake.slash("quota", {}, user_id=ALICE)
        quota = await private_answer(fake, q)
        assert "used 1 of 1" in quota and "Relax mode is on" in quota
        q = await fake.slash("quota", {}, user_id=BOB)  # quota left: no word of relax mode
        assert "relax" not in (await private_answer(fake, q)).lower()


async def test_relax_jobs_run_after_every_charged_job_and_take_turns(fake, settings, tiny_engine):
    """Relax jobs wait while any charged job waits, even one admitted after them; between members in
    relax mode the queue takes turns, as it does between charged jobs."""
    engine = SteppedEngine(tiny_engine)
    async with running_bot(fake, settings, engine) as bot:
        await bot.store.set_user_limit(CAROL, 5)
        await imagine(fake, ALICE, "alice charged")
        await eventually(lambda: engine.calls == ["alice charged"], what="the first job started")
        alice_relax = [(await imagine(fake, ALICE, f"alice relax {i}"))[0] for i in (1, 2)]
        await imagine(fake, BOB, "bob charged")
        bob_relax, _ = await imagine(fake, BOB, "bob relax 1")
        for n in (1, 2):  # admitted after every relax job (plain turns would put Alice's first before the 2nd)
            await imagine(fake, CAROL, f"carol charged, later {n}")
        waiting = bot.queue.waiting()
        assert [(j.prompt, j.relax) for j in waiting] == [
            ("bob charged", False),
            ("carol charged, later 1", False),
            ("carol charged, later 2", False),
            ("alice relax 1", True),
            ("bob relax 1", True),
            ("alice relax 2", True),
        ]
        queued = await alice_relax[1].wait_original(lambda m: "relax" in (m.get("content") or ""))
        assert queued["content"].startswith("💤 Queued in relax mode: your daily quota is used up, so this image")
        assert "free" in queued["content"] and "after everyone else's" in queued["content"]
        assert "relax mode" in status_texts(fake, bob_relax)[0]

        for done in range(1, 5):  # the first four: the charged ones
            engine.step()
            await eventually(lambda n=done: len(engine.calls) == n + 1, what=f"job {done + 1} started")
        assert engine.calls[-1] == "alice relax 1"
        await imagine(fake, CAROL, "carol charged, while a relax job paints")  # a charged job goes first
        await eventually(lambda: len(bot.queue.waiting()) == 3, what="the late charged job queued")
        # Then the relax jobs in turns: Bob's first (Alice's relax job is the one painting).
        assert [j.prompt for j in bot.queue.waiting()] == [
            "carol charged, while a relax job paints",
            "bob relax 1",
            "alice relax 2",
        ]
        for _ in range(4):  # the running one and the three waiting
            engine.step()
        await bot.queue.wait_idle(WAIT)
        assert engine.calls == [
            "alice charged",
            "bob charged",
            "carol charged, later 1",
            "carol charged, later 2",
            "alice relax 1",
            "carol charged, while a relax job paints",
            "bob relax 1",
            "alice relax 2",
        ]
        assert [(await bot.store.quota_status(u)).used for u in (ALICE, BOB, CAROL)] == [1, 1, 3]
        assert all(j.status is JobStatus.DONE for j in await bot.store.recent_jobs(10))


async def test_relax_jobs_count_toward_the_per_user_cap(fake, tmp_path, model_dir, engine):
    settings = make_settings(
        tmp_path, model_dir, fake, quota={"daily_limit": 1, "relax": True}, queue={"max_per_user": 2}
    )
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        await imagine(fake, ALICE, "charged")
        await eventually(engine.busy.is_set, what="GPU busy")
        relaxed, ack = await imagine(fake, ALICE, "relax one")
        assert ack.json["type"] == 5
        over, _ = await imagine(fake, ALICE, "relax two")
        text = ephemeral_texts(fake, over)
        assert text and "already have 2 images waiting" in text[0] and "Nothing was charged" in text[0]
        assert [(j.prompt, j.relax) for j in await bot.store.active_jobs()] == [("charged", False), ("relax one", True)]
        engine.gate.set()
        await relaxed.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.quota_status(ALICE)).used == 1


async def test_admins_see_relax_jobs_marked_in_queue(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        await imagine(fake, ALICE, "charged")
        await eventually(engine.busy.is_set, what="GPU busy")
        await imagine(fake, ALICE, "relaxed")
        await imagine(fake, BOB, "bob charged")

        async def listing(user: int) -> list[str]:
            return (await private_answer(fake, await fake.slash("queue", {}, user_id=user))).splitlines()

        for admin in (ADMIN, MOD):  # listed in admin_user_ids; Manage Server in the home server
            lines = await listing(admin)
            assert lines[0] == f"▶️ now: <@{ALICE}>, 3 steps"
            assert lines[1] == f"1. <@{BOB}>, 3 steps"
            assert lines[2] == f"2. <@{ALICE}>, 3 steps  💤 relax (free)"
        bob = await listing(BOB)  # a member sees the order, not who is in relax mode
        assert bob[2] == f"2. <@{ALICE}>, 3 steps" and "relax" not in "\n".join(bob)
        alice = await listing(ALICE)  # but her own
        assert alice[2] == f"2. <@{ALICE}>, 3 steps  💤 relax (free)  ← yours"
        engine.gate.set()
        await bot.queue.wait_idle(WAIT)


async def test_a_relax_job_comes_back_as_relax_after_a_restart(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        await imagine(fake, ALICE, "charged, interrupted")
        await eventually(engine.busy.is_set, what="GPU busy")
        relaxed, _ = await imagine(fake, ALICE, "relaxed, waiting")
        assert [j.relax for j in bot.queue.waiting()] == [True]
    # The bot stopped with one job running and one waiting; a new bot on the same database:
    started = len(engine.calls)
    async with running_bot(fake, settings, engine) as bot:
        await eventually(engine.busy.is_set, what="the interrupted job started again")
        assert [(j.prompt, j.relax, j.charged_day) for j in bot.queue.waiting()] == [("relaxed, waiting", True, None)]
        await imagine(fake, BOB, "bob, after the restart")
        assert [j.prompt for j in bot.queue.waiting()] == ["bob, after the restart", "relaxed, waiting"]
        engine.gate.set()
        final = await relaxed.wait_original(has_image)
        assert embed_field(final, "Mode") == "Relax (free)"
        await bot.queue.wait_idle(WAIT)
        assert engine.calls[started:] == ["charged, interrupted", "bob, after the restart", "relaxed, waiting"]
        assert (await bot.store.quota_status(ALICE)).used == 1
    async with await Store.open(settings.storage.database, default_daily_limit=1) as store:
        jobs = {j.prompt: j for j in await store.recent_jobs(10)}
        assert jobs["relaxed, waiting"].relax and jobs["relaxed, waiting"].charged_day is None
        assert jobs["relaxed, waiting"].status is JobStatus.DONE
        assert not jobs["charged, interrupted"].relax and (await store.quota_status(ALICE)).used == 1


async def test_a_relax_job_that_fails_refunds_nothing_and_says_it_was_free(fake, settings, engine):
    engine.fail_on["explode"] = RuntimeError("CUDA error: an illegal memory access")
    async with running_bot(fake, settings, engine) as bot:
        await (await imagine(fake, ALICE, "a paid pear"))[0].wait_original(has_image)
        bad, _ = await imagine(fake, ALICE, "please explode")
        msg = await bad.wait_original(lambda m: "Could not paint" in (m.get("content") or ""))
        assert "generation failed (RuntimeError)" in msg["content"]
        assert "nothing was charged" in msg["content"] and "refunded" not in msg["content"], msg["content"]
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert (job.status, job.relax, job.charged_day) == (JobStatus.FAILED, True, None)
        assert (await bot.store.quota_status(ALICE)).used == 1  # neither charged nor refunded

        # A charged job that fails still refunds, as before.
        assert (await bot.store.quota_status(BOB)).used == 0
        charged, _ = await imagine(fake, BOB, "bob: explode")
        msg = await charged.wait_original(lambda m: "Could not paint" in (m.get("content") or ""))
        assert "your quota was refunded" in msg["content"]
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.quota_status(BOB)).used == 0


async def test_cancelling_a_relax_job_says_nothing_was_charged(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        running, _ = await imagine(fake, ALICE, "charged")
        await eventually(engine.busy.is_set, what="GPU busy")
        await imagine(fake, ALICE, "relaxed")
        waiting = await private_answer(fake, await fake.slash("cancel", {}, user_id=ALICE))
        assert waiting.startswith("Cancelled your waiting image (job 2). It was a free relax-mode image")
        assert (await bot.store.quota_status(ALICE)).used == 1
        stopping = await private_answer(fake, await fake.slash("cancel", {}, user_id=ALICE))
        assert "Your quota will be refunded" in stopping  # the charged one
        engine.gate.set()
        await running.wait_original(lambda m: "Cancelled. Your quota was refunded." in (m.get("content") or ""))
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.quota_status(ALICE)).used == 0
        # Quota back: the next one is charged again, not relaxed.
        again, _ = await imagine(fake, ALICE, "charged again")
        await again.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        assert not (await bot.store.recent_jobs(1))[0].relax
        engine.gate.clear()
        relax_running, _ = await imagine(fake, ALICE, "relaxed, stopped while painting")
        await eventually(lambda: bot.queue.running is not None and bot.queue.running.relax, what="relax job running")
        stop = await private_answer(fake, await fake.slash("cancel", {}, user_id=ALICE))
        assert "at the next step. It was a free relax-mode image" in stop
        engine.gate.set()
        final = await relax_running.wait_original(lambda m: "Cancelled" in (m.get("content") or ""))
        assert (
            final["content"]
            == "🛑 Cancelled. It was a free relax-mode image: nothing was charged, so nothing is refunded."
        )
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.quota_status(ALICE)).used == 1


def test_no_failure_notice_of_a_relax_job_promises_a_refund():
    """Every reason the queue gives a failed job, as a relax job's member reads it."""
    from bot import jobs
    from bot.store import JobRecord

    def job(relax: bool) -> JobRecord:
        return JobRecord(
            prompt="p", seed=1, id=1, user_id=ALICE, guild_id=None, channel_id=None, status=JobStatus.FAILED,
            attempts=1, charged_day=None, queued_at=0.0, started_at=None, finished_at=None, error=None,
            interaction_id=None, interaction_token=None, interaction_created_at=None, application_id=None,
            origin="imagine", progress_message_id=None, result_path=None, result_message_id=None,
            duration_s=None, upload_limit=None, relax=relax,
        )  # fmt: skip

    reasons = [
        jobs._unexpected(OSError(28, "No space left on device")),
        jobs._unexpected(jobs.StoreError("locked")),
        jobs._unexpected(ValueError("bug")),
        jobs._undeliverable(FileNotFoundError()),
        jobs._undeliverable(jobs.DeliveryFailed("no permission")),
        jobs.LEDGER_DOWN,
    ]
    for reason in reasons:
        assert "refund" in reason.lower()
        assert jobs.for_job(job(False), reason) == reason  # a charged job: as before
        relaxed = jobs.for_job(job(True), reason)
        assert "refund" not in relaxed.lower() and "free relax-mode image" in relaxed, relaxed
