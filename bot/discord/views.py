"""Result buttons. Their custom id carries the job id, so they keep working after a restart."""

from __future__ import annotations

import logging
import re

import discord

from . import messages

log = logging.getLogger("fluxbot.discord")
PREFIX = "fluxbot:"


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"fluxbot:reroll:(?P<job_id>[0-9]+)"):
    def __init__(self, job_id: int):
        super().__init__(discord.ui.Button(label="Re-roll", emoji="🎲", style=discord.ButtonStyle.primary,
                                           custom_id=f"{PREFIX}reroll:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        from .commands import reroll
        await reroll(interaction, self.job_id)


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button], template=r"fluxbot:delete:(?P<job_id>[0-9]+)"):
    def __init__(self, job_id: int):
        super().__init__(discord.ui.Button(label="Delete", emoji="🗑️", style=discord.ButtonStyle.secondary,
                                           custom_id=f"{PREFIX}delete:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        from .commands import delete_result
        await delete_result(interaction, self.job_id)


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerollButton(job_id))
    view.add_item(DeleteButton(job_id))
    return view


async def answer_stray_component(interaction: discord.Interaction) -> None:
    """A click on a `fluxbot:` button no handler took (old or forged custom id): answer it anyway."""
    if interaction.type is not discord.InteractionType.component or interaction.response.is_done():
        return
    custom_id = (interaction.data or {}).get("custom_id", "")
    if not isinstance(custom_id, str) or not custom_id.startswith(PREFIX):
        return
    on_message = {getattr(child, "custom_id", None)
                  for row in (interaction.message.components if interaction.message else [])
                  for child in getattr(row, "children", [row])}
    if custom_id in on_message and re.fullmatch(r"fluxbot:(reroll|delete):[0-9]+", custom_id):
        return  # a dynamic item handles it (discord.py ignores ids that are not on the message)
    await interaction.response.send_message("This button is no longer active.", ephemeral=True,
                                            allowed_mentions=messages.NO_PINGS)
