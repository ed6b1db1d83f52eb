"""The bot end to end: the real discord.py client against a fake Discord on 127.0.0.1, the real
tiny engine, a real SQLite file."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from bot.engine.api import GenerationOOM
from bot.store import JobStatus, Store
from bot.validation import size_presets

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
from ceilings import COMPILE, WAIT
from conftest import tiny_model_settings
from fake_discord import MANAGE_GUILD


@pytest.fixture
def settings(tmp_path, model_dir, fake):
    return make_settings(tmp_path, model_dir, fake)


def attachment_bytes(fake, message) -> bytes:
    return fake.attachment_data[int(message["attachments"][0]["id"])]


async def imagine(fake, user, **options):
    options.setdefault("prompt", "a lighthouse at dusk")
    return await fake.slash("imagine", options, user_id=user)


def image_messages(fake) -> list[dict]:
    return [m for m in fake.messages.values() if has_image(m)]


async def test_commands_are_synced_to_the_guild(fake, settings, engine):
    async with running_bot(fake, settings, engine):
        assert {"imagine", "queue", "cancel", "quota", "admin"} <= set(fake.synced_commands)
        imagine_cmd = fake.synced_commands["imagine"]
        opts = {o["name"]: o for o in imagine_cmd["options"]}
        assert opts["prompt"]["required"] is True
        assert opts["steps"]["min_value"] == 1 and opts["steps"]["max_value"] == 50
        assert opts["seed"]["min_value"] == -1 and opts["seed"]["max_value"] == 2**32 - 1
        assert all(o["description"] for o in opts.values())
        assert {c["value"] for c in opts["size"]["choices"]} == {"square", "portrait", "landscape"}
        # admin commands are hidden from members without Manage Server
        assert int(fake.synced_commands["admin"]["default_member_permissions"]) == 1 << 5


async def test_imagine_end_to_end(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        inter = await imagine(fake, ALICE, prompt="a red cat <@1002> @everyone", seed=42, steps=4)
        first = await inter.response()
        assert first.json["type"] == 5  # deferred at once
        final = await inter.wait_original(has_image)
        # progress went through the same message: queue position / painting / step i/N
        edits = [
            e.json.get("content")
            for e in fake.events
            if e.method == "PATCH" and "/messages/" in e.path and e.json and e.json.get("content")
        ]
        assert any("step 1/4" in c for c in edits), edits
        assert embed_field(final, "Seed") == "42"
        assert embed_field(final, "Steps") == "4"
        assert embed_field(final, "Size") == "256x256"
        assert embed_field(final, "Requested by") == f"<@{ALICE}>"
        png = Image.open(io.BytesIO(attachment_bytes(fake, final)))
        assert png.size == (256, 256)
        assert png.text["seed"] == "42" and png.text["prompt"].startswith("a red cat")
        # no message the bot sent may ping anyone
        for ev in fake.events:
            if ev.method in ("POST", "PATCH") and isinstance(ev.json, dict) and "allowed_mentions" in ev.json:
                assert ev.json["allowed_mentions"].get("parse", []) == []
        await bot.queue.wait_idle(WAIT)  # the ledger records the delivery just after the message lands
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE and job.result_message_id == int(final["id"])


@pytest.mark.timeout(2 * COMPILE)  # two sizes compile, cold
async def test_the_first_image_at_a_size_says_it_prepares_the_model(fake, settings, model_dir):
    """With compiled blocks the first job at each image token count compiles first (a minute or
    more on a GPU): its status says so, and only then. The note comes in the command's reply when
    the job starts at once, and in the worker's start edit when it waited in the queue. Landscape
    has portrait's token count, so it compiles nothing. The tiny model really compiles here."""
    from bot.engine.pipeline import Engine

    compiled = ControlledEngine(Engine.load(tiny_model_settings(model_dir, compile="on")))
    assert compiled.engine.compiled

    def status_edits(inter) -> dict[str, list[str]]:
        """The interaction's message edits: the command's reply (@original) and the worker's (by id)."""
        edits: dict[str, list[str]] = {"reply": [], "worker": []}
        for e in fake.events:
            if e.method == "PATCH" and e.json and f"/{inter.token}/messages/" in e.path:
                edits["reply" if e.path.endswith("@original") else "worker"].append(e.json.get("content") or "")
        return {k: [c for c in v if "prepares the model" in c] for k, v in edits.items()}

    async with running_bot(fake, settings, compiled) as bot:
        first = await imagine(fake, ALICE, prompt="a square cat", steps=1, size="square")
        await first.wait_original(has_image, timeout=COMPILE)  # compiles the square graph first
        compiled.gate.clear()  # the next job holds the model while a portrait waits behind it
        holding = await imagine(fake, ALICE, prompt="a held square cat", steps=1, size="square")
        await eventually(lambda: compiled.busy.is_set(), what="the held job started")
        queued = await imagine(fake, BOB, prompt="a portrait cat", steps=1, size="portrait")
        await eventually(lambda: len(bot.queue.waiting()) == 1, what="the portrait queued")
        compiled.gate.set()
        await holding.wait_original(has_image)
        await queued.wait_original(has_image, timeout=COMPILE)  # compiles the portrait graph first
        landscape = await imagine(fake, CAROL, prompt="a landscape cat", steps=1, size="landscape")
        await landscape.wait_original(has_image)
    assert status_edits(first)["reply"] and not status_edits(first)["worker"]
    assert status_edits(holding) == {"reply": [], "worker": []}
    assert not status_edits(queued)["reply"] and status_edits(queued)["worker"]  # said when it started
    assert status_edits(landscape) == {"reply": [], "worker": []}


