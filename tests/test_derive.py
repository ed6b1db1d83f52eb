"""The result buttons that paint from a result (#16 item 2) end to end: Vary (Subtle), Vary (Strong),
Upscale and Remix through the real discord.py client against the fake Discord, the real tiny engine
and a real SQLite file; after a restart; and every refusal, which charges nothing."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest

from bot.discord import views
from bot.engine import pipeline
from bot.store import JobStatus

from botkit import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    embed_field,
    ephemeral_texts,
    eventually,
    has_image,
    make_settings,
    picture,
    running_bot,
)
from ceilings import WAIT

LABELS = [["Re-roll", "Vary (Subtle)", "Vary (Strong)", "Upscale"], ["Remix", "Delete"]]


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake)


def title(message: dict) -> str | None:
    return next((e.get("title") for e in message.get("embeds", [])), None)


def button_rows(message: dict) -> list[list[dict]]:
    return [row["components"] for row in message.get("components", [])]


async def painted(fake, bot, user=ALICE, prompt="a lighthouse at dusk", **options):
    """An /imagine by `user`, delivered and recorded: (its result message, its ledger row)."""
    final = await (await fake.slash("imagine", {"prompt": prompt, **options}, user_id=user)).wait_original(has_image)
    await bot.queue.wait_idle(WAIT)
    job = (await bot.store.recent_jobs(1))[0]
    assert job.status is JobStatus.DONE and job.result_message_id == int(final["id"])
    return final, job


async def derived(fake, bot, message: dict, custom_id: str, user: int):
    """Click `custom_id` on `message`: (the derived result's message, its ledger row)."""
    click = await fake.click(int(message["id"]), custom_id, user_id=user)
    result = await click.wait_original(has_image)
    await bot.queue.wait_idle(WAIT)
    return result, (await bot.store.recent_jobs(1))[0]


async def snapshot(bot):
    """What a refusal must leave as it was: every job row and every member's quota."""
    return (
        await bot.store.recent_jobs(50),
        [await bot.store.quota_status(u) for u in (ALICE, BOB, CAROL, ADMIN)],
    )


async def refused(fake, interaction, text: str) -> None:
    await interaction.response()
    texts = ephemeral_texts(fake, interaction)
    assert texts and text in texts[0], texts
    assert "Nothing was charged" in texts[0] or "nothing was" in texts[0].lower() or "no longer" in texts[0], texts


def replies(fake, interaction) -> list[str]:
    """The text of every edit of the interaction's reply, in order."""
    path = f"/webhooks/{fake.application_id}/{interaction.token}/messages/@original"
    return [(ev.json or {}).get("content") or "" for ev in fake.events if ev.method == "PATCH" and ev.path == path]


async def until(read, check, what: str = "the ledger") -> None:
    """Poll an async read until `check` holds for what it returns."""
    deadline = time.monotonic() + WAIT
    while not check(await read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def form_inputs(modal: dict) -> dict[str, dict]:
    return {c["custom_id"]: c for row in modal["components"] for c in row["components"]}


# ---------------------------------------------------------------- what a result carries


async def test_every_result_carries_the_six_buttons(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, job = await painted(fake, bot)
        rows = button_rows(final)
        assert [[b["label"] for b in row] for row in rows] == LABELS
        ids = [b["custom_id"] for row in rows for b in row]
        assert ids == [
            f"fluxbot:{name}:{job.id}"
            for name in ("reroll", "vary-subtle", "vary-strong", "upscale", "remix", "delete")
        ]
        assert title(final) is None  # an /imagine came from nothing


# ---------------------------------------------------------------- Vary


async def test_vary_paints_from_the_result_at_its_size_charged_to_the_clicker(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot, seed=7)
        subtle, job = await derived(fake, bot, final, f"fluxbot:vary-subtle:{source.id}", BOB)  # anyone may vary
        assert title(subtle) == f"Vary (Subtle) of #{source.id}"
        assert (job.origin, job.user_id, job.source_job_id, job.strength) == ("vary_subtle", BOB, source.id, 0.48)
        assert job.source_path == source.result_path and job.prompt == source.prompt and job.seed != source.seed
        assert (job.width, job.height, job.steps, job.units) == (source.width, source.height, source.steps, 1)
        assert embed_field(subtle, "Strength") == "0.48" and embed_field(subtle, "Requested by") == f"<@{BOB}>"
        before, after = np.asarray(picture(fake, final)).astype(int), np.asarray(picture(fake, subtle)).astype(int)
        assert after.shape == before.shape == (256, 256, 3)  # the source's size
        assert np.abs(after - before).mean() > 1  # and another image
        assert (await bot.store.quota_status(BOB)).used == 1 and (await bot.store.quota_status(ALICE)).used == 1
        # its own buttons, for its own job: vary the variation, strongly this time
        assert [b["custom_id"] for b in button_rows(subtle)[0]][1] == f"fluxbot:vary-subtle:{job.id}"
        strong, again = await derived(fake, bot, subtle, f"fluxbot:vary-strong:{job.id}", ALICE)
        assert title(strong) == f"Vary (Strong) of #{job.id}"
        assert (again.origin, again.strength, again.source_path) == ("vary_strong", 0.75, job.result_path)
        assert (await bot.store.quota_status(ALICE)).used == 2
        # a Re-roll of a variation varies the same source again, with another seed
        reroll, third = await derived(fake, bot, strong, f"fluxbot:reroll:{again.id}", CAROL)
        assert title(reroll) == f"Re-roll of #{again.id}"
        assert (third.origin, third.strength, third.source_path) == ("reroll", 0.75, job.result_path)
        assert third.seed != again.seed


async def test_vary_strengths_come_from_the_config(fake, tmp_path, model_dir, engine):
    settings = make_settings(
        tmp_path, model_dir, fake, generation={"vary_subtle_strength": 0.2, "vary_strong_strength": 0.9}
    )
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        _, subtle = await derived(fake, bot, final, f"fluxbot:vary-subtle:{source.id}", ALICE)
        _, strong = await derived(fake, bot, final, f"fluxbot:vary-strong:{source.id}", ALICE)
        assert (subtle.strength, strong.strength) == (0.2, 0.9)


# ---------------------------------------------------------------- Upscale


async def test_upscale_doubles_both_sides_and_charges_two(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot, size="portrait")  # 208x304
        click = await fake.click(int(final["id"]), f"fluxbot:upscale:{source.id}", user_id=BOB)
        result = await click.wait_original(has_image)
        first_reply = next(t for t in replies(fake, click) if t)  # the acknowledgement, before the queue's edits
        assert first_reply.startswith(f"**Upscale of #{source.id}**: 2× (208x304 → 416x608).")
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert picture(fake, result).size == (2 * source.width, 2 * source.height) == (416, 608)
        assert (job.width, job.height, job.units, job.strength, job.origin) == (416, 608, 2, 0.3, "upscale")
        assert job.steps == math.ceil(source.steps * 0.3) and job.seed == source.seed
        assert title(result) == f"Upscale of #{source.id}"
        assert embed_field(result, "Upscaled") == "2× (208x304 → 416x608)"
        assert embed_field(result, "Size") == "416x608"
        assert (await bot.store.quota_status(BOB)).used == 2
        assert [[b["label"] for b in row] for row in button_rows(result)] == LABELS


async def test_upscale_is_delivered_under_the_upload_limit(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        fake.attachment_size_limit = 150_000  # the 512x512 PNG of noise is ~0.8 MB
        result, job = await derived(fake, bot, final, f"fluxbot:upscale:{source.id}", ALICE)
        attachment = next(a for a in result["attachments"] if a["filename"].startswith("fluxbot-"))
        assert attachment["size"] <= 150_000 and not attachment["filename"].endswith(".png")
        assert picture(fake, result).size == (512, 512)
        assert Path(job.result_path).stat().st_size > 150_000  # the PNG on disk stays whole


async def test_upscale_says_so_where_only_one_and_a_half_fits(fake, settings, engine, monkeypatch):
    monkeypatch.setattr(pipeline, "UPSCALE_FACTORS", (1.5,))  # as a budget too small for 2x decides
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        result, job = await derived(fake, bot, final, f"fluxbot:upscale:{source.id}", ALICE)
        assert picture(fake, result).size == (384, 384) and (job.width, job.height) == (384, 384)
        assert embed_field(result, "Upscaled") == ("1.5× (256x256 → 384x384): 2× does not fit this GPU's memory budget")


async def test_an_upscale_of_what_is_already_as_large_as_allowed_is_refused(fake, settings, engine, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_UPSCALED_PIXELS", 256 * 256)
    monkeypatch.setattr(views, "MAX_UPSCALED_PIXELS", 256 * 256)
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        before = await snapshot(bot)
        click = await fake.click(int(final["id"]), f"fluxbot:upscale:{source.id}", user_id=ALICE)
        await refused(fake, click, "upscales to at most")
        assert await snapshot(bot) == before


async def test_an_upscale_the_quota_cannot_cover_is_refused(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 2})
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        before = await snapshot(bot)
        click = await fake.click(int(final["id"]), f"fluxbot:upscale:{source.id}", user_id=ALICE)
        await click.response()
        texts = ephemeral_texts(fake, click)
        assert texts and "takes 2 images of your daily quota and you have 1 left" in texts[0], texts
        assert await snapshot(bot) == before


# ---------------------------------------------------------------- Remix


async def test_remix_opens_a_prefilled_form_and_paints_the_edited_prompt(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot, prompt="a red fox in snow", seed=4242)
        before = await snapshot(bot)
        click = await fake.click(int(final["id"]), f"fluxbot:remix:{source.id}", user_id=BOB)
        modal = (await click.response()).json
        assert modal["type"] == 9 and modal["data"]["custom_id"] == f"fluxbot:remix-form:{source.id}"
        inputs = form_inputs(modal["data"])
        assert inputs["prompt"]["value"] == "a red fox in snow" and inputs["prompt"]["style"] == 2
        assert inputs["seed"]["value"] == "4242"
        assert await snapshot(bot) == before  # opening the form charges nothing
        submit = await fake.submit_modal(
            modal["data"]["custom_id"],
            {"prompt": "a blue fox in snow", "seed": "4242"},
            user_id=BOB,
            message_id=int(final["id"]),
        )
        result = await submit.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert (job.prompt, job.seed, job.origin, job.source_job_id) == ("a blue fox in snow", 4242, "remix", source.id)
        assert job.source_path is None and job.strength == 1.0 and (job.width, job.height) == (256, 256)
        assert title(result) == f"Remix of #{source.id}" and result["embeds"][0]["description"] == "a blue fox in snow"
        assert embed_field(result, "Seed") == "4242" and embed_field(result, "Requested by") == f"<@{BOB}>"
        assert engine.calls[-1] == "a blue fox in snow"
        assert (await bot.store.quota_status(BOB)).used == 1
        # an empty seed draws a random one
        submit = await fake.submit_modal(
            modal["data"]["custom_id"],
            {"prompt": "a green fox", "seed": ""},
            user_id=ALICE,
            message_id=int(final["id"]),
        )
        await submit.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.recent_jobs(1))[0].prompt == "a green fox"


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"prompt": "   ", "seed": "1"}, "prompt is empty"),
        ({"prompt": "a fox", "seed": "abc"}, "seed must be a whole number"),
        ({"prompt": "a fox", "seed": str(2**32)}, "seed must be between"),
        ({"prompt": "x" * 1001, "seed": "1"}, "prompt is too long"),
        ({"seed": "1"}, "prompt must be text"),
    ],
)
async def test_a_bad_remix_form_is_refused_and_charges_nothing(fake, settings, engine, values, expected):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        before = await snapshot(bot)
        submit = await fake.submit_modal(
            f"fluxbot:remix-form:{source.id}", values, user_id=BOB, message_id=int(final["id"])
        )
        await refused(fake, submit, expected)
        assert await snapshot(bot) == before


