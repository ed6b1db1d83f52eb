"""No job or quota lost: restarts, crashes between sending and recording, Discord faults, hostile input."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from bot.discord import delivery
from bot.store import JobStatus, NewJob, Store

from botkit import (
    ADMIN,
    ALICE,
    BOB,
    embed_field,
    ephemeral_texts,
    eventually,
    has_image,
    images_for,
    make_settings,
    running_bot,
)
from ceilings import START, WAIT
from fake_discord import READ_MESSAGE_HISTORY, SEND_MESSAGES
from processkit import write_lock_held


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake, queue={"max_per_user": 5})


async def test_restart_resumes_waiting_and_interrupted_jobs_exactly_once(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inters = []
        for user, prompt in ((ALICE, "first"), (BOB, "second"), (ALICE, "third")):
            inter = await fake.slash("imagine", {"prompt": prompt}, user_id=user)
            await inter.response()
            inters.append(inter)
        await eventually(engine.busy.is_set, what="GPU busy")
        jobs = await bot.store.active_jobs()
        assert [j.status for j in jobs] == [JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.QUEUED]
    # the bot stopped mid-job: the ledger still holds all three
    engine.gate.set()
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        done = sorted(await bot.store.recent_jobs(10), key=lambda j: j.id)
        assert [j.status for j in done] == [JobStatus.DONE] * 3
        assert done[0].attempts == 2 and done[1].attempts == 1
        for job in done:
            assert len(images_for(fake, job.id)) == 1
        assert (await bot.store.quota_status(ALICE)).used == 2
        assert (await bot.store.quota_status(BOB)).used == 1
    for inter in inters:
        assert has_image(await inter.original())


@pytest.mark.parametrize("refuse_lookup", [False, True])
async def test_crash_between_sending_and_recording_sends_nothing_twice(fake, settings, engine, refuse_lookup):
    """After a crash between sending and recording, the restarted bot finds the result instead of
    sending it again, also when Discord refuses to show the progress message (403): then it looks in
    the channel."""
    async with running_bot(fake, settings, engine) as bot:
        stuck = asyncio.Event()
        real_mark_done = bot.store.mark_done

        async def crash_before_recording(job_id, message_id, now=None):
            stuck.set()
            await asyncio.Event().wait()  # the process "dies" here

        bot.store.mark_done = crash_before_recording
        inter = await fake.slash("imagine", {"prompt": "once only", "seed": 5}, user_id=ALICE)
        await asyncio.wait_for(stuck.wait(), 30)
        bot.store.mark_done = real_mark_done
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.GENERATED
        assert len(images_for(fake, job.id)) == 1
    uploads = sum(1 for ev in fake.events if ev.files)
    if refuse_lookup:
        fake.fail_next("GET", r"/webhooks/\d+/[^/]+/messages/", status=403, times=5)
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        job = await bot.store.get_job(job.id)
        assert job.status is JobStatus.DONE
        assert len(images_for(fake, job.id)) == 1
        assert engine.calls.count("once only") == 1
        assert (await bot.store.quota_status(ALICE)).used == 1
    assert sum(1 for ev in fake.events if ev.files) == uploads  # found, not uploaded again
    assert any(ev.status == 403 for ev in fake.events) == refuse_lookup
    assert embed_field(await inter.original(), "Seed") == "5"


async def test_generated_but_unsent_result_is_sent_after_restart(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        stuck = asyncio.Event()

        async def crash_before_sending(job, path):
            stuck.set()
            await asyncio.Event().wait()

        bot.queue.delivery.deliver = crash_before_sending
        await fake.slash("imagine", {"prompt": "late delivery"}, user_id=ALICE)
        await asyncio.wait_for(stuck.wait(), 30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.GENERATED and not images_for(fake, job.id)
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        assert (await bot.store.get_job(job.id)).status is JobStatus.DONE
        assert len(images_for(fake, job.id)) == 1
        assert engine.calls.count("late delivery") == 1  # not painted again


async def test_a_job_that_keeps_dying_is_given_up_and_refunded(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, jobs={"max_attempts": 2})
    engine.gate.clear()
    for _ in range(2):  # two starts, each interrupted mid-job
        async with running_bot(fake, settings, engine) as bot:
            if not await bot.store.recent_jobs(1):
                await (await fake.slash("imagine", {"prompt": "doomed"}, user_id=ALICE)).response()
            await eventually(engine.busy.is_set, what="GPU busy")
    engine.gate.set()
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.FAILED and job.attempts == 3
        assert (await bot.store.quota_status(ALICE)).used == 0


async def test_deleted_progress_message_gets_the_result_as_a_new_message(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "orphan"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        fake._delete(int(original["id"]))  # a moderator deleted the "Queued" message
        engine.gate.set()
        await bot.queue.wait_idle(30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE
        [msg] = images_for(fake, job.id)
        assert msg["id"] != original["id"]


async def test_a_post_stored_but_answered_502_is_not_doubled_by_the_retry(fake, settings, engine):
    """Discord stored the result, then its answer was lost (502): the HTTP client retries the post.
    The result must still be one message (#15 item 6)."""
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "said twice"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        fake._delete(int(original["id"]))  # the result must go out as a new message
        for method, path in (("POST", r"/webhooks/\d+/[^/]+$"), ("POST", r"/channels/\d+/messages$")):
            fake.fail_next(method, path, status=502, body={"message": "Bad Gateway", "code": 0}, after_handling=True)
        engine.gate.set()
        await bot.queue.wait_idle(START)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE
        assert len(images_for(fake, job.id)) == 1


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "not-stored"])
async def test_a_follow_up_answered_502_is_not_doubled_where_the_bot_may_not_post(
    fake, settings, engine, monkeypatch, stored
):
    """Where the bot may not post in the channel and the progress message was deleted, the result goes
    out as a webhook follow-up, which has no nonce. Discord answers it 502, having stored it or not: it
    is sent once more only if it is not in the channel, and ends as one message (#15 item 6)."""
    monkeypatch.setattr(delivery, "LOST_ANSWER_LOOK_AFTER_S", 0.0)
    fake.set_channel_overwrite(fake.bot_user_id, deny=SEND_MESSAGES)  # it may read the channel, not post there
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "said twice"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        fake._delete(int(original["id"]))  # nothing left to edit: the result must be a new message
        fake.fail_next(
            "POST",
            r"/webhooks/\d+/[^/]+$",
            status=502,
            body={"message": "Bad Gateway", "code": 0},
            after_handling=stored,
        )
        engine.gate.set()
        await bot.queue.wait_idle(START)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE
        [msg] = images_for(fake, job.id)
        assert msg["webhook_id"] == str(fake.application_id) and job.result_message_id == int(msg["id"])
        assert [b.get("label") for row in msg["components"] for b in row["components"]] == [
            "Re-roll",
            "Vary (Subtle)",
            "Vary (Strong)",
            "Upscale",
            "Remix",
            "Delete",
        ]
    posts = [ev for ev in fake.events if ev.method == "POST" and ev.path.startswith("/channels/")]
    assert posts and {ev.response["code"] for ev in posts} == {50013}  # the channel refused it: a follow-up
    followups = [ev for ev in fake.events if ev.method == "POST" and ev.path.startswith("/webhooks/")]
    assert [ev.status for ev in followups] == ([502] if stored else [502, 200])


