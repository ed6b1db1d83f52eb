"""Result buttons. Their custom id carries the job id, so they keep working after a restart."""

from __future__ import annotations

import logging
import re

import discord

from . import messages
from .commands import delete_result, reroll

log = logging.getLogger("fluxbot.discord")
PREFIX = "fluxbot:"


# Each result button: its action name (in the custom id), its looks, and what a click does.
ACTIONS = {"reroll": ("Re-roll", "🎲", discord.ButtonStyle.primary, reroll),
           "delete": ("Delete", "🗑️", discord.ButtonStyle.secondary, delete_result)}
JOB_BUTTON_ID = re.compile(rf"{PREFIX}(?P<action>{'|'.join(ACTIONS)}):(?P<job_id>[0-9]+)")


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=JOB_BUTTON_ID):
    """Re-roll or Delete on a result; the action and the job id live in the custom id."""

    def __init__(self, action: str, job_id: int):
        label, emoji, style, _ = ACTIONS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style,
                                           custom_id=f"{PREFIX}{action}:{job_id}"))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match[str]):
        return cls(match["action"], int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        handler = ACTIONS[self.action][3]
        await handler(interaction, self.job_id)


def result_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        view.add_item(JobButton(action, job_id))
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
    if custom_id in on_message and JOB_BUTTON_ID.fullmatch(custom_id):
        return  # a dynamic item handles it (discord.py ignores ids that are not on the message)
    await interaction.response.send_message("This button is no longer active.", ephemeral=True,
                                            allowed_mentions=messages.NO_PINGS)
