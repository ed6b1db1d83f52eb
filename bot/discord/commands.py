"""Slash commands: each handler checks what the member sent, then admits, answers or changes a quota.

The handlers are plain module-level functions; `build_commands` registers them as the command tree's
commands. Only `/imagine`'s signature is made per bot, because Discord shows and enforces its step
range, which comes from the settings.
"""

# No `from __future__ import annotations`: discord.py reads the option annotations at runtime, and
# /imagine's step range is a local value (a string annotation could not name it).

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import discord
from discord import app_commands

from ..config import Settings
from ..jobs import CancelOutcome
from ..logs import redact
from ..params import MAX_COUNT
from ..store import StoreBusy, StoreError
from ..validation import (
    MAX_SEED,
    ValidationError,
    check_imagine,
    check_member_settings,
    check_reset,
    size_presets,
)
from . import messages
from .interactions import ANSWER_DEADLINE_S, Interaction, enqueue, is_admin, tell

log = logging.getLogger("fluxbot.discord")
AdminHandler = TypeVar("AdminHandler", bound=Callable[..., Coroutine[Any, Any, None]])
MAX_LIMIT = 100_000


class NotAdmin(app_commands.CheckFailure):
    """A member who is not an admin called an admin command (answered in `on_tree_error`)."""


class AdminGroup(app_commands.Group):
    """Its commands run for admins only: discord.py runs this check before every one of them."""

    async def interaction_check(self, interaction: Interaction) -> bool:  # type: ignore[override]  # ours only
        if not is_admin(interaction):
            raise NotAdmin("admins only")
        return True


# ---------------------------------------------------------------- members' commands


async def imagine(
    interaction: Interaction, prompt: object, seed: object, steps: object, size: object, count: object = None
) -> None:
    """/imagine: every value is checked again here (a raw request can carry anything), what is not
    given comes from the member's /settings (else the bot's), then it is admitted."""
    bot = interaction.client
    started = time.monotonic()
    try:  # the reading and the admission share Discord's 3 s
        mine = await bot.store.member_settings(interaction.user.id, deadline_s=ANSWER_DEADLINE_S / 2)
    except StoreBusy:
        await tell(interaction, messages.DATABASE_BUSY)
        return
    try:
        params = check_imagine(
            prompt, seed, steps, size, bot.settings.generation, bot.settings.moderation, mine, count=count
        )
    except ValidationError as exc:
        await tell(interaction, messages.not_queued(exc))
        return
    left = max(0.2, ANSWER_DEADLINE_S - (time.monotonic() - started))
    await enqueue(interaction, params, "imagine", deadline_s=left, units=params.count)  # a grid: one unit an image


async def member_settings(
    interaction: Interaction, size: object, steps: object, count: object, previews: object, reset: object
) -> None:
    """/settings: without options it shows the member's defaults; with some it changes those (after
    `reset`, which forgets the rest) and shows the result. A bad value changes nothing."""
    bot = interaction.client
    try:
        changes = check_member_settings(size, steps, count, previews, bot.settings.generation)
        forget = check_reset(reset)
    except ValidationError as exc:
        await tell(interaction, messages.settings_refused(exc))
        return
    store, user = bot.store, interaction.user.id
    try:
        if changes.is_empty() and not forget:
            mine = await store.member_settings(user, deadline_s=ANSWER_DEADLINE_S)
        else:
            mine = await store.update_member_settings(user, changes, reset=forget, deadline_s=ANSWER_DEADLINE_S)
    except StoreBusy:
        await tell(interaction, messages.DATABASE_FAILED)
        return
    await tell(interaction, messages.settings_text(mine, bot.settings, changed=forget or not changes.is_empty()))


async def show_queue(interaction: Interaction) -> None:
    queue = interaction.client.queue
    listing = messages.queue_listing(queue.running, queue.waiting(), interaction.user.id, admin=is_admin(interaction))
    await tell(interaction, listing)


async def cancel(interaction: Interaction) -> None:
    outcome, job = await interaction.client.queue.cancel(interaction.user.id)
    if outcome is CancelOutcome.CANCELLED and job is not None:
        await tell(interaction, messages.cancelled_waiting(job.id, relax=job.relax))
    elif outcome is CancelOutcome.STOPPING and job is not None:
        await tell(interaction, messages.stopping(job.id, relax=job.relax))
    elif outcome is CancelOutcome.TOO_LATE and job is not None:
        await tell(interaction, messages.too_late_to_cancel(job.id))
    else:
        await tell(interaction, messages.NOTHING_TO_CANCEL)