# ---------------------------------------------------------------- after a restart


async def test_each_button_works_on_an_old_message_after_a_restart(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot, prompt="persistent pear")
        form = (await (await fake.click(int(final["id"]), f"fluxbot:remix:{source.id}", user_id=CAROL)).response()).json
    async with running_bot(fake, settings, engine) as bot:  # a new process: nothing in memory
        subtle, job = await derived(fake, bot, final, f"fluxbot:vary-subtle:{source.id}", BOB)
        assert title(subtle) == f"Vary (Subtle) of #{source.id}" and job.strength == 0.48
        strong, job = await derived(fake, bot, final, f"fluxbot:vary-strong:{source.id}", BOB)
        assert title(strong) == f"Vary (Strong) of #{source.id}" and job.strength == 0.75
        upscaled, job = await derived(fake, bot, final, f"fluxbot:upscale:{source.id}", ALICE)
        assert picture(fake, upscaled).size == (512, 512)
        # a form opened before the restart is taken after it
        submit = await fake.submit_modal(
            form["data"]["custom_id"],
            {"prompt": "persistent plum", "seed": ""},
            user_id=CAROL,
            message_id=int(final["id"]),
        )
        remixed = await submit.wait_original(has_image)
        assert title(remixed) == f"Remix of #{source.id}"
        # and one opened after it
        modal = (
            await (await fake.click(int(final["id"]), f"fluxbot:remix:{source.id}", user_id=CAROL)).response()
        ).json
        assert form_inputs(modal["data"])["prompt"]["value"] == "persistent pear"
        await bot.queue.wait_idle(WAIT)
        assert (await bot.store.quota_status(BOB)).used == 2 and (await bot.store.quota_status(ALICE)).used == 1 + 2
        assert (await bot.store.quota_status(CAROL)).used == 1