async def test_random_seed_is_reported_as_a_plain_number(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        inter = await imagine(fake, ALICE)
        final = await inter.wait_original(has_image)
        seed = embed_field(final, "Seed")
        assert seed.isdigit()
        job = (await bot.store.recent_jobs(1))[0]
        assert int(seed) == job.seed
        assert Image.open(io.BytesIO(attachment_bytes(fake, final))).text["seed"] == seed


@pytest.mark.parametrize("size", ["portrait", "landscape"])
async def test_seed_minus_one_and_the_other_sizes(fake, settings, engine, size):
    """README: `seed` -1 = random; `size` portrait or landscape; the result shows its time."""
    preset = size_presets(settings.generation.width, settings.generation.height)[size]
    assert (preset.width, preset.height) == {"portrait": (208, 304), "landscape": (304, 208)}[size]  # at 256x256
    async with running_bot(fake, settings, engine) as bot:
        final = await (await imagine(fake, ALICE, seed=-1, size=size)).wait_original(has_image)
        job = (await bot.store.recent_jobs(1))[0]
        assert embed_field(final, "Seed") == str(job.seed) and job.seed >= 0
        assert embed_field(final, "Size") == f"{preset.width}x{preset.height}" != "256x256"
        assert Image.open(io.BytesIO(attachment_bytes(fake, final))).size == (preset.width, preset.height)
        assert embed_field(final, "Time") == f"{job.duration_s:.1f} s"


async def test_reroll_charges_the_clicker_and_changes_the_seed(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        inter = await imagine(fake, ALICE, prompt="mountains at sunrise", seed=7)
        final = await inter.wait_original(has_image)
        job_id = (await bot.store.recent_jobs(1))[0].id
        click = await fake.click(int(final["id"]), f"fluxbot:reroll:{job_id}", user_id=BOB)
        rerolled = await click.wait_original(has_image)
        assert rerolled["id"] != final["id"]
        assert embed_field(rerolled, "Seed") != "7"
        assert embed_field(rerolled, "Requested by") == f"<@{BOB}>"
        new = (await bot.store.recent_jobs(1))[0]
        assert new.prompt == "mountains at sunrise" and new.origin == "reroll" and new.user_id == BOB
        assert (await bot.store.quota_status(BOB)).used == 1
        assert (await bot.store.quota_status(ALICE)).used == 1


async def test_delete_is_for_the_requester_or_an_admin(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        finals = []
        for _ in range(2):
            inter = await imagine(fake, ALICE)
            finals.append(await inter.wait_original(has_image))
        jobs = sorted(j.id for j in await bot.store.recent_jobs(2))
        # someone else: refused, message stays
        click = await fake.click(int(finals[0]["id"]), f"fluxbot:delete:{jobs[0]}", user_id=BOB)
        await click.response()
        assert any("Only" in t for t in ephemeral_texts(fake, click))
        assert int(finals[0]["id"]) in fake.messages
        # the requester
        click = await fake.click(int(finals[0]["id"]), f"fluxbot:delete:{jobs[0]}", user_id=ALICE)
        await eventually(lambda: int(finals[0]["id"]) not in fake.messages, what="deletion by requester")
        # an admin (Manage Server role)
        click = await fake.click(int(finals[1]["id"]), f"fluxbot:delete:{jobs[1]}", user_id=MOD)
        await eventually(lambda: int(finals[1]["id"]) not in fake.messages, what="deletion by admin")


async def test_quota_exhausted_is_refused_without_an_image(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 1})
    async with running_bot(fake, settings, engine) as bot:
        await (await imagine(fake, ALICE)).wait_original(has_image)
        second = await imagine(fake, ALICE)
        await second.response()
        texts = ephemeral_texts(fake, second)
        assert texts and "daily quota of 1 images is used up" in texts[0] and "resets" in texts[0]
        await bot.queue.wait_idle(WAIT)  # a refused job would have been painted by now
        assert len(image_messages(fake)) == 1
        assert len(await bot.store.recent_jobs(10)) == 1
        q = await fake.slash("quota", {}, user_id=ALICE)
        await q.response()
        assert "used 1 of 1" in ephemeral_texts(fake, q)[0]


async def test_admin_override_then_success(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, quota={"daily_limit": 1})
    async with running_bot(fake, settings, engine) as bot:
        await (await imagine(fake, ALICE)).wait_original(has_image)
        cmd = await fake.slash(
            "admin", {"user": ALICE, "limit": 3}, user_id=ADMIN, subcommands=["quota", "set"], resolved_users=[ALICE]
        )
        await cmd.response()
        assert "used 1 of 3" in ephemeral_texts(fake, cmd)[0]
        await (await imagine(fake, ALICE)).wait_original(has_image)
        assert (await bot.store.quota_status(ALICE)).used == 2
        # reset, show and default
        cmd = await fake.slash(
            "admin", {"user": ALICE}, user_id=MOD, subcommands=["quota", "reset"], resolved_users=[ALICE]
        )
        await cmd.response()
        assert (await bot.store.quota_status(ALICE)).used == 0
        cmd = await fake.slash("admin", {"limit": 9}, user_id=ADMIN, subcommands=["quota", "default"])
        await cmd.response()
        assert (await bot.store.quota_status(BOB)).limit == 9
        cmd = await fake.slash(
            "admin", {"user": BOB}, user_id=ADMIN, subcommands=["quota", "show"], resolved_users=[BOB]
        )
        await cmd.response()
        assert "used 0 of 9" in ephemeral_texts(fake, cmd)[0]


OTHER_GUILD = 300  # a server that invited the bot, with commands registered globally


@pytest.mark.parametrize(
    "sub,options",
    [
        (["quota", "set"], {"user": CAROL, "limit": 100_000}),
        (["quota", "default"], {"limit": 0}),
        (["quota", "reset"], {"user": CAROL}),
    ],
)
async def test_another_servers_admin_cannot_change_quotas(fake, tmp_path, model_dir, engine, sub, options):
    """Commands registered globally: Manage Server in a server other than the home one is no right."""
    settings = make_settings(
        tmp_path,
        model_dir,
        fake,
        quota={"daily_limit": 1},
        discord={"guild_ids": [], "admin_guild_ids": [fake.guild_id]},
    )
    async with running_bot(fake, settings, engine) as bot:
        await (await imagine(fake, CAROL)).wait_original(has_image)
        cmd = await fake.slash(
            "admin",
            options,
            user_id=CAROL,
            subcommands=sub,
            resolved_users=[CAROL] if "user" in options else [],
            extra=fake.other_guild(OTHER_GUILD, CAROL, MANAGE_GUILD),
        )
        await cmd.response()
        assert (
            "home servers" in ephemeral_texts(fake, cmd)[0] and "Nothing was changed" in ephemeral_texts(fake, cmd)[0]
        )
        for member in (CAROL, BOB):
            status = await bot.store.quota_status(member)
            assert (status.used, status.limit, status.has_override) == (
                (1, 1, False) if member == CAROL else (0, 1, False)
            )
        assert await bot.store.default_limit() == 1
        # the home server's Manage Server still counts (MOD holds it there)
        cmd = await fake.slash(
            "admin", {"user": CAROL}, user_id=MOD, subcommands=["quota", "reset"], resolved_users=[CAROL]
        )
        await cmd.response()
        assert (await bot.store.quota_status(CAROL)).used == 0


async def test_without_home_servers_only_listed_users_are_admins(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, discord={"guild_ids": []})
    async with running_bot(fake, settings, engine) as bot:
        cmd = await fake.slash("admin", {"limit": 0}, user_id=MOD, subcommands=["quota", "default"])
        await cmd.response()
        assert "Nothing was changed" in ephemeral_texts(fake, cmd)[0]
        assert await bot.store.default_limit() == settings.quota.daily_limit
        cmd = await fake.slash(
            "admin",
            {"limit": 7},
            user_id=ADMIN,
            subcommands=["quota", "default"],
            extra=fake.other_guild(OTHER_GUILD, ADMIN),
        )
        await cmd.response()
        assert await bot.store.default_limit() == 7  # admin_user_ids: from any server


@pytest.mark.parametrize(
    "sub,options",
    [
        (["quota", "set"], {"user": BOB, "limit": 100}),
        (["quota", "reset"], {"user": BOB}),
        (["quota", "show"], {"user": BOB}),
        (["quota", "default"], {"limit": 100}),
        (["stats"], {}),
    ],
)
async def test_non_admin_is_refused_on_admin_commands(fake, settings, engine, sub, options):
    async with running_bot(fake, settings, engine) as bot:
        before = await bot.store.quota_status(BOB)
        cmd = await fake.slash(
            "admin", options, user_id=ALICE, subcommands=sub, resolved_users=[BOB] if "user" in options else []
        )
        await cmd.response()
        texts = ephemeral_texts(fake, cmd)
        assert texts and "Manage Server" in texts[0]
        assert await bot.store.quota_status(BOB) == before
        assert await bot.store.default_limit() == settings.quota.daily_limit


async def test_queue_full_and_per_user_cap_charge_nothing(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, queue={"max_size": 3, "max_per_user": 2})
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        a1 = await imagine(fake, ALICE)
        await eventually(engine.busy.is_set, what="GPU busy")
        a2 = await imagine(fake, ALICE)
        a3 = await imagine(fake, ALICE)  # third for Alice: over her cap of 2
        await a3.response()
        assert "already have 2 images waiting" in ephemeral_texts(fake, a3)[0]
        b1 = await imagine(fake, BOB)
        c1 = await imagine(fake, CAROL)  # queue of 3 is full
        await c1.response()
        assert "queue is full" in ephemeral_texts(fake, c1)[0]
        assert (await bot.store.quota_status(ALICE)).used == 2
        assert (await bot.store.quota_status(CAROL)).used == 0
        # /queue lists what waits, the caller's own marked
        q = await fake.slash("queue", {}, user_id=BOB)
        await q.response()
        listing = ephemeral_texts(fake, q)[0]
        assert "now:" in listing and "← yours" in listing
        engine.gate.set()
        for inter in (a1, a2, b1):
            await inter.wait_original(has_image)


async def test_fair_order_between_users(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        await imagine(fake, ALICE, prompt="alice one")
        await eventually(engine.busy.is_set, what="GPU busy")
        for user, prompt in ((ALICE, "alice two"), (ALICE, "alice three"), (BOB, "bob one")):
            await (await imagine(fake, user, prompt=prompt)).response()
        assert [j.prompt for j in bot.queue.waiting()] == ["bob one", "alice two", "alice three"]
        engine.gate.set()
        await bot.queue.wait_idle(30)
        assert engine.calls == ["alice one", "bob one", "alice two", "alice three"]


async def test_cancel_queued_and_running(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        running = await imagine(fake, ALICE, steps=20)
        await eventually(engine.busy.is_set, what="GPU busy")
        for _ in range(2):
            await (await imagine(fake, ALICE)).response()
        assert (await bot.store.quota_status(ALICE)).used == 3
        # Each job keeps its interaction's upload limit in the ledger (it outlives a restart).
        assert {j.upload_limit for j in await bot.store.recent_jobs(3)} == {fake.attachment_size_limit}
        for newest in (3, 2):  # the newest waiting image goes first
            c1 = await fake.slash("cancel", {}, user_id=ALICE)
            await c1.response()
            assert f"Cancelled your waiting image (job {newest})" in ephemeral_texts(fake, c1)[0]
        assert (await bot.store.quota_status(ALICE)).used == 1
        c2 = await fake.slash("cancel", {}, user_id=ALICE)
        await c2.response()
        assert "Stopping your image" in ephemeral_texts(fake, c2)[0]
        engine.gate.set()
        msg = await running.wait_original(lambda m: "Cancelled" in m["content"])
        assert not has_image(msg)
        await bot.queue.wait_idle(10)
        assert (await bot.store.quota_status(ALICE)).used == 0
        statuses = {j.status for j in await bot.store.recent_jobs(5)}
        assert statuses == {JobStatus.CANCELLED}
        c3 = await fake.slash("cancel", {}, user_id=ALICE)
        await c3.response()
        assert "nothing waiting" in ephemeral_texts(fake, c3)[0]


async def test_cancel_while_the_job_is_starting_stops_it(fake, settings, engine, caplog):
    """A /cancel that lands after the job was marked running but before the worker saw that is
    treated as stopping a running job: nothing is painted, the quota comes back, no worker error."""
    async with running_bot(fake, settings, engine) as bot:
        started, release = asyncio.Event(), asyncio.Event()
        mark_running = bot.store.mark_running

        async def mark_running_then_wait(job_id, now=None):
            job = await mark_running(job_id, now)
            started.set()
            await release.wait()
            return job

        bot.store.mark_running = mark_running_then_wait
        await imagine(fake, ALICE, prompt="a slow start")
        await asyncio.wait_for(started.wait(), 10)
        c = await fake.slash("cancel", {}, user_id=ALICE)
        await c.response()
        assert "Stopping your image" in ephemeral_texts(fake, c)[0]
        release.set()
        await bot.queue.wait_idle(10)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.CANCELLED and job.result_path is None
        assert (await bot.store.quota_status(ALICE)).used == 0
        assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


async def test_failure_refunds_and_the_next_job_still_runs(fake, settings, engine):
    engine.fail_on["explode"] = RuntimeError("CUDA error: an illegal memory access")
    engine.fail_on["hungry"] = GenerationOOM("the GPU ran out of memory at 256x256")
    async with running_bot(fake, settings, engine) as bot:
        bad = await imagine(fake, ALICE, prompt="please explode")
        msg = await bad.wait_original(lambda m: "Could not paint" in m["content"])
        assert "refunded" in msg["content"]
        assert engine.calls.count("please explode") == 1  # a failed generation is not tried again
        oom = await imagine(fake, ALICE, prompt="a hungry model")
        msg = await oom.wait_original(lambda m: "Could not paint" in m["content"])
        assert "ran out of memory" in msg["content"]
        assert (await bot.store.quota_status(ALICE)).used == 0
        good = await imagine(fake, ALICE, prompt="a calm lake")
        await good.wait_original(has_image)
        assert (await bot.store.quota_status(ALICE)).used == 1
        failed = [j for j in await bot.store.recent_jobs(5) if j.status is JobStatus.FAILED]
        assert len(failed) == 2 and all(j.charged_day is None for j in failed)


async def test_thirty_concurrent_requests_three_users_limit_five(fake, tmp_path, model_dir, engine):
    settings = make_settings(
        tmp_path,
        model_dir,
        fake,
        quota={"daily_limit": 5},
        queue={"max_size": 100, "max_per_user": 10},
        generation={"default_steps": 1, "width": 256, "height": 256},
    )
    async with running_bot(fake, settings, engine, progress_interval=5) as bot:
        users = [ALICE, BOB, CAROL] * 10
        inters = await asyncio.gather(*(imagine(fake, u, prompt=f"burst {i}") for i, u in enumerate(users)))
        await asyncio.gather(*(i.response() for i in inters))
        refused = [i for i in inters if ephemeral_texts(fake, i)]
        assert len(refused) == 15
        assert all("daily quota of 5" in ephemeral_texts(fake, i)[0] for i in refused)
        await bot.queue.wait_idle(120)
        assert len(image_messages(fake)) == 15
        for user in (ALICE, BOB, CAROL):
            assert (await bot.store.quota_status(user)).used == 5
        done = [j for j in await bot.store.recent_jobs(100) if j.status is JobStatus.DONE]
        assert len(done) == 15


async def test_quota_survives_a_restart(fake, settings, engine):
    async with running_bot(fake, settings, engine):
        for _ in range(2):
            await (await imagine(fake, ALICE)).wait_original(has_image)
    async with running_bot(fake, settings, engine) as bot:
        q = await fake.slash("quota", {}, user_id=ALICE)
        await q.response()
        assert "used 2 of 5" in ephemeral_texts(fake, q)[0]
        assert (await bot.store.quota_status(ALICE)).used == 2
    async with await Store.open(settings.storage.database, default_daily_limit=5) as store:
        assert (await store.quota_status(ALICE)).used == 2


async def test_job_survives_a_gateway_drop(fake, settings, engine):
    engine.gate.clear()
    async with running_bot(fake, settings, engine):
        inter = await imagine(fake, ALICE, steps=2)
        await eventually(engine.busy.is_set, what="GPU busy")
        await fake.drop_gateway()
        engine.gate.set()
        await inter.wait_original(has_image)
        assert fake.gateway_connections == 2
        # and the bot still answers commands
        q = await fake.slash("quota", {}, user_id=ALICE)
        await q.response()
        assert ephemeral_texts(fake, q)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 1001}, "prompt is too long"),
        ({"prompt": "a cat", "steps": 0}, "steps must be between 1 and 50"),
        ({"prompt": "a cat", "steps": 51}, "steps must be between 1 and 50"),
        ({"prompt": "a cat", "seed": 2**32}, "seed must be between 0 and 4294967295"),
        ({"prompt": "a cat", "seed": -2}, "seed must be between"),
        ({"prompt": "a cat", "size": "huge"}, "size must be one of"),
    ],
)
async def test_bad_imagine_input_is_refused_and_changes_nothing(fake, settings, engine, options, expected):
    async with running_bot(fake, settings, engine) as bot:
        inter = await fake.slash("imagine", options, user_id=ALICE)
        await inter.response()
        texts = ephemeral_texts(fake, inter)
        assert texts and expected in texts[0], texts
        assert await bot.store.recent_jobs(5) == []
        assert (await bot.store.quota_status(ALICE)).used == 0


