"""A fake Discord (REST + gateway websocket) on 127.0.0.1 for driving the real discord.py client in tests.

Checked against discord.py 2.6.0 and 2.7.1. Usage::

    fake = FakeDiscord(); await fake.start(); fake.install()
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.01)
    async with fake.run_bot(bot):          # login + connect + the client's ready; closes the bot (and its task) on exit
        inter = await fake.slash("ping", user_id=1)
        ev = await inter.response()
    await fake.stop()                      # close the bot first, or it keeps trying to reconnect

- Event paths are relative to /api/v10 ("/channels/200/messages"); fail_next() regexes use re.search on them.
  All REST calls are recorded, login ones (GET /users/@me, /oauth2/applications/@me) included.
- Messages are the JSON the fake answered with; attachment bytes live in attachment_data and are served at
  attachment["url"], so Attachment.read() works.
- A deferred ("thinking...") response is replaced by the first followup, as Discord does.
- Channel permissions: set_channel_overwrite() (e.g. deny the bot SEND_MESSAGES); the bot's channel routes
  answer as Discord does (403 50001 without VIEW_CHANNEL, 50013 without the permission, an empty history
  without READ_MESSAGE_HISTORY); interactions carry the bot's computed app_permissions.
- discord.py sleeps 5 s before any IDENTIFY but the first: drop_gateway(resume=False) is slow unless the test
  replaces bot.before_identify_hook.
- A bot in another process (tests/bot_process.py): pass api_base and gateway_url to it instead of install();
  after restarting it, wait_connected(gateway_connections read before the restart).
- Timing: Event.received_at and FakeInteraction.sent_at are time.monotonic() stamps (ack latency = their difference).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import mimetypes
import re
import secrets
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import yarl
from aiohttp import WSMsgType, web

from ceilings import WAIT

with warnings.catch_warnings():  # discord.player imports audioop (deprecated on 3.11+); pytest runs with -W error
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord

DISCORD_EPOCH = 1420070400000
EPHEMERAL, LOADING = 1 << 6, 1 << 7
ADMINISTRATOR, MANAGE_GUILD, MANAGE_MESSAGES = 1 << 3, 1 << 5, 1 << 13
VIEW_CHANNEL, SEND_MESSAGES, ATTACH_FILES, READ_MESSAGE_HISTORY = 1 << 10, 1 << 11, 1 << 15, 1 << 16
ALL_PERMS = (1 << 53) - 1
# view, send, add reactions, embed, attach, read history, external emojis, app commands, threads
BASIC_PERMS = (1 << 10) | (1 << 11) | (1 << 6) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 18) | (1 << 31) | (1 << 38)
BOT_PERMS = BASIC_PERMS | MANAGE_MESSAGES | (1 << 17)  # + mention everyone
OPTION_TYPES = {bool: 5, int: 4, str: 3, float: 10}


@dataclasses.dataclass
class Event:
    method: str
    path: str  # relative to /api/v10
    json: Any = None  # parsed JSON body, or payload_json of a multipart body
    files: list = dataclasses.field(default_factory=list)  # [{"filename", "content_type", "data": bytes}]
    query: dict = dataclasses.field(default_factory=dict)
    status: int = 200  # status the fake answered with (injected failures included)
    response: Any = None  # JSON the fake answered with
    received_at: float = dataclasses.field(default_factory=time.monotonic)  # time.monotonic() when the request came in


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _err(status: int, code: int, message: str):
    return status, {"code": code, "message": message}


class FakeInteraction:
    def __init__(self, fake: FakeDiscord, payload: dict):
        self.fake, self.payload = fake, payload
        self.id, self.token = int(payload["id"]), payload["token"]
        self.followups: list[dict] = []
        self.original_id: int | None = None
        self.responded = False
        self.sent_at: float | None = None  # time.monotonic() just before INTERACTION_CREATE went out

    async def response(self, timeout: float = WAIT) -> Event:
        path = f"/interactions/{self.id}/{self.token}/callback"
        return await self.fake.wait_for(lambda e: e.path == path and e.status < 400, timeout)

    async def wait_original(self, predicate: Callable[[dict], bool] = lambda m: True, timeout: float = WAIT) -> dict:
        def check():
            msg = self.fake.messages.get(self.original_id)
            return msg is not None and predicate(msg)

        await self.fake._wait(check, timeout, f"original message of interaction {self.id}")
        return self.fake.messages[self.original_id]

    async def original(self, timeout: float = WAIT) -> dict:
        return await self.wait_original(timeout=timeout)


@dataclasses.dataclass
class Hold:
    """A request the fake keeps waiting (see `FakeDiscord.hold_next`)."""

    method: str
    pattern: re.Pattern
    with_files: bool
    file_prefix: str = ""  # with a file whose name starts with this (e.g. a result, not a preview)
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    release: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class FakeDiscord:
    def __init__(
        self,
        *,
        token: str = "fake-token",
        application_id: int = 900,
        bot_user_id: int = 901,
        guild_id: int = 100,
        channel_id: int = 200,
    ):
        self.token, self.application_id, self.bot_user_id = token, application_id, bot_user_id
        self.guild_id, self.channel_id = guild_id, channel_id
        self.owner_id = 902  # guild owner (owners get every permission in discord.py, so it is not the bot)
        self.manager_role_id = guild_id + 1  # role with MANAGE_GUILD given by add_member(manage_guild=True)
        self.bot_role_id = guild_id + 2
        self.attachment_size_limit = 8 * 1024 * 1024
        self.app_permissions: int | None = None  # None: the bot's permissions in the channel (roles, overwrites)
        self.heartbeat_interval = 45000
        self.port = 0
        self.api_base = self.gateway_url = ""
        self.events: list[Event] = []
        self.messages: dict[int, dict] = {}
        self.deleted_message_ids: list[int] = []
        self.synced_commands: dict[str, dict] = {}
        self.commands_by_scope: dict[int | None, list[dict]] = {}  # guild id (None = global) -> commands
        self.interactions: dict[int, FakeInteraction] = {}
        self.gateway_connections = 0
        # Cleared: the gateway takes new connections but says nothing (no HELLO), as during an outage.
        self.gateway_open = asyncio.Event()
        self.gateway_open.set()
        self.gateway_received: list[dict] = []  # client payloads other than heartbeats (identify, presence...)
        self.channels: dict[int, dict] = {channel_id: self._text_channel(channel_id, "general")}
        self.roles: dict[int, dict] = {}
        self.members: dict[int, dict] = {}
        self.attachment_data: dict[int, bytes] = {}
        self.errors: list[Exception] = []  # exceptions raised while the fake handled a request (bad bodies)
        self.session_id: str | None = None
        self._fails: list[list] = []
        self._holds: list[Hold] = []
        self._nonces: dict[tuple, tuple[float, int]] = {}
        self._cond = asyncio.Condition()
        self._ws: web.WebSocketResponse | None = None
        self._ws_ready = False
        self._ready_number = 0  # gateway connection number (1, 2...) of the socket that is READY now
        self._all_ws: set[web.WebSocketResponse] = set()
        self._send_lock = asyncio.Lock()
        self._pending: list[tuple[str, dict]] = []
        self._seq = 0
        self._last_id = 0
        self._runner: web.AppRunner | None = None
        self._saved: tuple | None = None
        self.add_role(guild_id, "@everyone", BASIC_PERMS)
        self.add_role(self.manager_role_id, "Manager", MANAGE_GUILD)
        self.add_role(self.bot_role_id, "FakeBot", BOT_PERMS, managed=True)
        self.members[bot_user_id] = self._member(bot_user_id, "FakeBot", [self.bot_role_id], bot=True)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/gateway", self._ws_handler)
        app.router.add_get("/attachments/{cid}/{aid}/{name}", self._attachment_handler)
        app.router.add_route("*", "/{tail:.*}", self._rest_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # 0 (default): any free port
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_base = f"{self.base_url}/api/v10"
        self.gateway_url = f"ws://127.0.0.1:{self.port}/gateway"

    def install(self) -> None:
        if self._saved is None:
            self._saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    def uninstall(self) -> None:
        if self._saved is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved
            self._saved = None

    async def stop(self) -> None:
        for ws in list(self._all_ws):
            await ws.close(code=1000)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.uninstall()

    @contextlib.asynccontextmanager
    async def run_bot(self, bot: discord.Client, *, timeout: float = WAIT):
        """Log the bot in, connect it, wait until the client itself is ready; close it (and await its
        task) on exit.

        Waiting for the client's own ready (not only for READY to be sent) matters: discord.py
        dispatches on_ready from a task of its own after the guilds arrive, and a client closed
        before that task ran dispatches into a closed client (a `Client._run_event` coroutine that
        is never awaited)."""
        await bot.login(self.token)
        task = asyncio.create_task(bot.connect(reconnect=True))
        try:
            await self.wait_ready(timeout)
            ready = asyncio.ensure_future(bot.wait_until_ready())
            await asyncio.wait({ready, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                if task.done():
                    task.result()  # the connection's own error
                raise AssertionError(f"the client did not become ready within {timeout}s")
            yield task
        finally:
            await bot.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5)

    # ---- waiting --------------------------------------------------------------------------------
    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        async with self._cond:
            try:
                return await asyncio.wait_for(self._cond.wait_for(check), timeout)
            except asyncio.TimeoutError:
                recent = "\n  ".join(f"{e.method} {e.path} -> {e.status}" for e in self.events[-15:])
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; last events:\n  {recent}"
                ) from None

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = WAIT, *, since: int = 0) -> Event:
        """First recorded event (past or future) matching predicate, looking at events[since:] only."""
        return await self._wait(
            lambda: next((e for e in self.events[since:] if predicate(e)), None), timeout, "matching event"
        )

    async def wait_ready(self, timeout: float = WAIT) -> None:
        await self._wait(lambda: self._ws is not None and self._ws_ready, timeout, "gateway READY")

    async def wait_connected(self, after: int, timeout: float = WAIT) -> None:
        """Until a bot that opened gateway connection number > `after` is READY (or RESUMED): e.g. a restarted
        bot process, with `after` = gateway_connections read before it started."""
        await self._wait(
            lambda: self._ws is not None and self._ws_ready and self._ready_number > after,
            timeout,
            f"gateway connection #{after + 1} READY",
        )

    async def wait_commands_synced(self, timeout: float = WAIT, names: Iterable[str] = ()) -> None:
        names = set(names)
        await self._wait(lambda: self.commands_by_scope and names <= set(self.synced_commands), timeout, "command sync")

    def messages_with_files(self) -> list[dict]:
        """Current messages with attachments; each copy has "files": [{"filename","content_type","data"}]."""
        out = []
        for msg in self.messages.values():
            if msg["attachments"]:
                files = [
                    {
                        "filename": a["filename"],
                        "content_type": a["content_type"],
                        "data": self.attachment_data[int(a["id"])],
                    }
                    for a in msg["attachments"]
                ]
                out.append({**msg, "files": files})
        return out

    # ---- guild model ----------------------------------------------------------------------------
    def add_role(self, role_id: int, name: str, permissions: int = 0, *, managed: bool = False) -> None:
        self.roles[role_id] = {
            "id": str(role_id),
            "name": name,
            "permissions": str(permissions),
            "position": len(self.roles),
            "color": 0,
            "hoist": False,
            "managed": managed,
            "mentionable": False,
            "flags": 0,
            "icon": None,
            "unicode_emoji": None,
        }
        if self._ws_ready:
            self._pending.append(("GUILD_ROLE_CREATE", {"guild_id": str(self.guild_id), "role": self.roles[role_id]}))

    def add_member(self, user_id: int, name: str, *, manage_guild: bool = False, roles: Iterable[int] = ()) -> None:
        role_ids = list(roles) + ([self.manager_role_id] if manage_guild else [])
        for rid in role_ids:
            if rid not in self.roles:
                self.add_role(rid, f"role-{rid}")
        self.members[user_id] = member = self._member(user_id, name, role_ids)
        if self._ws_ready:
            self._pending.append(("GUILD_MEMBER_ADD", {**member, "guild_id": str(self.guild_id)}))

    def set_channel_overwrite(
        self, target_id: int, *, allow: int = 0, deny: int = 0, member: bool = True, channel_id: int | None = None
    ) -> None:
        """A permission overwrite on a channel, as a server admin sets it: for a member (`member=True`,
        e.g. the bot: `fake.bot_user_id`) or a role. The fake's channel routes obey it for the bot's
        token (see `permissions_in`); interaction webhooks do not depend on it, as on Discord."""
        cid = channel_id or self.channel_id
        channel = self.channels[cid]
        kept = [o for o in channel["permission_overwrites"] if o["id"] != str(target_id)]
        overwrite = {"id": str(target_id), "type": 1 if member else 0, "allow": str(allow), "deny": str(deny)}
        channel["permission_overwrites"] = [*kept, overwrite]
        if self._ws_ready:  # the client's cache learns it with the next dispatch, as from Discord's gateway
            self._pending.append(("CHANNEL_UPDATE", channel))

    def permissions_in(self, channel_id: int, user_id: int) -> int:
        """Discord's computation: @everyone and the member's roles, then the channel's overwrites
        (@everyone, the roles together, the member); without VIEW_CHANNEL nothing else counts."""
        if user_id == self.owner_id:
            return ALL_PERMS
        member = self.members.get(user_id) or self._member(user_id, f"user{user_id}", [])
        role_ids = [int(r) for r in member["roles"]]
        perms = int(self.roles[self.guild_id]["permissions"])
        for rid in role_ids:
            perms |= int(self.roles.get(rid, {}).get("permissions", 0))
        if perms & ADMINISTRATOR:
            return ALL_PERMS
        overwrites = {int(o["id"]): o for o in self.channels[channel_id]["permission_overwrites"]}

        def apply(perms: int, allow: int, deny: int) -> int:
            return (perms & ~deny) | allow

        if self.guild_id in overwrites:
            everyone = overwrites[self.guild_id]
            perms = apply(perms, int(everyone["allow"]), int(everyone["deny"]))
        role_ows = [overwrites[r] for r in role_ids if r in overwrites and overwrites[r]["type"] == 0]
        allow = deny = 0
        for o in role_ows:
            allow, deny = allow | int(o["allow"]), deny | int(o["deny"])
        perms = apply(perms, allow, deny)
        own = overwrites.get(user_id)
        if own is not None and own["type"] == 1:
            perms = apply(perms, int(own["allow"]), int(own["deny"]))
        return perms if perms & VIEW_CHANNEL else 0

    def _user(self, user_id: int) -> dict:
        if user_id in self.members:
            return self.members[user_id]["user"]
        return {
            "id": str(user_id),
            "username": f"user{user_id}",
            "discriminator": "0",
            "global_name": None,
            "avatar": None,
        }

    def _member(self, user_id: int, name: str, roles: list[int], bot: bool = False) -> dict:
        user = {
            "id": str(user_id),
            "username": name,
            "discriminator": "0",
            "global_name": None if bot else name,
            "avatar": None,
            "bot": bot,
            "flags": 0,
        }
        return {
            "user": user,
            "roles": [str(r) for r in roles],
            "flags": 0,
            "joined_at": _now(),
            "nick": None,
            "avatar": None,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
        }

    def _member_payload(self, user_id: int) -> dict:
        member = self.members.get(user_id) or self._member(user_id, f"user{user_id}", [])
        perms = int(self.roles[self.guild_id]["permissions"])
        for rid in member["roles"]:
            perms |= int(self.roles.get(int(rid), {}).get("permissions", 0))
        return {**member, "permissions": str(perms)}

    def _bot_user(self) -> dict:
        return {**self.members[self.bot_user_id]["user"], "verified": True, "mfa_enabled": False}

    def _text_channel(self, cid: int, name: str) -> dict:
        return {
            "id": str(cid),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }

    def _guild(self) -> dict:
        return {
            "id": str(self.guild_id),
            "name": "Fake Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "features": [],
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "description": None,
            "vanity_url_code": None,
            "max_members": 500000,
            "unavailable": False,
            "large": False,
            "joined_at": _now(),
            "member_count": len(self.members),
            "roles": list(self.roles.values()),
            "channels": list(self.channels.values()),
            "members": list(self.members.values()),
            "threads": [],
            "emojis": [],
            "stickers": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _snowflake(self) -> int:
        self._last_id = max(self._last_id + 1, (int(time.time() * 1000) - DISCORD_EPOCH) << 22)
        return self._last_id

    # ---- fault injection --------------------------------------------------------------------------
    def fail_next(
        self,
        method: str,
        path_regex: str,
        *,
        status: int,
        body: dict | None = None,
        headers: dict | None = None,
        times: int = 1,
        after_handling: bool = False,
    ) -> None:
        """The next `times` requests matching method ("*" = any) and re.search(path_regex, path) get this answer.
        With `after_handling`, the request is carried out first (a message is stored) and only the answer
        is the error: Discord's 502 after it did the work, which a client that retries turns into copies."""
        if body is None:
            body = (
                {"message": "You are being rate limited.", "retry_after": 0.05, "global": False}
                if status == 429
                else {"code": 0, "message": f"{status}: injected failure"}
            )
        hdrs = {"Via": "1.1 google"} if status == 429 else {}
        hdrs.update(headers or {})
        self._fails.append([method.upper(), re.compile(path_regex), status, body, hdrs, times, after_handling])

    def hold_next(self, method: str, path_regex: str, *, with_files: bool = False, file_prefix: str = "") -> Hold:
        """The next request matching method ("*" = any) and path (with attachments, if `with_files`;
        with one named `file_prefix`..., if given) waits, as if still uploading, until the test sets
        `hold.release`; `hold.arrived` says it came."""
        hold = Hold(method.upper(), re.compile(path_regex), with_files or bool(file_prefix), file_prefix)
        self._holds.append(hold)
        return hold

    def _take_fail(self, method: str, path: str):
        for f in self._fails:
            if f[0] in ("*", method) and f[1].search(path):
                f[5] -= 1
                if f[5] <= 0:
                    self._fails.remove(f)
                return f
        return None

    # ---- gateway --------------------------------------------------------------------------------
    async def _send(self, ws: web.WebSocketResponse, payload: dict) -> None:
        async with self._send_lock:
            if not ws.closed:
                await ws.send_str(json.dumps(payload))

    async def _dispatch(self, event: str, data: dict, ws: web.WebSocketResponse | None = None) -> None:
        ws = ws or self._ws
        if ws is None:
            raise RuntimeError("no bot connected to the fake gateway")
        pending, self._pending = self._pending, []
        for t, d in pending + [(event, data)]:
            self._seq += 1
            await self._send(ws, {"op": 0, "t": t, "s": self._seq, "d": d})

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.gateway_connections += 1
        number = self.gateway_connections
        self._all_ws.add(ws)
        await self.gateway_open.wait()
        await self._send(ws, {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op, d = payload.get("op"), payload.get("d")
                if op == 1:
                    await self._send(ws, {"op": 11, "d": None, "s": None, "t": None})
                    continue
                self.gateway_received.append(payload)
                if op == 2:
                    if d.get("token") != self.token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    self._ws, self._seq, self.session_id = ws, 0, secrets.token_hex(8)
                    await self._dispatch(
                        "READY",
                        {
                            "v": 10,
                            "user": self._bot_user(),
                            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                            "session_id": self.session_id,
                            "resume_gateway_url": self.gateway_url,
                            "shard": [0, 1],
                            "application": {"id": str(self.application_id), "flags": 0},
                            "private_channels": [],
                            "relationships": [],
                            "presences": [],
                        },
                    )
                    await self._dispatch("GUILD_CREATE", self._guild())
                    self._ws_ready, self._ready_number = True, number
                elif op == 6:
                    if d.get("session_id") != self.session_id or d.get("token") != self.token:
                        await self._send(ws, {"op": 9, "d": False, "s": None, "t": None})
                        continue
                    self._ws = ws
                    await self._dispatch("RESUMED", {})
                    self._ws_ready, self._ready_number = True, number
                await self._notify()
        finally:
            self._all_ws.discard(ws)
            if self._ws is ws:
                self._ws, self._ws_ready = None, False
            await self._notify()
        return ws

    async def drop_gateway(
        self, code: int = 4000, *, resume: bool = True, wait: bool = True, timeout: float = WAIT
    ) -> None:
        """Close the bot's websocket; by default wait until it has reconnected (RESUMED, or READY after a new
        IDENTIFY when resume=False: the RESUME is then refused with op 9). Pass wait=False for codes discord.py
        does not reconnect on (4004, 4010-4014)."""
        ws, before = self._ws, self.gateway_connections
        if ws is None:
            raise RuntimeError("no bot connected to the fake gateway")
        self._ws, self._ws_ready = None, False
        if not resume:
            self.session_id = None
        await ws.close(code=code)
        if wait:
            await self._wait(lambda: self.gateway_connections > before and self._ws_ready, timeout, "gateway reconnect")

    # ---- interactions ---------------------------------------------------------------------------
    async def interact(self, itype: int, data: dict, *, user_id: int, extra: dict | None = None) -> FakeInteraction:
        """Dispatch any INTERACTION_CREATE (e.g. type 4 autocomplete); `extra` adds/overrides top-level keys."""
        await self.wait_ready()
        iid = self._snowflake()
        payload = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "token": f"itok{iid}{secrets.token_hex(4)}",
            "version": 1,
            "guild_id": str(self.guild_id),
            "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(self.channel_id),
            "channel": self.channels[self.channel_id],
            "member": self._member_payload(user_id),
            "app_permissions": str(
                self.permissions_in(self.channel_id, self.bot_user_id)
                if self.app_permissions is None
                else self.app_permissions
            ),
            "locale": "en-US",
            "guild_locale": "en-US",
            "attachment_size_limit": self.attachment_size_limit,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            **(extra or {}),
        }
        inter = FakeInteraction(self, payload)
        self.interactions[iid] = inter
        inter.sent_at = time.monotonic()
        await self._dispatch("INTERACTION_CREATE", payload)
        return inter

    async def slash(
        self,
        name: str,
        options: dict | None = None,
        *,
        user_id: int,
        subcommands: Iterable[str] = (),
        raw_options: list[dict] | None = None,
        resolved_users: Iterable[int] = (),
        extra: dict | None = None,
    ) -> FakeInteraction:
        cmd = self.synced_commands.get(name)
        declared = (cmd or {}).get("options", [])
        subcommands = list(subcommands)
        for sub in subcommands:  # walk the declared option tree down to the leaf command
            found = next((o for o in declared if o.get("name") == sub), {})
            declared = found.get("options", [])
        resolved_ids = {int(u) for u in resolved_users}
        roles: set[int] = set()
        if raw_options is not None:
            opts = raw_options
        else:
            opts = []
            for key, value in (options or {}).items():
                decl = next((o for o in declared if o.get("name") == key), None)
                otype = decl["type"] if decl else OPTION_TYPES.get(type(value), 3)
                if otype in (6, 7, 8, 9, 11):
                    value = str(getattr(value, "id", value))  # snowflake options carry the id as a string
                    if otype in (6, 9):
                        resolved_ids.add(int(value))
                    elif otype == 8:
                        roles.add(int(value))
                opts.append({"name": key, "type": otype, "value": value})
        for sub, otype in zip(reversed(subcommands), [1] + [2] * len(subcommands), strict=False):
            opts = [{"name": sub, "type": otype, "options": opts}]
        data: dict[str, Any] = {
            "id": (cmd or {}).get("id", str(self._snowflake())),
            "name": name,
            "type": 1,
            "options": opts,
        }
        if cmd is None or cmd.get("guild_id"):
            data["guild_id"] = str(self.guild_id)
        resolved: dict[str, dict] = {}
        if resolved_ids:
            resolved["users"] = {str(u): self._user(u) for u in resolved_ids}
            resolved["members"] = {
                str(u): {k: v for k, v in self._member_payload(u).items() if k != "user"}
                for u in resolved_ids
                if u in self.members
            }
        if roles:
            resolved["roles"] = {
                str(r): self.roles.get(r) or {**self.roles[self.guild_id], "id": str(r), "name": f"role-{r}"}
                for r in roles
            }
        if resolved:
            data["resolved"] = resolved
        return await self.interact(2, data, user_id=user_id, extra=extra)

    def other_guild(self, guild_id: int, user_id: int, permissions: int = 0) -> dict:
        """`extra` for an interaction from another server the bot was invited to (not in its READY),
        where `user_id` holds `permissions` (e.g. MANAGE_GUILD: that server's own admin)."""
        member = {**self._member(user_id, f"user{user_id}", []), "permissions": str(permissions)}
        channel = {**self._text_channel(guild_id + 1, "elsewhere"), "guild_id": str(guild_id)}
        return {
            "guild_id": str(guild_id),
            "guild": {"id": str(guild_id), "locale": "en-US", "features": []},
            "channel_id": channel["id"],
            "channel": channel,
            "member": member,
            "authorizing_integration_owners": {"0": str(guild_id)},
        }

    async def click(
        self,
        message_id: int,
        custom_id: int | str,
        *,
        user_id: int,
        component_type: int = 2,
        values: list[str] | None = None,
    ) -> FakeInteraction:
        message = self.messages.get(int(message_id)) or self._message_stub(int(message_id))
        data: dict[str, Any] = {"custom_id": str(custom_id), "component_type": component_type}
        if values is not None:
            data["values"] = values
        return await self.interact(3, data, user_id=user_id, extra={"message": message})

    async def submit_modal(
        self, custom_id: str, values: dict[str, str], *, user_id: int, message_id: int | None = None
    ) -> FakeInteraction:
        """INTERACTION_CREATE type 5 (MODAL_SUBMIT); `values` maps text input custom_id -> text."""
        rows = [{"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in values.items()]
        extra = {"message": self.messages.get(message_id) or self._message_stub(message_id)} if message_id else None
        return await self.interact(5, {"custom_id": custom_id, "components": rows}, user_id=user_id, extra=extra)

    # ---- messages -------------------------------------------------------------------------------
    def _message_stub(self, mid: int, channel_id: int | None = None, mtype: int = 0) -> dict:
        cid = channel_id or self.channel_id
        msg = {
            "id": str(mid),
            "type": mtype,
            "channel_id": str(cid),
            "author": self._bot_user(),
            "content": "",
            "embeds": [],
            "components": [],
            "attachments": [],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "timestamp": _now(),
            "edited_timestamp": None,
            "flags": 0,
            "guild_id": str(self.guild_id),
        }
        return msg

    def add_message(
        self,
        content: str = "",
        *,
        components: list | None = None,
        embeds: list | None = None,
        channel_id: int | None = None,
    ) -> dict:
        """A bot message that exists before the test (e.g. posted by an earlier run: persistent views)."""
        payload = {"content": content, "components": components or [], "embeds": embeds or []}
        return self._create_message(payload, [], channel_id=channel_id or self.channel_id)

    def _create_message(
        self,
        payload: dict,
        files: list,
        *,
        channel_id: int,
        mtype: int = 0,
        flags: int = 0,
        interaction: FakeInteraction | None = None,
    ) -> dict:
        msg = self._message_stub(self._snowflake(), channel_id, mtype)
        msg["flags"] = flags | (int(payload.get("flags") or 0) & ~LOADING)
        if interaction is not None:
            msg["webhook_id"] = msg["application_id"] = str(self.application_id)
            msg["interaction_metadata"] = self._interaction_metadata(interaction)
        self._apply(msg, payload, files, edit=False)
        self.messages[int(msg["id"])] = msg
        return msg

    @staticmethod
    def _interaction_metadata(interaction: FakeInteraction) -> dict:
        """What Discord puts on a message sent in answer to an interaction (discord.py 2.6 finds a
        command response's view by this id)."""
        p = interaction.payload
        meta = {
            "id": str(interaction.id),
            "type": p["type"],
            "user": (p.get("member") or {}).get("user") or p["user"],
            "authorizing_integration_owners": p.get("authorizing_integration_owners", {}),
        }
        if interaction.original_id is not None:  # a followup
            meta["original_response_message_id"] = str(interaction.original_id)
        if "message" in p:  # a component's interaction
            meta["interacted_message_id"] = p["message"]["id"]
        return meta

    def _apply(self, msg: dict, payload: dict, files: list, *, edit: bool = True) -> dict:
        payload = payload or {}
        if "content" in payload:
            msg["content"] = payload["content"] or ""
        if "embeds" in payload:
            msg["embeds"] = [{"type": "rich", **e} for e in payload["embeds"] or []]
        if "components" in payload:
            msg["components"] = payload["components"] or []
        for key in ("tts", "message_reference", "sticker_ids"):
            if key in payload and not edit:
                msg[key] = payload[key]
        if edit:  # filling a deferred "thinking..." message is not an edit; the ephemeral bit never changes
            if not msg["flags"] & LOADING:
                msg["edited_timestamp"] = _now()
            keep = msg["flags"] & EPHEMERAL
            msg["flags"] = (
                keep | (int(payload["flags"] or 0) & ~(EPHEMERAL | LOADING))
                if "flags" in payload
                else msg["flags"] & ~LOADING
            )
        new = dict(files)
        if "attachments" in payload:
            old = {a["id"]: a for a in msg["attachments"]}
            out = []
            for a in payload["attachments"] or []:
                if str(a.get("id")) in old:
                    out.append(old[str(a["id"])])
                elif str(a.get("id")) in new:
                    out.append(self._attachment(msg, new.pop(str(a["id"])), a.get("description")))
            msg["attachments"] = out + [self._attachment(msg, f) for f in new.values()]
        else:
            msg["attachments"] = msg["attachments"] + [self._attachment(msg, f) for f in new.values()]
        return msg

    def _attachment(self, msg: dict, f: dict, description: str | None = None) -> dict:
        aid = self._snowflake()
        self.attachment_data[aid] = data = f["data"]
        url = f"{self.base_url}/attachments/{msg['channel_id']}/{aid}/{f['filename']}"
        ctype = mimetypes.guess_type(f["filename"])[0] or f["content_type"] or "application/octet-stream"
        att = {
            "id": str(aid),
            "filename": f["filename"],
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": ctype,
            "height": None,
            "width": None,
            "ephemeral": bool(msg["flags"] & EPHEMERAL),
        }
        if description:
            att["description"] = description
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
            att["width"], att["height"] = struct.unpack(">II", data[16:24])
        return att

    def _delete(self, mid: int) -> None:
        self.messages.pop(mid, None)
        self.deleted_message_ids.append(mid)

    # ---- REST -----------------------------------------------------------------------------------
    async def _attachment_handler(self, request: web.Request) -> web.Response:
        data = self.attachment_data.get(int(request.match_info["aid"]))
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _rest_handler(self, request: web.Request) -> web.Response:
        received_at = time.monotonic()
        path = "/" + request.match_info["tail"]
        path = path[len("/api/v10") :] if path.startswith("/api/v10/") else path
        body, files = None, []
        if request.content_type.startswith("multipart/"):
            async for part in await request.multipart():
                raw = await part.read()
                if part.name == "payload_json":
                    body = json.loads(raw)
                elif part.name and part.name.startswith("files["):
                    files.append(
                        (
                            part.name[6:-1],
                            {
                                "filename": part.filename,
                                "data": bytes(raw),
                                "content_type": part.headers.get("Content-Type"),
                            },
                        )
                    )
        elif request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
        event = Event(request.method, path, body, [f for _, f in files], dict(request.query), received_at=received_at)
        for hold in list(self._holds):
            named = any((f["filename"] or "").startswith(hold.file_prefix) for _, f in files)
            if hold.method in ("*", request.method) and hold.pattern.search(path) and (not hold.with_files or named):
                self._holds.remove(hold)
                hold.arrived.set()
                await hold.release.wait()  # the request is "in flight" until the test lets it through
                break
        fail = self._take_fail(request.method, path)
        headers = {}
        if fail is not None and not fail[6]:
            status, result, headers = fail[2], fail[3], fail[4]
        elif (
            not path.startswith(("/webhooks/", "/interactions/"))
            and request.headers.get("Authorization") != f"Bot {self.token}"
        ):
            status, result = _err(401, 0, "401: Unauthorized")
        else:
            status, result = _err(404, 0, "404: Not Found")
            for method, pattern, name in ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method == request.method:
                    try:
                        status, result = await getattr(self, name)(event, files, **m.groupdict())
                    except Exception as exc:  # a 400 (not 500: discord.py retries those slowly); kept for asserts
                        self.errors.append(exc)
                        status, result = _err(400, 50035, f"Invalid Form Body (fake: {exc!r})")
                    break
        if fail is not None and fail[6]:  # done, but answered with the error
            status, result, headers = fail[2], fail[3], fail[4]
        event.status, event.response = status, result
        self.events.append(event)
        await self._notify()
        if result is None:
            return web.Response(status=status, headers=headers)
        return web.Response(
            status=status, body=json.dumps(result).encode(), headers={"Content-Type": "application/json", **headers}
        )

    async def _get_me(self, ev, files):
        return 200, self._bot_user()

    async def _get_app(self, ev, files):
        return 200, {
            "id": str(self.application_id),
            "name": "FakeBot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "00",
            "flags": 0,
            "owner": self._user(self.owner_id),
            "team": None,
            "interactions_endpoint_url": None,
        }

    async def _get_gateway(self, ev, files):
        return 200, {
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
        }

    async def _put_commands(self, ev, files, app, guild=None):
        scope = int(guild) if guild else None
        old = {c["name"]: c for c in self.commands_by_scope.get(scope, [])}
        out = []
        for cmd in ev.json or []:
            echo = {
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                **cmd,
                "id": old.get(cmd["name"], {}).get("id", str(self._snowflake())),
                "application_id": app,
                "version": str(self._snowflake()),
            }
            if scope:
                echo["guild_id"] = str(scope)
            out.append(echo)
            self.synced_commands[cmd["name"]] = echo
        self.commands_by_scope[scope] = out
        return 200, out

    async def _get_commands(self, ev, files, app, guild=None):
        return 200, self.commands_by_scope.get(int(guild) if guild else None, [])

    async def _callback(self, ev, files, iid, token):
        inter = self.interactions.get(int(iid))
        if inter is None or inter.token != token:
            return _err(404, 10062, "Unknown interaction")
        if inter.responded:
            return _err(400, 40060, "Interaction has already been acknowledged.")
        inter.responded = True
        body = ev.json or {}
        rtype, data = body.get("type"), body.get("data") or {}
        is_command = inter.payload["type"] == 2
        msg = None
        if rtype in (4, 5):
            flags = (int(data.get("flags") or 0) & EPHEMERAL) | (LOADING if rtype == 5 else 0)
            msg = self._create_message(
                data if rtype == 4 else {},
                files,
                channel_id=self.channel_id,
                mtype=20 if is_command else 0,
                flags=flags,
                interaction=inter,
            )
            inter.original_id = int(msg["id"])
        elif rtype in (6, 7) and "message" in inter.payload:
            mid = int(inter.payload["message"]["id"])
            inter.original_id = mid
            base = self.messages.setdefault(mid, dict(inter.payload["message"]))  # a stub becomes known
            if rtype == 7:
                msg = self._apply(base, data, files)
        if "with_response" not in ev.query or ev.query["with_response"] in ("0", "false"):
            return 204, None
        result: dict[str, Any] = {
            "interaction": {
                "id": iid,
                "type": inter.payload["type"],
                "activity_instance_id": None,
                "response_message_id": msg["id"] if msg else None,
                "response_message_loading": rtype == 5,
                "response_message_ephemeral": bool(msg and msg["flags"] & EPHEMERAL),
            },
            "resource": {"type": rtype},
        }
        if msg is not None and rtype in (4, 7):
            result["resource"]["message"] = msg
        return 200, result

    def _webhook_message(self, app, token, mid):
        inter = next((i for i in self.interactions.values() if i.token == token), None)
        if inter is None or app != str(self.application_id):
            return None, _err(404, 10015, "Unknown Webhook")
        mid = inter.original_id if mid == "@original" else int(mid)
        if mid not in self.messages:
            return None, _err(404, 10008, "Unknown Message")
        return mid, None

    async def _wh_get(self, ev, files, app, token, mid):
        mid, err = self._webhook_message(app, token, mid)
        return err or (200, self.messages[mid])

    async def _wh_edit(self, ev, files, app, token, mid):
        mid, err = self._webhook_message(app, token, mid)
        return err or (200, self._apply(self.messages[mid], ev.json, files))

    async def _wh_delete(self, ev, files, app, token, mid):
        mid, err = self._webhook_message(app, token, mid)
        if err:
            return err
        self._delete(mid)
        return 204, None

    async def _wh_followup(self, ev, files, app, token):
        inter = next((i for i in self.interactions.values() if i.token == token), None)
        if inter is None or app != str(self.application_id):
            return _err(404, 10015, "Unknown Webhook")
        if not inter.responded:
            return _err(404, 10015, "Unknown Webhook")
        original = self.messages.get(inter.original_id)
        if original is not None and original["flags"] & LOADING:  # Discord: 1st followup replaces "thinking..."
            msg = self._apply(original, ev.json, files)
        else:
            msg = self._create_message(
                ev.json or {},
                files,
                channel_id=self.channel_id,
                interaction=inter,
                mtype=20 if inter.payload["type"] == 2 else 0,
            )
        inter.followups.append(msg)
        return (200, msg) if ev.query.get("wait") in ("1", "true", "True") else (204, None)

    def _channel_message(self, cid, mid=None):
        if int(cid) not in self.channels:
            return _err(404, 10003, "Unknown Channel")
        msg = self.messages.get(int(mid)) if mid else None
        if mid and (msg is None or msg["channel_id"] != cid or msg["flags"] & EPHEMERAL):
            return _err(404, 10008, "Unknown Message")
        return None

    def _bot_lacks(self, cid, needed: int):
        """Discord's refusal of a bot request in a channel: 50001 without VIEW_CHANNEL, else 50013."""
        perms = self.permissions_in(int(cid), self.bot_user_id)
        if not perms & VIEW_CHANNEL:
            return _err(403, 50001, "Missing Access")
        if perms & needed != needed:
            return _err(403, 50013, "Missing Permissions")
        return None

    async def _ch_post(self, ev, files, cid):
        err = self._channel_message(cid) or self._bot_lacks(cid, SEND_MESSAGES | (ATTACH_FILES if files else 0))
        if err:
            return err
        body, now = ev.json or {}, time.monotonic()
        key = (cid, str(body.get("nonce")))
        if body.get("nonce") is not None and body.get("enforce_nonce"):
            seen = self._nonces.get(key)
            if seen and now - seen[0] < 300 and seen[1] in self.messages:
                return 200, self.messages[seen[1]]
        msg = self._create_message(body, files, channel_id=int(cid))
        if body.get("nonce") is not None:
            msg["nonce"] = body["nonce"]
            self._nonces[key] = (now, int(msg["id"]))
        return 200, msg

    async def _ch_list(self, ev, files, cid):
        err = self._channel_message(cid) or self._bot_lacks(cid, 0)
        if err:
            return err
        if not self.permissions_in(int(cid), self.bot_user_id) & READ_MESSAGE_HISTORY:
            return 200, []  # Discord's answer without READ_MESSAGE_HISTORY: no messages, not an error
        q = ev.query
        ids = sorted(
            (i for i, m in self.messages.items() if m["channel_id"] == cid and not m["flags"] & EPHEMERAL), reverse=True
        )
        ids = [i for i in ids if int(q.get("before", 1 << 64)) > i > int(q.get("after", 0))]
        return 200, [self.messages[i] for i in ids[: int(q.get("limit", 50))]]

    async def _ch_get(self, ev, files, cid, mid):
        return self._channel_message(cid, mid) or (200, self.messages[int(mid)])

    async def _ch_edit(self, ev, files, cid, mid):
        return self._channel_message(cid, mid) or (200, self._apply(self.messages[int(mid)], ev.json, files))

    async def _ch_delete(self, ev, files, cid, mid):
        err = self._channel_message(cid, mid)
        if err:
            return err
        self._delete(int(mid))
        return 204, None

    async def _get_channel(self, ev, files, cid):
        channel = self.channels.get(int(cid))
        if channel is None:
            return _err(404, 10003, "Unknown Channel")
        return self._bot_lacks(cid, 0) or (200, channel)

    async def _no_content(self, ev, files, **kw):
        return 204, None

    async def _get_member(self, ev, files, gid, uid):
        if int(gid) != self.guild_id or int(uid) not in self.members:
            return _err(404, 10007, "Unknown Member")
        return 200, self.members[int(uid)]


_CMDS = r"/applications/(?P<app>\d+)(?:/guilds/(?P<guild>\d+))?/commands"
_WH_MSG = r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<mid>@original|\d+)"
_CH_MSG = r"/channels/(?P<cid>\d+)/messages/(?P<mid>\d+)"
ROUTES = [
    ("GET", r"/users/@me", "_get_me"),
    ("GET", r"/oauth2/applications/@me", "_get_app"),
    ("GET", r"/gateway(?:/bot)?", "_get_gateway"),
    ("PUT", _CMDS, "_put_commands"),
    ("GET", _CMDS, "_get_commands"),
    ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", "_callback"),
    ("GET", _WH_MSG, "_wh_get"),
    ("PATCH", _WH_MSG, "_wh_edit"),
    ("DELETE", _WH_MSG, "_wh_delete"),
    ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", "_wh_followup"),
    ("POST", r"/channels/(?P<cid>\d+)/messages", "_ch_post"),
    ("GET", r"/channels/(?P<cid>\d+)/messages", "_ch_list"),
    ("GET", _CH_MSG, "_ch_get"),
    ("PATCH", _CH_MSG, "_ch_edit"),
    ("DELETE", _CH_MSG, "_ch_delete"),
    ("GET", r"/channels/(?P<cid>\d+)", "_get_channel"),
    ("POST", r"/channels/\d+/typing", "_no_content"),
    ("PUT", _CH_MSG + r"/reactions/[^/]+/@me", "_no_content"),
    ("DELETE", _CH_MSG + r"/reactions/[^/]+/@me", "_no_content"),
    ("GET", r"/guilds/(?P<gid>\d+)/members/(?P<uid>\d+)", "_get_member"),
]