async def test_a_derived_job_interrupted_by_a_restart_runs_again_from_its_source(fake, settings, engine):
    """The source image's path is in the derived job's own row: the next start paints it as it was
    asked (size, strength), charged once."""
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        engine.gate.clear()  # the upscale starts and waits at the gate; the bot stops under it
        click = await fake.click(int(final["id"]), f"fluxbot:upscale:{source.id}", user_id=BOB)
        await click.response()
        await eventually(engine.busy.is_set, what="the upscale at the engine")
        await eventually(lambda: bot.queue.running.progress_message_id is not None, what="its reply recorded")
    job = (await _store_jobs(settings))[0]
    assert job.status is JobStatus.RUNNING and job.origin == "upscale"
    engine.gate.set()
    async with running_bot(fake, settings, engine) as bot:
        result = await click.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        again = await bot.store.get_job(job.id)
        assert again.status is JobStatus.DONE and (again.width, again.height, again.strength) == (512, 512, 0.3)
        assert again.source_path == source.result_path and again.attempts == 2
        assert picture(fake, result).size == (512, 512)
        assert (await bot.store.quota_status(BOB)).used == 2  # charged once, at admission


async def _store_jobs(settings):
    from bot.store import Store

    async with await Store.open(settings.storage.database, default_daily_limit=5) as store:
        return await store.recent_jobs(5)


