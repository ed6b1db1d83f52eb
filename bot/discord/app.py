"""The bot: a discord.py client that owns the store, the queue and the command tree."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import discord
from discord.ext import commands

from ..config import Settings
from ..engine.api import ImageEngine
from ..jobs import JobQueue
from ..metrics import Metrics, MetricsServer
from ..store import Store, StoreError
from . import messages
from .commands import build_commands, on_tree_error
from .delivery import DiscordDelivery
from .interactions import Interaction
from .views import RESULT_BUTTONS, answer_modal, answer_stray_component

log = logging.getLogger("fluxbot.discord")
HEALTH_DB_DEADLINE_S = 2.0


class NotReady(RuntimeError):
    """The store or queue was used before `setup_hook` made them."""


class FluxBot(commands.Bot):
    def __init__(self, settings: Settings, engine_loader: Callable[[], ImageEngine], **kwargs: Any) -> None:
        kwargs.setdefault("intents", discord.Intents.default())
        super().__init__(
            command_prefix=commands.when_mentioned, help_command=None, allowed_mentions=messages.NO_PINGS, **kwargs
        )
        self.settings = settings
        self.engine_loader = engine_loader
        self._store: Store | None = None
        self._queue: JobQueue | None = None
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None

    # Handlers reach these through `interaction.client`; they exist from setup_hook on.
    @property
    def store(self) -> Store:
        if self._store is None:
            raise NotReady("the bot's database is not open yet")
        return self._store

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            raise NotReady("the bot's queue is not running yet")
        return self._queue

    async def setup_hook(self) -> None:
        # Runs once, after login and before the gateway connects (on_ready may fire many times).
        s = self.settings
        self._store = await Store.open(s.storage.database, default_daily_limit=s.quota.daily_limit)
        delivery = DiscordDelivery(self, store=self._store, previews=s.discord.previews)
        self._queue = JobQueue(self._store, s, delivery, self.engine_loader, metrics=self.metrics)
        address = s.metrics.address
        if address is not None:
            self._metrics_server = MetricsServer(self.metrics, self.health)
            await self._metrics_server.start(*address)
        for command in build_commands(s):
            self.tree.add_command(command)
        self.tree.error(on_tree_error)
        self.add_dynamic_items(*RESULT_BUTTONS)
        # Sync before the worker starts: if Discord cannot be reached here, the login is retried
        # with a fresh bot, and closing this one must not wait for a model load under way.
        await self.sync_commands()
        await self._queue.start()

    async def sync_commands(self) -> None:
        if self.settings.discord.guild_ids:
            for gid in self.settings.discord.guild_ids:
                guild = discord.Object(gid)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to guild %d", len(synced), gid)
        else:
            synced = await self.tree.sync()
            log.info("synced %d global commands (they may take up to an hour to appear)", len(synced))

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (id %s) to %d guild(s)", self.user, self.user.id if self.user else "?", len(self.guilds)
        )

    async def on_interaction(self, interaction: Interaction) -> None:
        if interaction.type is discord.InteractionType.modal_submit:
            await answer_modal(interaction)  # Remix's form: discord.py keeps none of ours (views.remix_form)
            return
        await answer_stray_component(interaction)

    async def health(self) -> dict[str, bool]:
        """What /health reports: each must hold for the bot to be healthy."""
        gateway = self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open
        try:
            await self.store.ping(deadline_s=HEALTH_DB_DEADLINE_S)
            database = True
        except (StoreError, NotReady):
            database = False
        worker = self._queue is not None and self._queue.worker_alive
        return {"gateway": gateway, "database": database, "worker": worker}

    async def close(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._queue is not None:
            await self._queue.stop()
        if self._store is not None:
            await self._store.close()
        await super().close()