async def test_buttons_keep_working_after_a_restart(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        final = await (await imagine(fake, ALICE, prompt="persistent pear")).wait_original(has_image)
        job_id = (await bot.store.recent_jobs(1))[0].id
    async with running_bot(fake, settings, engine) as bot:  # a new process would know nothing in memory
        click = await fake.click(int(final["id"]), f"fluxbot:reroll:{job_id}", user_id=BOB)
        rerolled = await click.wait_original(has_image)
        assert embed_field(rerolled, "Requested by") == f"<@{BOB}>"
        click = await fake.click(int(final["id"]), f"fluxbot:delete:{job_id}", user_id=ALICE)
        await eventually(lambda: int(final["id"]) not in fake.messages, what="deletion after restart")


async def test_commands_sync_globally_without_guild_ids(fake, tmp_path, model_dir, engine):
    settings = make_settings(tmp_path, model_dir, fake, discord={"guild_ids": []})
    async with running_bot(fake, settings, engine):
        puts = [e.path for e in fake.events if e.method == "PUT" and e.path.endswith("/commands")]
        assert puts == [f"/applications/{fake.application_id}/commands"]


async def test_every_message_disables_mentions(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        await (await imagine(fake, ALICE, prompt="hi <@1002> @everyone <@&55> there")).wait_original(has_image)
        await (await fake.slash("queue", {}, user_id=BOB)).response()
        await (await fake.slash("quota", {}, user_id=BOB)).response()
        await bot.queue.wait_idle(10)
        job = (await bot.store.recent_jobs(5))[-1]
    sent = [
        e
        for e in fake.events
        if e.method in ("POST", "PATCH")
        and isinstance(e.json, dict)
        and ("content" in e.json or "embeds" in e.json or "data" in e.json)
    ]
    assert sent
    for ev in sent:
        body = ev.json.get("data", ev.json) if "/callback" in ev.path else ev.json
        if ev.json.get("type") in (5, 6):  # a bare acknowledgement carries no message
            continue
        mentions = body.get("allowed_mentions")
        assert mentions is not None, (ev.method, ev.path, body)
        assert mentions.get("parse", []) == [] and not mentions.get("roles"), (ev.path, mentions)
        assert not mentions.get("users"), (ev.path, mentions)  # nobody: interaction replies never ping
    # Every message here was an interaction reply; the one channel post a job can make (a stale
    # token) pings its requester only: test_result_goes_to_the_channel_once_the_token_is_stale.
    assert not any(ev.path.startswith("/channels/") for ev in sent)
    assert "<@" not in job.prompt and "@everyone" not in job.prompt


async def test_result_goes_to_the_channel_once_the_token_is_stale(fake, settings, engine, monkeypatch):
    from bot.discord import delivery

    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await imagine(fake, ALICE, prompt="a slow painting")
        await inter.wait_original(lambda m: m["content"])
        monkeypatch.setattr(delivery, "TOKEN_FRESH_S", -1)  # as if 15 minutes had passed
        engine.gate.set()
        await bot.queue.wait_idle(30)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE
        post = next(e for e in fake.events if e.method == "POST" and e.path == f"/channels/{fake.channel_id}/messages")
        assert post.json["content"].startswith(f"<@{ALICE}>")
        assert post.json["allowed_mentions"]["users"] == [str(ALICE)] or post.json["allowed_mentions"]["users"] == [
            ALICE
        ]
        assert post.json["allowed_mentions"].get("parse", []) == []
        assert post.json["nonce"] == f"fluxbot-{job.id}" and post.json["enforce_nonce"] is True
        assert fake.messages[job.result_message_id]["attachments"]
        assert not has_image(await inter.original())  # the stale interaction message was not touched


async def test_run_with_a_rejected_token_is_one_clear_line(fake, tmp_path, model_dir, monkeypatch, capsys):
    from bot.cli import main

    bad = "bad-token-" + "x" * 50
    monkeypatch.setenv("DISCORD_TOKEN", bad)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[model]\npreset = "tiny-random"\ndir = "{model_dir}"\ndevice = "cpu"\n'
        f'[storage]\ndatabase = "{tmp_path / "b.db"}"\n[discord]\nguild_ids = [{fake.guild_id}]\n'
    )
    rc = await asyncio.to_thread(main, ["run", "--config", str(cfg)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "Discord rejected the bot token" in captured.err
    assert bad not in captured.err + captured.out


async def test_cancel_during_the_upload_says_it_is_too_late_and_the_answer_holds(fake, settings, engine):
    async with running_bot(fake, settings, engine) as bot:
        upload = fake.hold_next("PATCH", r"/webhooks/", file_prefix="fluxbot-")  # the result, not a preview
        inter = await imagine(fake, ALICE, prompt="already painted")
        await asyncio.wait_for(upload.arrived.wait(), WAIT)  # the image is on its way to Discord
        cancel = await fake.slash("cancel", {}, user_id=ALICE)
        await cancel.response()
        assert "too late to cancel" in ephemeral_texts(fake, cancel)[0]
        upload.release.set()
        await inter.wait_original(has_image)
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.DONE and (await bot.store.quota_status(ALICE)).used == 1


async def test_cancel_after_the_last_step_before_the_upload_is_kept(fake, settings, engine):
    """The image is painted and saved, the ledger is slow to record it (another writer holds the
    lock): a /cancel then still stops it before it is posted, and refunds, as it promises."""
    import sqlite3
    from pathlib import Path

    engine.gate.clear()
    async with running_bot(fake, settings, engine) as bot:
        inter = await imagine(fake, ALICE, prompt="nearly there")
        await eventually(engine.busy.is_set, what="GPU busy")
        other = sqlite3.connect(settings.storage.database, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            engine.gate.set()
            saved = Path(settings.storage.results_dir) / "job-1.png"
            await eventually(saved.exists, what="the image saved")  # its ledger write now waits on the lock
            cancel = await fake.slash("cancel", {}, user_id=ALICE)
            await cancel.response()
            assert "Stopping your image" in ephemeral_texts(fake, cancel)[0]
        finally:
            other.rollback()
            other.close()
        await bot.queue.wait_idle(WAIT)
        job = (await bot.store.recent_jobs(1))[0]
        assert job.status is JobStatus.CANCELLED and job.charged_day is None
        assert (await bot.store.quota_status(ALICE)).used == 0
        assert not image_messages(fake)
        final = await inter.wait_original(lambda m: "Cancelled" in (m.get("content") or ""))
        assert "refunded" in final["content"]


async def test_admin_stats_sums_up_the_ledger(fake, settings, engine):
    engine.fail_on["explode"] = RuntimeError("CUDA error: an illegal memory access")
    async with running_bot(fake, settings, engine) as bot:
        for user, prompt in ((ALICE, "one"), (ALICE, "two"), (BOB, "three")):
            await (await imagine(fake, user, prompt=prompt)).wait_original(has_image)
        await (await imagine(fake, BOB, prompt="explode")).wait_original(lambda m: "Could not paint" in m["content"])
        await bot.queue.wait_idle(WAIT)
        cmd = await fake.slash("admin", {}, user_id=MOD, subcommands=["stats"])
        await cmd.response()
        text = ephemeral_texts(fake, cmd)[0]
        assert "**Images** today 3, last 7 days 3" in text
        assert "**Failed** today 1, last 7 days 1" in text
        assert "**Queue**: 0 waiting" in text and "**GPU memory** (last image): n/a" in text  # the CPU
        assert f"**Busiest** (7 days): <@{ALICE}> 2, <@{BOB}> 1" in text
        assert "**Mean time per image** (7 days): " in text and "n/a" not in text.split("Mean time")[1].split("\n")[0]


async def test_imagine_while_the_model_loads_says_so(fake, settings, engine):
    """The bot answers while the model is still loading (or compiling at start-up): the queue
    position and that the model is loading; once it has loaded the jobs run as usual."""
    import threading

    from bot.discord.app import FluxBot

    loaded = threading.Event()

    def slow_loader():
        if not loaded.wait(WAIT):
            raise TimeoutError("the test never let the model load")
        return engine

    bot = FluxBot(settings, slow_loader, guild_ready_timeout=0.01)
    async with fake.run_bot(bot):
        await fake.wait_commands_synced()
        first = await imagine(fake, ALICE, prompt="an early cat")
        second = await imagine(fake, BOB, prompt="an early dog")
        for inter, where in ((first, "you are next"), (second, "position 2")):
            reply = await inter.wait_original(lambda m: "Queued" in (m.get("content") or ""))
            assert where in reply["content"] and "The model is loading" in reply["content"]
        assert not bot.queue.engine_ready.is_set() and engine.calls == []
        loaded.set()
        await first.wait_original(has_image)
        await second.wait_original(has_image)
        assert engine.calls == ["an early cat", "an early dog"]
        # After loading, a position note no longer says so.
        engine.gate.clear()
        await imagine(fake, ALICE, prompt="a later cat")
        await eventually(engine.busy.is_set, what="GPU busy")
        later = await imagine(fake, BOB, prompt="a later dog")
        reply = await later.wait_original(lambda m: "Queued" in (m.get("content") or ""))
        assert "loading" not in reply["content"]
        engine.gate.set()
        await later.wait_original(has_image)