# ---------------------------------------------------------------- refusals: nothing charged


async def test_a_button_copied_onto_another_message_is_refused(fake, settings, engine):
    """A crafted custom id naming another member's result, on a message that is not that result."""
    async with running_bot(fake, settings, engine) as bot:
        await painted(fake, bot, user=ALICE)
        _, bobs = await painted(fake, bot, user=BOB, prompt="bob's secret garden")
        before = await snapshot(bot)
        for custom_id in (
            f"fluxbot:vary-subtle:{bobs.id}",
            f"fluxbot:vary-strong:{bobs.id}",
            f"fluxbot:upscale:{bobs.id}",
            f"fluxbot:remix:{bobs.id}",
            f"fluxbot:reroll:{bobs.id}",
            f"fluxbot:delete:{bobs.id}",
        ):
            forged = fake.add_message(
                "not bob's result",
                components=[{"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}],
            )
            click = await fake.click(int(forged["id"]), custom_id, user_id=ALICE if "delete" not in custom_id else BOB)
            await refused(fake, click, "not on that image's own message")
        forged_form = await fake.submit_modal(
            f"fluxbot:remix-form:{bobs.id}",
            {"prompt": "mine now", "seed": ""},
            user_id=ALICE,
            message_id=int(forged["id"]),
        )
        await refused(fake, forged_form, "not on that image's own message")
        assert await snapshot(bot) == before


async def test_a_deleted_result_cannot_be_varied_upscaled_or_remixed(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        stale = dict(final)  # what a client that has not seen the deletion still shows
        await fake.click(int(final["id"]), f"fluxbot:delete:{source.id}", user_id=ALICE)
        await eventually(lambda: int(final["id"]) not in fake.messages, what="the deletion")
        await until(lambda: bot.store.get_job(source.id), lambda job: job.result_deleted_at is not None)
        before = await snapshot(bot)
        for name in ("vary-subtle", "vary-strong", "upscale", "remix", "reroll"):
            data = {"custom_id": f"fluxbot:{name}:{source.id}", "component_type": 2}
            click = await fake.interact(3, data, user_id=BOB, extra={"message": stale})
            await refused(fake, click, "it was deleted")
        submit = await fake.submit_modal(
            f"fluxbot:remix-form:{source.id}", {"prompt": "again", "seed": ""}, user_id=BOB, message_id=int(final["id"])
        )
        await refused(fake, submit, "it was deleted")
        assert await snapshot(bot) == before


async def test_a_result_whose_file_is_gone_cannot_be_varied_or_upscaled(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        Path(source.result_path).unlink()
        before = await snapshot(bot)
        for name in ("vary-subtle", "vary-strong", "upscale"):
            click = await fake.click(int(final["id"]), f"fluxbot:{name}:{source.id}", user_id=BOB)
            await refused(fake, click, "no longer on the bot's disk")
        assert await snapshot(bot) == before
        # Remix paints from the prompt alone: it still works
        remix = await fake.click(int(final["id"]), f"fluxbot:remix:{source.id}", user_id=BOB)
        assert (await remix.response()).json["type"] == 9


async def test_a_source_gone_before_its_turn_fails_the_job_and_refunds_it(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await painted(fake, bot)
        engine.gate.clear()  # another image holds the GPU while the Vary waits its turn
        await fake.slash("imagine", {"prompt": "in the way"}, user_id=CAROL)
        await eventually(lambda: bot.queue.running is not None, what="the blocking job")
        click = await fake.click(int(final["id"]), f"fluxbot:vary-subtle:{source.id}", user_id=BOB)
        await click.response()
        await eventually(lambda: len(bot.queue.waiting()) == 1, what="the Vary queued")
        assert (await bot.store.quota_status(BOB)).used == 1
        Path(source.result_path).unlink()
        engine.gate.set()
        told = await click.wait_original(lambda m: "Could not paint" in (m.get("content") or ""))
        assert "gone from the bot's disk" in told["content"] and "refunded" in told["content"]
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(2))[0]
        assert job.origin == "vary_subtle" and job.status is JobStatus.FAILED and job.charged_day is None
        assert (await bot.store.quota_status(BOB)).used == 0


@pytest.mark.parametrize(
    "custom_id,expected",
    [
        ("fluxbot:vary-subtle:999999", "no longer know that image"),  # a job this database never had
        ("fluxbot:upscale:999999", "no longer know that image"),
        ("fluxbot:remix:999999", "no longer know that image"),
        ("fluxbot:vary-strong:" + "9" * 30, "no longer know that image"),  # beyond SQLite's integers
        ("fluxbot:vary-medium:{job}", "no longer active"),
        ("fluxbot:vary-subtle:abc", "no longer active"),
        ("fluxbot:upscale:", "no longer active"),
        ("fluxbot:upscale:{job}:2", "no longer active"),
        ("fluxbot:remix-form:{job}", "no longer active"),  # a form's id on a button
    ],
)
async def test_garbage_button_ids_get_an_answer_and_change_nothing(fake, settings, engine, custom_id, expected):
    async with running_bot(fake, settings, engine) as bot:
        _, job = await painted(fake, bot)
        custom_id = custom_id.format(job=job.id)
        message = fake.add_message(
            "old result",
            components=[{"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}],
        )
        before = await snapshot(bot)
        click = await fake.click(int(message["id"]), custom_id, user_id=ALICE)
        await click.response()
        texts = ephemeral_texts(fake, click)
        assert texts and expected in texts[0], texts
        assert await snapshot(bot) == before


@pytest.mark.parametrize(
    "custom_id,expected",
    [
        ("fluxbot:remix-form:999999", "no longer know that image"),
        ("fluxbot:remix-form:abc", "no longer active"),
        ("fluxbot:something-else", "no longer active"),
        ("", "no longer active"),
    ],
)
async def test_garbage_forms_get_an_answer_and_change_nothing(fake, settings, engine, custom_id, expected):
    async with running_bot(fake, settings, engine) as bot:
        final, _ = await painted(fake, bot)
        before = await snapshot(bot)
        submit = await fake.submit_modal(custom_id, {"prompt": "x"}, user_id=ALICE, message_id=int(final["id"]))
        await submit.response()
        texts = ephemeral_texts(fake, submit)
        assert texts and expected in texts[0], texts
        assert await snapshot(bot) == before
