"""/settings end to end: a member's defaults for /imagine (size, steps, count, previews) shown,
changed, kept in the ledger across a restart and used by the next /imagine that omits them; bad
values refused in one line with nothing changed. The real discord.py client against the fake
Discord, the tiny engine, a real SQLite file."""

from __future__ import annotations

import pytest

from bot.params import MemberSettings
from bot.store import Store

from botkit import ALICE, BOB, embed_field, ephemeral_texts, has_image, make_settings, running_bot
from ceilings import WAIT


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake)


async def settings_reply(fake, user=ALICE, options=None, raw_options=None) -> str:
    cmd = await fake.slash("settings", options or {}, user_id=user, raw_options=raw_options)
    await cmd.response()
    texts = ephemeral_texts(fake, cmd)
    assert len(texts) == 1, texts
    return texts[0]


async def paint(fake, user=ALICE, **options) -> dict:
    inter = await fake.slash("imagine", {"prompt": "a pear on a table", **options}, user_id=user)
    return await inter.wait_original(has_image)


async def test_settings_is_synced_with_its_options(fake, settings, engine):
    async with running_bot(fake, settings, engine):
        opts = {o["name"]: o for o in fake.synced_commands["settings"]["options"]}
        assert set(opts) == {"size", "steps", "count", "previews", "reset"}
        assert not any(o.get("required") for o in opts.values())
        assert (opts["steps"]["min_value"], opts["steps"]["max_value"]) == (1, 50)
        assert (opts["count"]["min_value"], opts["count"]["max_value"]) == (1, 4)
        assert {c["value"] for c in opts["size"]["choices"]} == {"square", "portrait", "landscape"}
        assert opts["previews"]["type"] == opts["reset"]["type"] == 5  # booleans
        assert all(o["description"] for o in opts.values())


async def test_settings_shows_changes_and_applies_the_defaults_to_the_next_imagine(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        shown = await settings_reply(fake)
        assert "Size: Square 256x256, the bot's default" in shown
        assert "Steps: 3, the bot's default" in shown and "Live previews: on, the bot's default" in shown
        assert "Count: 1, the bot's default" in shown
        assert await bot.store.member_settings(ALICE) == MemberSettings()  # showing writes nothing

        changed = await settings_reply(fake, options={"size": "portrait", "steps": 2, "count": 4, "previews": False})
        assert changed.startswith("Saved.")
        assert "Size: Portrait 208x304, yours" in changed and "Steps: 2, yours" in changed
        assert "Count: 4, yours" in changed and "Live previews: off, yours" in changed
        assert await bot.store.member_settings(ALICE) == MemberSettings("portrait", 2, 4, False)

        mine = await paint(fake)  # no size, no steps, no count: hers (a grid of four, four units)
        assert embed_field(mine, "Seeds") is not None and len(mine["components"][0]["components"]) == 4
        assert (embed_field(mine, "Size"), embed_field(mine, "Steps")) == ("208x304", "2")
        given = await paint(fake, steps=3, size="landscape", count=1)  # what /imagine is told wins
        assert (embed_field(given, "Size"), embed_field(given, "Steps")) == ("304x208", "3")
        theirs = await paint(fake, user=BOB)  # another member keeps the bot's defaults
        assert (embed_field(theirs, "Size"), embed_field(theirs, "Steps")) == ("256x256", "3")

        one = await settings_reply(fake, options={"steps": 4})  # one option: the others stay
        assert "Steps: 4, yours" in one and "Size: Portrait 208x304, yours" in one
        reset = await settings_reply(fake, options={"reset": True, "previews": True})
        assert "Size: Square 256x256, the bot's default" in reset and "Live previews: on, yours" in reset
        assert await bot.store.member_settings(ALICE) == MemberSettings(previews=True)
        await bot.queue.wait_idle(WAIT)


async def test_settings_survive_a_restart(fake, settings, engine):
    async with running_bot(fake, settings, engine):
        await settings_reply(fake, options={"size": "landscape", "steps": 2})
    async with running_bot(fake, settings, engine) as bot:  # a new bot on the same database file
        shown = await settings_reply(fake)
        assert "Size: Landscape 304x208, yours" in shown and "Steps: 2, yours" in shown
        final = await paint(fake)
        assert (embed_field(final, "Size"), embed_field(final, "Steps")) == ("304x208", "2")
        await bot.queue.wait_idle(WAIT)
    async with await Store.open(settings.storage.database, default_daily_limit=5) as store:
        assert await store.member_settings(ALICE) == MemberSettings("landscape", 2)


async def test_stored_steps_over_a_lowered_maximum_are_capped(fake, tmp_path, model_dir, settings, engine):
    async with running_bot(fake, settings, engine):
        await settings_reply(fake, options={"steps": 4})
    lowered = make_settings(tmp_path, model_dir, fake, generation={"default_steps": 1, "max_steps": 2})
    async with running_bot(fake, lowered, engine) as bot:
        assert "Steps: 2, yours was 4, capped" in await settings_reply(fake)
        assert embed_field(await paint(fake), "Steps") == "2"
        await bot.queue.wait_idle(WAIT)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ([{"name": "steps", "type": 4, "value": 0}], "steps must be between 1 and 50"),
        ([{"name": "steps", "type": 4, "value": 500}], "steps must be between 1 and 50"),
        ([{"name": "steps", "type": 3, "value": "ten"}], "steps must be a whole number"),
        ([{"name": "size", "type": 3, "value": "huge"}], "size must be one of: square, portrait, landscape"),
        ([{"name": "count", "type": 4, "value": 0}], "count must be between 1 and 4"),
        ([{"name": "count", "type": 4, "value": 5}], "count must be between 1 and 4"),
        ([{"name": "previews", "type": 3, "value": "yes"}], "previews must be true or false"),
        ([{"name": "reset", "type": 4, "value": 1}], "reset must be true or false"),
        (  # one bad value among good ones: none of them is stored
            [{"name": "size", "type": 3, "value": "portrait"}, {"name": "steps", "type": 4, "value": 51}],
            "steps must be between 1 and 50",
        ),
    ],
)
async def test_bad_settings_are_refused_in_one_line_and_change_nothing(fake, settings, engine, raw, expected):
    async with running_bot(fake, settings, engine) as bot:
        await settings_reply(fake, options={"size": "landscape", "steps": 5, "count": 2, "previews": False})
        before = await bot.store.member_settings(ALICE)
        text = await settings_reply(fake, raw_options=raw)
        assert text == f"Nothing changed: {expected}.", text
        assert "\n" not in text
        assert await bot.store.member_settings(ALICE) == before == MemberSettings("landscape", 5, 2, False)