async def test_a_follow_up_answered_502_where_the_bot_cannot_look_is_not_sent_again(
    fake, settings, engine, monkeypatch
):
    """As above, but the bot may not read the channel's history either (Discord then lists no messages):
    it cannot tell whether the follow-up arrived, so it does not send it again; the job is refunded."""
    monkeypatch.setattr(delivery, "LOST_ANSWER_LOOK_AFTER_S", 0.0)
    fake.set_channel_overwrite(fake.bot_user_id, deny=SEND_MESSAGES | READ_MESSAGE_HISTORY)
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "said twice, unseen"}, user_id=ALICE)
        original = await inter.wait_original(lambda m: m["content"])
        fake._delete(int(original["id"]))
        fake.fail_next(
            "POST", r"/webhooks/\d+/[^/]+$", status=502, body={"message": "Bad Gateway", "code": 0}, after_handling=True
        )
        engine.gate.set()
        await bot.queue.wait_idle(START)
        job = (await bot.store.recent_jobs(1))[0]
        assert len(images_for(fake, job.id)) == 1
        assert job.status is JobStatus.FAILED and "not sent again" in job.error
        assert (await bot.store.quota_status(ALICE)).used == 0


async def test_rate_limit_is_honoured_and_retried(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        inter = await fake.slash("imagine", {"prompt": "slow down"}, user_id=ALICE)
        await inter.wait_original(lambda m: m["content"])
        fake.fail_next("PATCH", r"/webhooks/\d+/[^/]+/messages/", status=429, times=2)
        engine.gate.set()
        await bot.queue.wait_idle(30)
        assert [e for e in fake.events if e.status == 429]
        assert has_image(await inter.original())


async def test_oversized_png_is_reencoded_under_the_upload_limit(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, generation={"width": 512, "height": 512})
    fake.attachment_size_limit = 60_000
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "big noisy image", "seed": 77, "steps": 1}, user_id=ALICE)
        final = await inter.wait_original(has_image)
        att = final["attachments"][0]
        assert att["size"] <= 60_000 and not att["filename"].endswith(".png")
        assert embed_field(final, "Seed") == "77" and embed_field(final, "Size") == "512x512"
        job = (await bot.store.recent_jobs(1))[0]
        assert job.result_path.endswith(".png")  # the full PNG stays on disk