async def quota(interaction: Interaction) -> None:
    try:
        status = await interaction.client.store.quota_status(interaction.user.id, deadline_s=ANSWER_DEADLINE_S)
    except StoreBusy:
        await tell(interaction, messages.DATABASE_BUSY)
        return
    await tell(interaction, messages.quota_text(status, relax=interaction.client.settings.quota.relax))


# ---------------------------------------------------------------- admin commands


def answered_in_time(handler: AdminHandler) -> AdminHandler:
    """Run an admin command; if the ledger keeps it busy (another writer's lock) past the answer
    deadline, acknowledge first (Discord drops what is unanswered in 3 s) and answer when done."""

    @functools.wraps(handler)
    async def run(interaction: Interaction, *args: Any, **kwargs: Any) -> None:
        work = asyncio.ensure_future(handler(interaction, *args, **kwargs))
        await asyncio.wait({work}, timeout=ANSWER_DEADLINE_S)
        if not work.done() and not interaction.response.is_done():
            await interaction.response.defer(ephemeral=True, thinking=True)
        await work

    return cast(AdminHandler, run)


async def _checked_limit(interaction: Interaction, limit: object) -> int | None:
    """The checked limit, or None after telling the caller why not. discord.py does not
    enforce the option's range on what a client sends."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
        await tell(interaction, messages.bad_limit(MAX_LIMIT))
        return None
    return limit


async def _show_member(interaction: Interaction, user: discord.abc.User) -> None:
    status = await interaction.client.store.quota_status(user.id)
    await tell(interaction, messages.quota_text(status, whose=f"<@{user.id}> has"))


@app_commands.describe(user=messages.OPTION_MEMBER, limit=messages.OPTION_LIMIT.format(max_limit=MAX_LIMIT))
@answered_in_time
async def quota_set(interaction: Interaction, user: discord.User, limit: app_commands.Range[int, 0, MAX_LIMIT]) -> None:
    value = await _checked_limit(interaction, limit)
    if value is None:
        return
    await interaction.client.store.set_user_limit(user.id, value)
    await _show_member(interaction, user)


@app_commands.describe(user=messages.OPTION_MEMBER)
@answered_in_time
async def quota_reset(interaction: Interaction, user: discord.User) -> None:
    await interaction.client.store.reset_usage(user.id)
    await _show_member(interaction, user)


@app_commands.describe(user=messages.OPTION_MEMBER)
@answered_in_time
async def quota_show(interaction: Interaction, user: discord.User) -> None:
    await _show_member(interaction, user)


@app_commands.describe(limit=messages.OPTION_LIMIT.format(max_limit=MAX_LIMIT))
@answered_in_time
async def quota_default(interaction: Interaction, limit: app_commands.Range[int, 0, MAX_LIMIT]) -> None:
    value = await _checked_limit(interaction, limit)
    if value is None:
        return
    await interaction.client.store.set_default_limit(value)
    await tell(interaction, messages.default_limit_set(value))


@answered_in_time
async def admin_stats(interaction: Interaction) -> None:
    bot = interaction.client
    stats = await bot.store.stats()
    await tell(
        interaction,
        messages.stats_text(
            stats,
            queue_depth=len(bot.queue.waiting()) + (bot.queue.running is not None),
            peak_vram_gib=bot.queue.last_peak_vram_gib,
        ),
    )


# ---------------------------------------------------------------- the tree


def imagine_command(settings: Settings) -> app_commands.Command[Any, ..., None]:
    """/imagine with this bot's step range, sizes and prompt length in what Discord shows and enforces."""
    gen = settings.generation
    presets = size_presets(gen.width, gen.height)

    async def imagine_options(
        interaction: Interaction,
        prompt: str,
        seed: app_commands.Range[int, -1, MAX_SEED] | None = None,
        steps: app_commands.Range[int, 1, gen.max_steps] | None = None,
        size: str | None = None,
        count: app_commands.Range[int, 1, MAX_COUNT] | None = None,
    ) -> None:
        await imagine(interaction, prompt, seed, steps, size, count)

    command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name="imagine", description=messages.IMAGINE, callback=imagine_options
    )
    app_commands.describe(
        prompt=messages.IMAGINE_PROMPT.format(max_chars=gen.max_prompt_chars),
        seed=messages.IMAGINE_SEED,
        steps=messages.IMAGINE_STEPS.format(max_steps=gen.max_steps, default_steps=gen.default_steps),
        size=messages.IMAGINE_SIZE,
        count=messages.IMAGINE_COUNT.format(max_count=MAX_COUNT),
    )(command)
    choices = [app_commands.Choice(name=p.label, value=p.name) for p in presets.values()]
    app_commands.choices(size=choices)(command)
    return command


