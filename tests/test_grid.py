"""A grid of four (#16 item 3) end to end: /imagine count through the real discord.py client against
the fake Discord, the real tiny engine and a real SQLite file; its U and V buttons; the count from
/settings; and every refusal, which charges nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.engine.api import GenerationOOM
from bot.images import grid_part_path
from bot.params import image_seed
from bot.store import JobStatus, NewJob, Store

from botkit import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    embed_field,
    ephemeral_texts,
    has_image,
    make_settings,
    picture,
    running_bot,
)
from ceilings import WAIT

SIDE = 256  # the tiny settings' square size


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake)


def buttons(message: dict) -> list[list[tuple[str, str]]]:
    return [[(b["label"], b["custom_id"]) for b in row["components"]] for row in message.get("components", [])]


async def grid(fake, bot, user=ALICE, **options):
    """An /imagine that paints a grid: (its message, its ledger row)."""
    reply = await fake.slash("imagine", {"prompt": "four lighthouses", **options}, user_id=user)
    final = await reply.wait_original(has_image)
    await bot.queue.wait_idle(WAIT)
    job = (await bot.store.recent_jobs(1))[0]
    assert job.status is JobStatus.DONE and job.result_message_id == int(final["id"])
    return final, job


async def snapshot(bot):
    return (await bot.store.recent_jobs(50), [await bot.store.quota_status(u) for u in (ALICE, BOB, CAROL, ADMIN)])


async def refused(fake, interaction, text: str) -> None:
    await interaction.response()
    texts = ephemeral_texts(fake, interaction)
    assert texts and text in texts[0], texts
    assert "charged" in texts[0].lower() or "no longer active" in texts[0], texts


async def test_count_four_is_one_grid_twice_the_size_with_u_and_v_buttons(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, job = await grid(fake, bot, count=4, seed=40)
        assert (job.count, job.units, job.seed) == (4, 4, 40)
        assert (await bot.store.quota_status(ALICE)).used == 4  # four units at admission
        image = picture(fake, final)
        assert image.size == (2 * SIDE, 2 * SIDE)
        assert buttons(final) == [
            [(f"U{i}", f"fluxbot:grid-u{i}:{job.id}") for i in range(1, 5)],
            [(f"V{i}", f"fluxbot:grid-v{i}:{job.id}") for i in range(1, 5)],
        ]
        assert embed_field(final, "Seeds") == "40, 41, 42, 43"
        # each quarter is the image kept on disk for its buttons, each with its own seed
        quarters = []
        for index in range(1, 5):
            part = Image.open(grid_part_path(job.result_path, index)).convert("RGB")
            assert part.size == (SIDE, SIDE) and part.info["seed"] == str(39 + index)
            column, row = (index - 1) % 2, (index - 1) // 2
            box = (column * SIDE, row * SIDE, (column + 1) * SIDE, (row + 1) * SIDE)
            assert np.array_equal(np.asarray(image.crop(box)), np.asarray(part))
            quarters.append(np.asarray(part).astype(int))
        assert all(np.abs(quarters[0] - q).mean() > 1 for q in quarters[1:])  # four different images


async def test_count_two_and_three_are_one_row(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        for count in (2, 3):
            final, job = await grid(fake, bot, count=count)
            assert picture(fake, final).size == (count * SIDE, SIDE)
            assert [len(row) for row in buttons(final)] == [count, count]
        assert (await bot.store.quota_status(ALICE)).used == 5


async def test_count_one_is_a_plain_result(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, job = await grid(fake, bot, count=1)
        assert (job.count, job.units) == (1, 1)
        assert picture(fake, final).size == (SIDE, SIDE)
        assert buttons(final)[0][0][0] == "Re-roll"


async def test_u_click_posts_that_image_alone_with_the_result_buttons(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await grid(fake, bot, count=4, seed=7)
        used = (await bot.store.quota_status(BOB)).used
        click = await fake.click(int(final["id"]), f"fluxbot:grid-u3:{source.id}", user_id=BOB)
        alone = await click.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE and job.result_message_id == int(alone["id"])
        assert (job.origin, job.source_job_id, job.seed, job.count, job.user_id) == ("pick", source.id, 9, 1, BOB)
        assert job.result_path == str(grid_part_path(source.result_path, 3))
        assert (await bot.store.quota_status(BOB)).used == used  # nothing painted, nothing charged
        image = picture(fake, alone)
        assert image.size == (SIDE, SIDE)  # full size
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(job.result_path).convert("RGB")))
        labels = [[label for label, _ in row] for row in buttons(alone)]
        assert labels == [["Re-roll", "Vary (Subtle)", "Vary (Strong)", "Upscale"], ["Remix", "Delete"]]
        assert alone["embeds"][0]["title"] == f"Image of the grid #{source.id}"
        # its own buttons work: Vary (Subtle) of the picked image
        vary = await fake.click(int(alone["id"]), f"fluxbot:vary-subtle:{job.id}", user_id=BOB)
        await vary.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        varied = (await bot.store.recent_jobs(1))[0]
        assert varied.status is JobStatus.DONE and varied.source_path == job.result_path
        assert (await bot.store.quota_status(BOB)).used == used + 1


async def test_v_click_paints_a_subtle_vary_of_that_image(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await grid(fake, bot, count=4)
        click = await fake.click(int(final["id"]), f"fluxbot:grid-v2:{source.id}", user_id=BOB)
        result = await click.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE and job.result_message_id == int(result["id"])
        assert (job.origin, job.source_job_id, job.strength, job.count, job.units) == (
            "vary_subtle",
            source.id,
            0.48,
            1,
            1,
        )
        part = grid_part_path(source.result_path, 2)
        assert job.source_path == str(part)
        assert (await bot.store.quota_status(BOB)).used == 1
        before = np.asarray(Image.open(part).convert("RGB")).astype(int)
        after = np.asarray(picture(fake, result)).astype(int)
        assert after.shape == before.shape == (SIDE, SIDE, 3) and np.abs(after - before).mean() > 1
        assert result["embeds"][0]["title"] == f"Vary (Subtle) of #{source.id}"


async def test_count_comes_from_settings_and_an_option_wins(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        await (await fake.slash("settings", {"count": 2}, user_id=ALICE)).response()
        await _settled(fake, bot, ALICE, 2)
        final, job = await grid(fake, bot)
        assert (job.count, job.units) == (2, 2) and picture(fake, final).size == (2 * SIDE, SIDE)
        final, job = await grid(fake, bot, count=1)
        assert job.count == 1 and picture(fake, final).size == (SIDE, SIDE)
        assert (await bot.store.quota_status(ALICE)).used == 3


async def _settled(fake, bot, user: int, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while (await bot.store.member_settings(user)).count != count:
        assert time.monotonic() < deadline, "the /settings change never landed"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("count", "why"),
    [
        (0, "between 1 and 4"),
        (5, "between 1 and 4"),
        (-1, "between 1 and 4"),
        ("4", "a whole number"),
        (2.5, "a whole number"),
    ],
)
async def test_a_raw_count_out_of_range_is_refused_and_charges_nothing(fake, settings, engine, count, why):
    async with running_bot(fake, settings, engine) as bot:
        before = await snapshot(bot)
        reply = await fake.slash("imagine", {"prompt": "too many", "count": count}, user_id=ALICE)
        await reply.response()
        texts = ephemeral_texts(fake, reply)
        assert len(texts) == 1 and f"count must be {why}" in texts[0] and "\n" not in texts[0], texts
        assert await snapshot(bot) == before


async def test_a_grid_the_quota_cannot_pay_for_is_refused(tmp_path, model_dir, fake, engine):
    settings = make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 3})
    async with running_bot(fake, settings, engine) as bot:
        before = await snapshot(bot)
        reply = await fake.slash("imagine", {"prompt": "four", "count": 4}, user_id=ALICE)
        await reply.response()
        assert ephemeral_texts(fake, reply), "no refusal"
        assert await snapshot(bot) == before


async def test_u5_on_a_four_grid_and_a_u_on_a_plain_result_are_refused(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await grid(fake, bot, count=4)
        single, plain = await grid(fake, bot, count=1)
        before = await snapshot(bot)
        for message, custom_id, text in (
            (final, f"fluxbot:grid-u5:{source.id}", "no image 5"),
            (final, f"fluxbot:grid-v5:{source.id}", "no image 5"),
            (final, f"fluxbot:grid-u0:{source.id}", "no image 0"),
            (single, f"fluxbot:grid-u1:{plain.id}", "not a grid"),
            (single, f"fluxbot:grid-v1:{plain.id}", "not a grid"),
        ):
            crafted = dict(message)  # a client that sends a button the bot never put there
            row = {"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}
            crafted["components"] = [*message.get("components", []), row]
            click = await fake.interact(
                3, {"custom_id": custom_id, "component_type": 2}, user_id=BOB, extra={"message": crafted}
            )
            await refused(fake, click, text)
        assert await snapshot(bot) == before


async def test_a_grid_button_on_another_message_or_with_its_file_gone_is_refused(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final, source = await grid(fake, bot, count=4)
        before = await snapshot(bot)
        for custom_id in (f"fluxbot:grid-u1:{source.id}", f"fluxbot:grid-v1:{source.id}"):
            forged = fake.add_message(
                "not the grid",
                components=[{"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}],
            )
            click = await fake.click(int(forged["id"]), custom_id, user_id=BOB)
            await refused(fake, click, "not on that image's own message")
        Path(grid_part_path(source.result_path, 2)).unlink()
        for custom_id in (f"fluxbot:grid-u2:{source.id}", f"fluxbot:grid-v2:{source.id}"):
            click = await fake.click(int(final["id"]), custom_id, user_id=BOB)
            await refused(fake, click, "no longer on the bot's disk")
        assert await snapshot(bot) == before


async def test_a_grid_is_one_batch_in_one_job(fake, settings, engine):
    """One engine call paints the three images (one batch, test_batch.py), each from its own seed."""
    async with running_bot(fake, settings, engine) as bot:
        engine.calls.clear()
        _, job = await grid(fake, bot, count=3)
        assert engine.calls == ["four lighthouses"]
        assert len(await bot.store.recent_jobs(50)) == 1
        parts = [Image.open(grid_part_path(job.result_path, i)) for i in (1, 2, 3)]
        assert [p.text["seed"] for p in parts] == [str(image_seed(job.seed, i)) for i in range(3)]
        assert len({p.convert("RGB").tobytes() for p in parts}) == 3


async def test_a_grid_that_fails_refunds_every_unit(fake, settings, engine):
    engine.fail_on["doomed"] = GenerationOOM("out of memory (test)")
    async with running_bot(fake, settings, engine) as bot:
        reply = await fake.slash("imagine", {"prompt": "doomed grid", "count": 4}, user_id=ALICE)
        await reply.wait_original(lambda m: "refunded" in (m.get("content") or ""))
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert (job.status, job.units) == (JobStatus.FAILED, 4)
        assert (await bot.store.quota_status(ALICE)).used == 0


async def test_a_grid_the_engine_paints_short_is_failed_refunded_and_told(fake, settings, engine):
    """The engine's contract is `count` images; fewer (a broken engine) ends the job, never half a grid."""
    real = engine.generate

    def short(request, **kwargs):
        result = real(request, **kwargs)
        return dataclasses.replace(result, images=result.images[:1])

    engine.generate = short
    async with running_bot(fake, settings, engine) as bot:
        reply = await fake.slash("imagine", {"prompt": "short grid", "count": 2}, user_id=ALICE)
        final = await reply.wait_original(lambda m: "refunded" in (m.get("content") or ""))
        assert "1 of 2 images" in final["content"]
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.FAILED and (await bot.store.quota_status(ALICE)).used == 0