async def test_missing_permissions_is_a_logged_failure_and_a_refund(fake, settings, engine, caplog):
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        await (await fake.slash("imagine", {"prompt": "nowhere to go"}, user_id=ALICE)).response()
        await eventually(engine.busy.is_set, what="GPU busy")
        unknown_webhook = {"code": 10015, "message": "Unknown Webhook"}
        fake.fail_next("*", r"/webhooks/", status=404, body=unknown_webhook, times=20)
        fake.fail_next(
            "POST",
            r"/channels/\d+/messages",
            status=403,
            body={"code": 50013, "message": "Missing Permissions"},
            times=5,
        )
        engine.gate.set()
        await bot.queue.wait_idle(30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.FAILED and "Missing Permissions" in job.error
        assert (await bot.store.quota_status(ALICE)).used == 0
        assert any("delivery failed" in r.getMessage() for r in caplog.records)
        q = await fake.slash("quota", {}, user_id=ALICE)  # still alive
        await q.response()


async def test_token_never_reaches_the_logs(fake, settings, engine, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_bot(fake, settings, engine) as bot:
        await (await fake.slash("imagine", {"prompt": "secret keeper"}, user_id=ALICE)).wait_original(has_image)
        await fake.drop_gateway()
        await (await fake.slash("quota", {}, user_id=ALICE)).response()
        jobs = await bot.store.recent_jobs(5)
    lines = [r.getMessage() for r in caplog.records] + [caplog.text]
    assert caplog.records and not [ln for ln in lines if fake.token in ln]  # logs were captured, none with the token
    assert all(fake.token not in repr(j) for j in jobs)
    db = Path(settings.storage.database)
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # the file, its WAL and SHM
    assert stored and fake.token.encode() not in stored


HOSTILE = [
    # (command, options or raw options, subcommands, expected reply)
    ("imagine", {"prompt": ""}, (), "prompt is empty"),
    ("imagine", {"prompt": "   \n\t  "}, (), "prompt is empty"),
    ("imagine", {"prompt": "\u200b\u200d\u2060\ufeff"}, (), "prompt is empty"),
    ("imagine", {"prompt": "\x00\x07\x1b"}, (), "prompt is empty"),
    ("imagine", {"prompt": "\u3164\u3164 \u2800 \u115f\uffa0"}, (), "prompt is empty"),  # blank-looking letters
    ("imagine", {"prompt": "\u0301\u0301\ufe0f\u034f"}, (), "prompt is empty"),  # marks with nothing to mark
    ("imagine", {"prompt": "\u180e\U000e0041\U000e007f"}, (), "prompt is empty"),  # format characters, tags
    ("imagine", {"prompt": "@everyone @here"}, (), "prompt is empty"),
    ("imagine", {"prompt": "<@&123456789> <@!42>"}, (), "prompt is empty"),
    ("imagine", {"prompt": "x" * 1001}, (), "prompt is too long: 1001 characters, the limit is 1000"),
    ("imagine", {"prompt": "a\u200b" * 1001}, (), "prompt is too long"),
    ("imagine", {"prompt": "a cat", "seed": -2}, (), "seed must be between 0 and 4294967295"),
    ("imagine", {"prompt": "a cat", "seed": 2**32}, (), "seed must be between 0 and 4294967295"),
    ("imagine", {"prompt": "a cat", "steps": 0}, (), "steps must be between 1 and 50"),
    ("imagine", {"prompt": "a cat", "steps": 51}, (), "steps must be between 1 and 50"),
    ("imagine", {"prompt": "a cat", "steps": -3}, (), "steps must be between 1 and 50"),
    ("imagine", {"prompt": "a cat", "size": "poster"}, (), "size must be one of: square, portrait, landscape"),
    (
        "imagine",
        [{"name": "prompt", "type": 3, "value": "a cat"}, {"name": "seed", "type": 4, "value": "abc"}],
        (),
        "seed must be a whole number",
    ),
    (
        "imagine",
        [{"name": "prompt", "type": 3, "value": "a cat"}, {"name": "steps", "type": 4, "value": "ten"}],
        (),
        "steps must be a whole number",
    ),
    (
        "imagine",
        [{"name": "prompt", "type": 3, "value": "a cat"}, {"name": "steps", "type": 4, "value": 2.5}],
        (),
        "steps must be a whole number",
    ),
    ("imagine", [{"name": "prompt", "type": 3, "value": 12345}], (), "prompt must be text"),
    ("imagine", {"prompt": "a lot of GORE here"}, (), "term this server does not allow"),
    ("imagine", {"prompt": "so much góre"}, (), "term this server does not allow"),
    ("imagine", {"prompt": "g\u200bore"}, (), "term this server does not allow"),
    ("admin", {"limit": 3}, ("quota", "frobnicate"), "Unknown command"),
    ("admin", {"user": BOB, "limit": -1}, ("quota", "set"), "limit must be a whole number between 0 and 100000"),
    ("nonexistent", {}, (), "Unknown command"),
    ("imagine", [], (), "options do not match this command"),  # the required prompt missing
    ("imagine", [{"name": "nonsense", "type": 3, "value": "x"}], (), "options do not match this command"),
    ("admin", [], (), "options do not match this command"),  # no subcommand at all
    ("admin", [{"name": "quota", "type": 2, "options": []}], (), "options do not match this command"),
]


@pytest.mark.parametrize(
    "command,options,subcommands,expected", HOSTILE, ids=[f"{i}-{row[0]}" for i, row in enumerate(HOSTILE)]
)
async def test_hostile_input_gets_a_clear_message_and_changes_nothing(
    fake, tmp_path, model_dir, engine, command, options, subcommands, expected
):
    settings = make_settings(tmp_path, model_dir, fake, moderation={"blocked_terms": ["gore"]})
    async with running_bot(fake, settings, engine) as bot:
        raw = options if isinstance(options, list) else None
        inter = await fake.slash(
            command,
            None if raw else options,
            raw_options=raw,
            user_id=ADMIN,
            subcommands=list(subcommands),
            resolved_users=[BOB] if isinstance(options, dict) and "user" in options else [],
        )
        await inter.response()
        texts = ephemeral_texts(fake, inter)
        assert texts and expected in texts[0], texts
        assert await bot.store.recent_jobs(5) == []
        assert bot.queue.waiting() == [] and bot.queue.running is None
        for user in (ADMIN, BOB):
            q = await bot.store.quota_status(user)
            assert q.used == 0 and not q.has_override
        assert not [m for m in fake.messages.values() if has_image(m)]


@pytest.mark.parametrize(
    "custom_id,clicker,on_own_message,expected",
    [
        ("fluxbot:reroll:999999", ALICE, True, "no longer know that image"),  # job unknown to this database
        ("fluxbot:delete:999999", ALICE, True, "no longer know that image"),
        ("fluxbot:reroll:999999", ALICE, False, "no longer active"),  # forged: not on the message
        ("fluxbot:delete:{job}", BOB, False, "Only"),  # someone else's image
        ("fluxbot:frobnicate:{job}", ALICE, True, "no longer active"),
        ("fluxbot:", ALICE, True, "no longer active"),
        ("fluxbot:reroll:" + "9" * 30, ALICE, True, "no longer know that image"),  # beyond SQLite's integers
        ("fluxbot:delete:" + "9" * 30, ALICE, True, "no longer know that image"),
        ("someone-else:42", ALICE, True, "no longer active"),  # not our prefix, yet on our message
        ("", ALICE, True, "no longer active"),
    ],
)
async def test_hostile_button_clicks_get_an_answer_and_change_nothing(
    fake, settings, engine, custom_id, clicker, on_own_message, expected
):
    async with running_bot(fake, settings, engine) as bot:
        final = await (await fake.slash("imagine", {"prompt": "a pear"}, user_id=ALICE)).wait_original(has_image)
        job = (await bot.store.recent_jobs(1))[0]
        custom_id = custom_id.format(job=job.id)
        target = final
        if on_own_message:  # a message (e.g. from an older database) that carries exactly this button
            target = fake.add_message(
                "old result",
                components=[{"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}],
            )
        before = (
            await bot.store.recent_jobs(10),
            await bot.store.quota_status(ALICE),
            await bot.store.quota_status(BOB),
        )
        click = await fake.click(int(target["id"]), custom_id, user_id=clicker)
        await click.response()
        texts = ephemeral_texts(fake, click)
        assert texts and expected in texts[0], texts
        after = (
            await bot.store.recent_jobs(10),
            await bot.store.quota_status(ALICE),
            await bot.store.quota_status(BOB),
        )
        assert after == before
        assert int(final["id"]) in fake.messages


async def test_a_failed_acknowledgement_edit_does_not_lose_the_job(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        fake.fail_next("PATCH", r"/messages/@original", status=400, times=1)
        inter = await fake.slash("imagine", {"prompt": "hiccup"}, user_id=ALICE)
        await inter.response()
        await eventually(lambda: bot.queue.running is not None or bot.queue.waiting(), what="queued job")
        assert not ephemeral_texts(fake, inter)  # no false "something went wrong"
        engine.gate.set()
        await bot.queue.wait_idle(30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE and len(images_for(fake, job.id)) == 1
    assert any(ev.status == 400 and ev.path.endswith("/messages/@original") for ev in fake.events)  # it was injected


# ---------------------------------------------------------------- faults mid-job end the job (#15 items 3, 4)


def told_failure(message: dict) -> bool:
    return "Could not paint this image" in (message.get("content") or "")


async def assert_ended_and_told(fake, bot, inter, text: str) -> None:
    final = await inter.wait_original(told_failure, timeout=START)
    assert text in final["content"] and "refunded" in final["content"], final["content"]
    job = (await bot.store.recent_jobs(1))[0]
    assert job.status is JobStatus.FAILED and job.charged_day is None
    assert (await bot.store.quota_status(ALICE)).used == 0
    await bot.queue.wait_idle(WAIT)
    assert bot.queue.waiting() == [] and bot.queue.running is None
    assert await bot.store.active_jobs() == []  # no ghost holding a place under max_per_user


async def test_a_results_folder_that_is_a_file_fails_refunds_and_tells(fake, tmp_path, model_dir, engine):
    blocker = tmp_path / "results-file"
    blocker.write_text("not a folder")
    settings = make_settings(tmp_path, model_dir, fake, storage={"results_dir": str(blocker / "results")})
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "nowhere to save"}, user_id=ALICE)
        await assert_ended_and_told(fake, bot, inter, "could not save the image")


async def test_a_failed_save_leaves_no_temporary_file(fake, settings, engine):
    results = Path(settings.storage.results_dir)
    (results / "job-1.png").mkdir(parents=True)  # the final name is taken by a folder: the rename fails
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", {"prompt": "rename fails"}, user_id=ALICE)
        await assert_ended_and_told(fake, bot, inter, "could not save the image")
    assert sorted(p.name for p in results.iterdir()) == ["job-1.png"]  # no job-1.png.tmp


async def test_a_ledger_locked_by_another_connection_mid_job_ends_the_job_once_it_answers(
    fake, settings, engine, caplog
):
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        inter = await fake.slash("imagine", {"prompt": "locked out"}, user_id=ALICE)
        await inter.response()
        await eventually(engine.busy.is_set, what="GPU busy")
        other = sqlite3.connect(settings.storage.database, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock while the image is finished
            engine.gate.set()
            await eventually(
                lambda: any("did not take its failure" in r.getMessage() for r in caplog.records),
                timeout=START,
                what="a ledger write refused by the lock",
            )
        finally:
            other.rollback()
            other.close()
        await assert_ended_and_told(fake, bot, inter, "database was busy")


async def test_an_upload_that_fails_is_refunded_and_the_member_told(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine, progress_interval=60) as bot:
        inter = await fake.slash(
            "imagine", {"prompt": "too big to post", "steps": 1}, user_id=ALICE
        )  # 1 step: no progress edit
        await inter.response()
        await eventually(engine.busy.is_set, what="GPU busy")
        fake.fail_next(
            "PATCH",
            r"/webhooks/\d+/[^/]+/messages/\d+",
            status=413,
            body={"code": 40005, "message": "Request entity too large"},
        )
        engine.gate.set()
        await assert_ended_and_told(fake, bot, inter, "could not be posted")


async def test_a_result_file_gone_at_restart_is_refunded_and_told(fake, settings, engine):
    """The ledger says generated (a restart between painting and posting), but the PNG is gone."""
    store = await Store.open(settings.storage.database, default_daily_limit=settings.quota.daily_limit)
    new = NewJob(
        prompt="vanished",
        seed=1,
        steps=2,
        width=256,
        height=256,
        user_id=ALICE,
        guild_id=fake.guild_id,
        channel_id=fake.channel_id,
    )
    admission = await store.admit(new, max_queue=10, max_per_user=10)
    assert admission.job is not None
    await store.mark_running(admission.job.id)
    await store.mark_generated(admission.job.id, str(Path(settings.storage.results_dir) / "gone.png"), 1.0)
    await store.close()
    async with running_bot(fake, settings, engine) as bot:
        await bot.queue.wait_idle(START)
        job = await bot.store.get_job(admission.job.id)
        assert job is not None and job.status is JobStatus.FAILED and job.charged_day is None
        assert (await bot.store.quota_status(ALICE)).used == 0
        await eventually(
            lambda: [m for m in fake.messages.values() if "gone from the bot's disk" in m["content"]],
            what="the member told in the channel",
        )
        told = next(m for m in fake.messages.values() if "gone from the bot's disk" in m["content"])
        assert told["content"].startswith(f"<@{ALICE}> ") and "refunded" in told["content"]


async def test_a_database_locked_by_another_process_still_gets_answers(fake, settings, engine):
    """Members get an answer inside Discord's 3 s whatever the database does (#15 item 5); admins'
    commands are acknowledged at once and say plainly that nothing changed."""
    async with running_bot(fake, settings, engine) as bot:
        first = await (await fake.slash("imagine", {"prompt": "before the lock"}, user_id=ALICE)).wait_original(
            has_image
        )
        await bot.queue.wait_idle(WAIT)
        async with write_lock_held(settings.storage.database):
            refused = await fake.slash("imagine", {"prompt": "while locked"}, user_id=ALICE)
            await refused.response()
            assert "database is busy" in ephemeral_texts(fake, refused)[0]
            assert "nothing was queued or charged" in ephemeral_texts(fake, refused)[0]
            quota = await fake.slash("quota", {}, user_id=ALICE)
            await quota.response()
            assert "used 1 of" in ephemeral_texts(fake, quota)[0]
            reroll = await fake.click(
                int(first["id"]), f"fluxbot:reroll:{(await bot.store.recent_jobs(1))[0].id}", user_id=BOB
            )
            await reroll.response()
            assert "database is busy" in ephemeral_texts(fake, reroll)[0]
            admin = await fake.slash(
                "admin", {"user": BOB, "limit": 9}, user_id=ADMIN, subcommands=["quota", "set"], resolved_users=[BOB]
            )
            await admin.response()  # acknowledged at once (deferred)...
            await eventually(lambda: ephemeral_texts(fake, admin), timeout=START, what="the admin's answer")
            assert "nothing was changed" in ephemeral_texts(fake, admin)[0]  # ...then told, once the wait ended
        assert len(await bot.store.recent_jobs(5)) == 1
        assert (await bot.store.quota_status(ALICE)).used == 1
        bob = await bot.store.quota_status(BOB)
        assert bob.used == 0 and not bob.has_override
        after = await fake.slash("imagine", {"prompt": "after the lock"}, user_id=ALICE)
        await after.wait_original(has_image)
        assert (await bot.store.quota_status(ALICE)).used == 2
