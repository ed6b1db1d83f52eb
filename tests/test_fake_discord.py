"""Tests of the fake Discord: the real discord.py Bot logs in, syncs, and answers interactions against it."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import pytest
from discord import app_commands
from discord.ext import commands

from ceilings import WAIT
from fake_discord import (  # first: it silences discord.py's audioop warning (-W error)
    READ_MESSAGE_HISTORY,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    FakeDiscord,
    discord,
)

ADMIN, OTHER = 11, 12


def png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" + b"\xff" * 6))
        + chunk(b"IEND", b"")
    )


class PersistentView(discord.ui.View):
    def __init__(self, clicks: list):
        super().__init__(timeout=None)
        self.clicks = clicks

    @discord.ui.button(label="Again", custom_id="again:1", style=discord.ButtonStyle.primary)
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button):
        self.clicks.append(interaction.user.id)
        await interaction.response.send_message(f"clicked by {interaction.user.id}", ephemeral=True)


def make_bot(fake: FakeDiscord, seen: dict) -> commands.Bot:
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.01)
    guild = discord.Object(fake.guild_id)
    seen.setdefault("errors", [])
    seen.setdefault("clicks", [])

    @bot.tree.command(name="paint", description="paint something", guild=guild)
    @app_commands.describe(steps="number of steps", who="for whom")
    async def paint(interaction: discord.Interaction, steps: int, who: discord.Member, prompt: str = "cat"):
        seen["paint"] = {
            "steps": steps,
            "who": who,
            "prompt": prompt,
            "user": interaction.user,
            "perms": interaction.permissions,
        }
        await interaction.response.defer()
        await interaction.edit_original_response(content=f"painting {prompt} ({steps} steps)")
        embed = discord.Embed(title="Done", description=prompt)
        msg = await interaction.followup.send(
            embed=embed,
            file=discord.File(io.BytesIO(png_bytes()), filename="out.png"),
            view=PersistentView(seen["clicks"]),
            allowed_mentions=discord.AllowedMentions.none(),
            wait=True,
        )
        seen["followup"] = msg

    quota = app_commands.Group(name="quota", description="quota admin", guild_ids=[fake.guild_id])
    quota_set = app_commands.Group(name="set", description="set quotas", parent=quota)

    @quota_set.command(name="daily", description="daily quota")
    async def daily(interaction: discord.Interaction, user: discord.User, amount: int):
        seen["daily"] = (user.id, amount)
        await interaction.response.send_message(f"quota for {user.id} = {amount}")

    bot.tree.add_command(quota)

    @bot.tree.command(name="edit404", description="edit that fails", guild=guild)
    async def edit404(interaction: discord.Interaction):
        await interaction.response.defer(ephemeral=True)
        try:
            await interaction.edit_original_response(content="never")
        except discord.NotFound as exc:
            seen["errors"].append(exc)
            await interaction.followup.send("gone", ephemeral=True)

    async def setup_hook():
        bot.add_view(PersistentView(seen["clicks"]))
        await bot.tree.sync(guild=guild)

    bot.setup_hook = setup_hook
    return bot


@pytest.fixture
async def fake():
    fake = FakeDiscord()
    await fake.start()
    fake.install()
    fake.add_member(ADMIN, "admin", manage_guild=True)
    fake.add_member(OTHER, "other", roles=[555])
    try:
        yield fake
    finally:
        await fake.stop()
    assert discord.http.Route.BASE == "https://discord.com/api/v10"


@pytest.fixture
async def bot_env(fake):
    seen: dict = {}
    bot = make_bot(fake, seen)
    async with fake.run_bot(bot):
        await fake.wait_commands_synced()
        yield fake, bot, seen


async def test_login_ready_guild(bot_env):
    fake, bot, _ = bot_env
    await asyncio.wait_for(bot.wait_until_ready(), WAIT)
    assert bot.user.id == fake.bot_user_id
    assert bot.application_id == fake.application_id
    guild = bot.get_guild(fake.guild_id)
    assert guild is not None and not guild.unavailable
    assert guild.get_channel(fake.channel_id).name == "general"
    assert guild.me is not None and guild.me.guild_permissions.send_messages
    assert fake.gateway_connections == 1
    assert fake.gateway_received[0]["op"] == 2
    assert {"paint", "quota", "edit404"} <= set(fake.synced_commands)
    assert fake.synced_commands["paint"]["guild_id"] == str(fake.guild_id)
    assert fake.events[0].path == "/users/@me"


async def test_slash_defer_edit_followup_with_file(bot_env):
    fake, bot, seen = bot_env
    inter = await fake.slash("paint", {"steps": 20, "who": OTHER, "prompt": "a fox"}, user_id=ADMIN)
    assert inter.payload["data"]["options"][1] == {"name": "who", "type": 6, "value": str(OTHER)}
    callback = await inter.response()
    assert callback.json["type"] == 5 and callback.query["with_response"] == "1"
    edited = await inter.wait_original(lambda m: m["content"].startswith("painting"))
    assert edited["content"] == "painting a fox (20 steps)" and not edited["flags"] & 128
    follow = await fake.wait_for(lambda e: e.method == "POST" and e.path.startswith("/webhooks/"))
    assert follow.query["wait"] == "1"
    assert follow.files[0]["filename"] == "out.png" and follow.files[0]["data"] == png_bytes()
    assert follow.json["embeds"][0]["title"] == "Done"
    assert follow.json["allowed_mentions"] == {"parse": []}
    await fake.wait_for(lambda e: e.method == "PATCH")
    assert seen["paint"]["steps"] == 20 and seen["paint"]["prompt"] == "a fox"
    assert isinstance(seen["paint"]["who"], discord.Member) and seen["paint"]["who"].id == OTHER
    assert seen["paint"]["user"].guild_permissions.manage_guild and seen["paint"]["perms"].manage_guild
    [msg] = fake.messages_with_files()
    assert msg["files"][0]["data"] == png_bytes() and msg["attachments"][0]["width"] == 2
    assert inter.followups[0]["id"] == msg["id"]
    assert msg["components"][0]["components"][0]["custom_id"] == "again:1"
    for _ in range(100):  # the handler stores the discord.Message it got back from followup.send
        if "followup" in seen:
            break
        await asyncio.sleep(0.01)
    assert seen["followup"].attachments[0].filename == "out.png"
    assert await seen["followup"].attachments[0].read() == png_bytes()


async def test_subcommand_group_with_user_option(bot_env):
    fake, bot, seen = bot_env
    inter = await fake.slash("quota", {"user": OTHER, "amount": 5}, user_id=ADMIN, subcommands=["set", "daily"])
    opts = inter.payload["data"]["options"]
    assert opts[0]["type"] == 2 and opts[0]["options"][0]["type"] == 1
    ev = await inter.response()
    assert ev.json["type"] == 4 and ev.json["data"]["content"] == f"quota for {OTHER} = 5"
    assert seen["daily"] == (OTHER, 5)
    assert (await inter.original())["content"] == f"quota for {OTHER} = 5"


async def test_persistent_view_click(bot_env):
    fake, bot, seen = bot_env
    # a message from "an earlier run": the bot has no view bound to it, only the one registered by add_view
    button = {"type": 2, "style": 1, "label": "Again", "custom_id": "again:1"}
    old = fake.add_message("pick one", components=[{"type": 1, "components": [button]}])
    click = await fake.click(int(old["id"]), "again:1", user_id=OTHER)
    ev = await click.response()
    assert ev.json["type"] == 4 and ev.json["data"]["flags"] == 64
    assert seen["clicks"] == [OTHER]
    reply = await click.original()
    assert reply["content"] == f"clicked by {OTHER}" and reply["flags"] & 64 and reply["id"] != old["id"]
    assert click.payload["message"]["components"][0]["components"][0]["custom_id"] == "again:1"


async def test_429_on_followup_is_retried(bot_env):
    fake, bot, seen = bot_env
    fake.fail_next(
        "POST",
        r"^/webhooks/\d+/[^/]+$",
        status=429,
        body={"retry_after": 0.05, "global": False, "message": "You are being rate limited."},
    )
    inter = await fake.slash("paint", {"steps": 2, "who": OTHER}, user_id=ADMIN)
    ok = await fake.wait_for(lambda e: e.path.startswith("/webhooks/") and e.method == "POST" and e.status == 200)
    limited = [e for e in fake.events if e.status == 429]
    assert len(limited) == 1 and fake.events.index(limited[0]) < fake.events.index(ok)
    assert ok.files[0]["data"] == png_bytes()
    assert len(inter.followups) == 1


async def test_404_on_edit_raises_not_found(bot_env):
    fake, bot, seen = bot_env
    fake.fail_next("PATCH", r"/messages/@original$", status=404, body={"code": 10008, "message": "Unknown Message"})
    inter = await fake.slash("edit404", user_id=OTHER)
    await fake.wait_for(lambda e: e.path.startswith("/webhooks/") and e.method == "POST")
    assert isinstance(seen["errors"][0], discord.NotFound) and seen["errors"][0].code == 10008
    original = await inter.original()
    assert original["content"] == "gone" and original["flags"] & 64  # 1st followup replaced "thinking..."


async def test_drop_gateway_resumes(bot_env):
    fake, bot, seen = bot_env
    await fake.drop_gateway(4000)
    assert fake.gateway_connections == 2
    assert fake.gateway_received[-1]["op"] == 6
    inter = await fake.slash("quota", {"user": ADMIN, "amount": 9}, user_id=ADMIN, subcommands=["set", "daily"])
    await inter.response()
    assert seen["daily"] == (ADMIN, 9)


async def test_wrong_token_login_failure(fake):
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    try:
        with pytest.raises(discord.LoginFailure):
            await bot.login("wrong-token")
    finally:
        await bot.close()
    assert fake.events[-1].status == 401


async def test_channel_post_nonce_is_idempotent(bot_env):
    fake, bot, seen = bot_env
    channel = bot.get_channel(fake.channel_id)
    first = await channel.send("hello", nonce=12345)
    second = await channel.send("hello", nonce=12345)
    assert first.id == second.id
    assert [m["content"] for m in fake.messages.values()] == ["hello"]
    posts = [e for e in fake.events if e.method == "POST" and e.path == f"/channels/{fake.channel_id}/messages"]
    assert len(posts) == 2 and posts[0].json["enforce_nonce"] is True and posts[0].json["nonce"] == "12345"
    third = await channel.send("other", nonce=999)
    assert third.id != first.id
    history = [m async for m in channel.history(limit=10)]
    assert [m.content for m in history] == ["other", "hello"]


async def test_channel_overwrites_are_obeyed_as_discord_does(fake):
    """A member overwrite for the bot: the client's cache, the channel routes and the interactions'
    app_permissions agree; interaction webhooks do not depend on channel permissions."""
    fake.add_message("before")
    fake.set_channel_overwrite(fake.bot_user_id, deny=SEND_MESSAGES | READ_MESSAGE_HISTORY)
    seen: dict = {}
    bot = make_bot(fake, seen)
    async with fake.run_bot(bot):
        await fake.wait_commands_synced()
        channel = bot.get_channel(fake.channel_id)
        perms = channel.permissions_for(channel.guild.me)
        assert perms.view_channel and not perms.send_messages and not perms.read_message_history
        with pytest.raises(discord.Forbidden) as refused:
            await channel.send("nope")
        assert refused.value.code == 50013
        assert [m async for m in channel.history(limit=10)] == []  # Discord lists nothing, it does not refuse
        assert (await bot.fetch_channel(fake.channel_id)).id == fake.channel_id

        fake.set_channel_overwrite(fake.bot_user_id, deny=VIEW_CHANNEL)  # mid-run: a CHANNEL_UPDATE
        inter = await fake.slash("paint", {"steps": 1, "who": OTHER}, user_id=ADMIN)
        followup = await fake.wait_for(lambda e: e.method == "POST" and e.path.endswith(f"/{inter.token}"))
        assert followup.status == 200 and followup.response["attachments"]  # webhooks work without the channel
        assert int(inter.payload["app_permissions"]) == 0  # no VIEW_CHANNEL: nothing else counts
        assert not channel.permissions_for(channel.guild.me).view_channel  # the update came before the command
        for call in (channel.send("nope"), bot.fetch_channel(fake.channel_id), channel.history(limit=1).__anext__()):
            with pytest.raises(discord.Forbidden) as refused:
                await call
            assert refused.value.code == 50001
    assert fake.errors == []


async def test_unknown_route_and_double_ack(bot_env):
    fake, bot, seen = bot_env
    with pytest.raises(discord.NotFound):
        await bot.http.request(discord.http.Route("GET", "/nope/{x}", x=1))
    assert fake.events[-1].path == "/nope/1" and fake.events[-1].status == 404


class Ask(discord.ui.Modal, title="Ask"):
    question = discord.ui.TextInput(label="Question", custom_id="question")

    async def on_submit(self, interaction: discord.Interaction):
        await interaction.response.send_message(f"asked: {self.question.value}")


class Counter(discord.ui.View):
    def __init__(self):
        super().__init__(timeout=30)
        self.n = 0

    @discord.ui.button(label="+1", custom_id="inc")
    async def inc(self, interaction: discord.Interaction, button: discord.ui.Button):
        self.n += 1
        await interaction.response.edit_message(content=f"n={self.n}")

    @discord.ui.button(label="ask", custom_id="ask")
    async def ask(self, interaction: discord.Interaction, button: discord.ui.Button):
        await interaction.response.send_modal(Ask())


async def test_global_command_view_update_modal_and_channel_ops(fake):
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.01)
    errors: list = []

    @bot.tree.command(name="counter", description="a counter")
    async def counter(interaction: discord.Interaction, start: int):
        await interaction.response.send_message(f"n={start}", view=Counter())

    @bot.tree.error
    async def on_tree_error(interaction, error):
        errors.append(error)

    async def setup_hook():
        await bot.tree.sync()

    bot.setup_hook = setup_hook
    async with fake.run_bot(bot):
        await fake.wait_commands_synced(names=["counter"])
        assert "guild_id" not in fake.synced_commands["counter"] and None in fake.commands_by_scope
        inter = await fake.slash("counter", {"start": 0}, user_id=OTHER)
        assert "guild_id" not in inter.payload["data"]
        mid = int((await inter.original())["id"])
        assert (await inter.response()).response["resource"]["message"]["id"] == str(mid)
        click = await fake.click(mid, "inc", user_id=OTHER)
        assert (await click.response()).json["type"] == 7
        assert fake.messages[mid]["content"] == "n=1" and fake.messages[mid]["edited_timestamp"]
        ask = await fake.click(mid, "ask", user_id=OTHER)
        modal = (await ask.response()).json
        assert modal["type"] == 9
        submit = await fake.submit_modal(
            modal["data"]["custom_id"], {"question": "why?"}, user_id=OTHER, message_id=mid
        )
        assert (await submit.original())["content"] == "asked: why?"

        # hostile options: a string where an integer is declared is sent as given
        bad = await fake.slash("counter", user_id=OTHER, raw_options=[{"name": "start", "type": 4, "value": "x"}])
        assert bad.payload["data"]["options"] == [{"name": "start", "type": 4, "value": "x"}]
        # discord.py does not validate option types: the handler gets the str "x" for `start: int`
        assert (await bad.response()).json["data"]["content"] == "n=x" and errors == []

        guild = bot.get_guild(fake.guild_id)
        assert [r.id for r in guild.get_member(bot.user.id).roles] == [fake.guild_id, fake.bot_role_id]
        channel = guild.get_channel(fake.channel_id)
        msg = await channel.send("img", file=discord.File(io.BytesIO(png_bytes()), filename="a.png"))
        assert msg.attachments[0].size == len(png_bytes())
        edited = await msg.edit(content="img2")
        assert edited.content == "img2" and len(edited.attachments) == 1
        assert (await channel.fetch_message(msg.id)).content == "img2"
        await msg.delete()
        assert msg.id in fake.deleted_message_ids and msg.id not in fake.messages
        with pytest.raises(discord.NotFound):
            await channel.fetch_message(msg.id)
        fake.fail_next(
            "POST", r"/channels/\d+/messages$", status=403, body={"code": 50013, "message": "Missing Permissions"}
        )
        with pytest.raises(discord.Forbidden):
            await channel.send("nope")
        async with channel.typing():
            pass
        assert fake.events[-1].path == f"/channels/{fake.channel_id}/typing"
    assert fake.errors == []