async def test_the_ledger_keeps_the_count_and_a_pick_is_charged_nothing(tmp_path):
    async with await Store.open(tmp_path / "db.sqlite", default_daily_limit=5) as store:
        new = NewJob("a", 1, count=4, units=4, user_id=ALICE, guild_id=None, channel_id=None)
        admission = await store.admit(new, max_queue=10, max_per_user=3)
        assert admission.job is not None and (admission.job.count, admission.job.units) == (4, 4)
        assert (await store.quota_status(ALICE)).used == 4
        pick = NewJob("a", 2, user_id=BOB, guild_id=None, channel_id=None, origin="pick", source_job_id=1)
        job = await store.record_pick(pick, str(tmp_path / "job-1-2.png"))
        assert (job.status, job.charged_day, job.relax, job.result_path) == (
            JobStatus.GENERATED,
            None,
            False,
            str(tmp_path / "job-1-2.png"),
        )
        assert (await store.quota_status(BOB)).used == 0
        failed = await store.mark_failed(job.id, "test", refund=True)
        assert failed.status is JobStatus.FAILED and (await store.quota_status(BOB)).used == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE jobs SET count = 5 WHERE id = 1")


def test_a_grids_seeds_follow_on_and_wrap_within_32_bits():
    assert [image_seed(7, i) for i in range(4)] == [7, 8, 9, 10]
    assert [image_seed(2**32 - 2, i) for i in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
