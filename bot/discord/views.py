"""Result buttons: Re-roll and Delete, each a `DynamicItem` that owns its callback.

Their custom id carries the job id, so they keep working after a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import discord

from ..store import StoreBusy
from ..validation import ValidationError, check_prompt, check_seed
from . import messages
from .interactions import ANSWER_DEADLINE_S, Interaction, enqueue, is_admin, tell

log = logging.getLogger("fluxbot.discord")
PREFIX = "fluxbot:"
REROLL_ID = re.compile(rf"{PREFIX}reroll:(?P<job_id>[0-9]+)")
DELETE_ID = re.compile(rf"{PREFIX}delete:(?P<job_id>[0-9]+)")
JOB_BUTTON_ID = re.compile(rf"{PREFIX}(?:reroll|delete):[0-9]+")  # any of the buttons above


class RerollButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=REROLL_ID):
    """Paint the same prompt at the same size again with a new seed, for whoever clicks (charged to them)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=messages.REROLL_LABEL,
                emoji="🎲",
                style=discord.ButtonStyle.primary,
                custom_id=f"{PREFIX}reroll:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> RerollButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        bot = interaction.client
        started = time.monotonic()
        try:  # the reading and the admission share Discord's 3 s
            job = await bot.store.get_job(self.job_id, deadline_s=ANSWER_DEADLINE_S / 2)
        except StoreBusy:
            await tell(interaction, messages.DATABASE_BUSY)
            return
        if job is None:
            await tell(interaction, messages.unknown_job(self.job_id, action="re-rolled"))
            return
        gen = bot.settings.generation
        try:  # the rules may have changed since the image was made
            prompt = check_prompt(
                job.prompt, max_chars=gen.max_prompt_chars, blocked_terms=bot.settings.moderation.blocked_terms
            )
        except ValidationError as exc:
            await tell(interaction, messages.cannot_reroll(exc))
            return
        seed, _ = check_seed(None)
        params = dataclasses.replace(job.params(), prompt=prompt, seed=seed, steps=min(job.steps, gen.max_steps))
        left = max(0.2, ANSWER_DEADLINE_S - (time.monotonic() - started))
        await enqueue(interaction, params, "reroll", deadline_s=left)


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=DELETE_ID):
    """Delete the result message: for the member who asked for it, or an admin."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=messages.DELETE_LABEL,
                emoji="🗑️",
                style=discord.ButtonStyle.secondary,
                custom_id=f"{PREFIX}delete:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> DeleteButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        try:
            job = await interaction.client.store.get_job(self.job_id, deadline_s=ANSWER_DEADLINE_S)
        except StoreBusy:
            await tell(interaction, messages.DATABASE_BUSY)
            return
        if job is None:
            await tell(interaction, messages.unknown_job(self.job_id))
            return
        if interaction.user.id != job.user_id and not is_admin(interaction):
            await tell(interaction, messages.only_owner_deletes(job.user_id))
            return
        await interaction.response.defer()
        await interaction.delete_original_response()


RESULT_BUTTONS = (RerollButton, DeleteButton)


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in RESULT_BUTTONS:
        view.add_item(button(job_id))
    return view


async def answer_stray_component(interaction: Interaction) -> None:
    """A click no handler took (an old, forged or foreign custom id): answer it anyway. Discord sends
    an application only the clicks on its own messages, so every component interaction is ours."""
    if interaction.type is not discord.InteractionType.component or interaction.response.is_done():
        return
    data: Mapping[str, object] = interaction.data or {}
    custom_id = data.get("custom_id", "")
    on_message = {
        getattr(child, "custom_id", None)
        for row in (interaction.message.components if interaction.message else [])
        for child in getattr(row, "children", [row])
    }
    if isinstance(custom_id, str) and custom_id in on_message and JOB_BUTTON_ID.fullmatch(custom_id):
        return  # a dynamic item handles it (discord.py ignores ids that are not on the message)
    await interaction.response.send_message(
        messages.BUTTON_INACTIVE, ephemeral=True, allowed_mentions=messages.NO_PINGS
    )