def settings_command(settings: Settings) -> app_commands.Command[Any, ..., None]:
    """/settings with this bot's step range and sizes in what Discord shows and enforces."""
    gen = settings.generation
    presets = size_presets(gen.width, gen.height)

    async def settings_options(
        interaction: Interaction,
        size: str | None = None,
        steps: app_commands.Range[int, 1, gen.max_steps] | None = None,
        count: app_commands.Range[int, 1, MAX_COUNT] | None = None,
        previews: bool | None = None,
        reset: bool | None = None,
    ) -> None:
        await member_settings(interaction, size, steps, count, previews, reset)

    command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name="settings", description=messages.SETTINGS, callback=settings_options
    )
    app_commands.describe(
        size=messages.SETTINGS_SIZE,
        steps=messages.SETTINGS_STEPS.format(max_steps=gen.max_steps),
        count=messages.SETTINGS_COUNT.format(max_count=MAX_COUNT),
        previews=messages.SETTINGS_PREVIEWS,
        reset=messages.SETTINGS_RESET,
    )(command)
    app_commands.choices(size=[app_commands.Choice(name=p.label, value=p.name) for p in presets.values()])(command)
    return command


def build_commands(settings: Settings) -> list[app_commands.Command[Any, ..., None] | app_commands.Group]:
    """The command tree's top-level commands, shaped by the settings (step limit, sizes)."""
    admin = AdminGroup(  # discord.py runs a group's check for its own commands only: each group is one
        name="admin",
        description=messages.ADMIN,
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )
    admin.command(name="stats", description=messages.ADMIN_STATS)(admin_stats)
    quota_admin = AdminGroup(name="quota", description=messages.ADMIN_QUOTA, parent=admin)
    quota_admin.command(name="set", description=messages.QUOTA_SET)(quota_set)
    quota_admin.command(name="reset", description=messages.QUOTA_RESET)(quota_reset)
    quota_admin.command(name="show", description=messages.QUOTA_SHOW)(quota_show)
    quota_admin.command(name="default", description=messages.QUOTA_DEFAULT)(quota_default)
    return [
        imagine_command(settings),
        settings_command(settings),
        app_commands.Command(name="queue", description=messages.QUEUE, callback=show_queue),
        app_commands.Command(name="cancel", description=messages.CANCEL, callback=cancel),
        app_commands.Command(name="quota", description=messages.QUOTA, callback=quota),
        admin,
    ]


async def on_tree_error(interaction: Interaction, error: app_commands.AppCommandError) -> None:
    original = getattr(error, "original", error)
    if isinstance(original, (discord.Forbidden, discord.NotFound)):
        log.warning("Discord refused a reply: %s", redact(str(original)))
        return
    if isinstance(error, NotAdmin):
        text = messages.ADMIN_ONLY
    elif isinstance(error, app_commands.CommandNotFound):
        text = messages.UNKNOWN_COMMAND
    elif isinstance(error, app_commands.CommandSignatureMismatch):
        # A request whose options are not the command's (a stale client, or a hand-made payload).
        log.warning("a /%s request did not match the command's options; refused", error.command.qualified_name)
        text = messages.OPTIONS_MISMATCH
    elif isinstance(original, StoreError):  # a failed write was rolled back whole
        log.warning("a command's database work failed: %s", original)
        text = messages.DATABASE_FAILED
    elif isinstance(error, app_commands.TransformerError):
        text = messages.invalid_option(error.value)
    else:
        interaction.client.metrics.discord_error("command")
        log.error("command failed: %s", redact(repr(original)), exc_info=original)
        text = messages.INTERNAL_ERROR
    try:
        await tell(interaction, text)
    except discord.HTTPException:
        log.warning("could not tell the member about an error")
