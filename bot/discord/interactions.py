"""What every handler does with an interaction: answer privately, check admin rights, admit a job.

Shared by the slash commands (`commands.py`) and the result buttons (`views.py`), so neither
imports the other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeAlias

import discord

from ..params import JobParams
from ..store import AdmissionStatus, JobRecord, NewJob, StoreBusy
from . import messages

if TYPE_CHECKING:
    from .app import FluxBot

    Interaction: TypeAlias = discord.Interaction[FluxBot]
else:
    Interaction = discord.Interaction  # discord.py reads handler annotations at runtime

log = logging.getLogger("fluxbot.discord")

ANSWER_DEADLINE_S = 2.0
"""How long a handler waits for the database before answering "busy": Discord drops an
interaction not answered within 3 s."""


def is_admin(interaction: Interaction) -> bool:
    """Listed in `admin_user_ids`, or holding Manage Server in one of the bot's home servers.

    Quotas are the bot's, not a server's: Manage Server in any other server the bot was invited
    to (commands registered globally) must not let its owner set everyone's limits.
    """
    settings = interaction.client.settings.discord
    if interaction.user.id in settings.admin_user_ids:
        return True
    if interaction.guild_id is None or interaction.guild_id not in settings.home_guild_ids:
        return False
    perms = interaction.permissions
    return perms.manage_guild or perms.administrator


async def tell(interaction: Interaction, text: str) -> None:
    """A private answer, whether or not the interaction was acknowledged yet."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=messages.NO_PINGS)
    else:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=messages.NO_PINGS)


def new_job(
    interaction: Interaction, params: JobParams, origin: str, *, source_job_id: int | None = None, units: int = 1
) -> NewJob:
    """The ledger row a click or command asks for: its parameters, who asked, where, and how to answer."""
    return NewJob(
        **vars(params.params()),
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        interaction_id=interaction.id,
        interaction_token=interaction.token,
        interaction_created_at=interaction.created_at.timestamp(),
        application_id=interaction.application_id,
        origin=origin,
        upload_limit=interaction.filesize_limit or None,
        source_job_id=source_job_id,
        units=units,
    )


async def enqueue(
    interaction: Interaction,
    params: JobParams,
    origin: str,
    *,
    deadline_s: float = ANSWER_DEADLINE_S,
    source: JobRecord | None = None,
    units: int = 1,
) -> None:
    """Admit (ledger row + quota charge in one transaction), then acknowledge, then show the position
    (and, for a job admitted in relax mode, that it is free and waits for everyone else's). A result
    button's job names the result it came from (`source`, also said in the reply) and takes `units`."""
    bot = interaction.client
    new = new_job(interaction, params, origin, source_job_id=None if source is None else source.id, units=units)
    try:
        admission = await bot.queue.submit(new, deadline_s=deadline_s)
    except StoreBusy:
        log.warning("admission gave up: the database stayed locked for %.1f s", deadline_s)
        await tell(interaction, messages.DATABASE_BUSY)
        return
    if admission.status is not AdmissionStatus.ACCEPTED:
        await tell(interaction, messages.refusal(admission.status, admission.quota, bot.settings, units=units))
        return
    job = admission.job
    assert job is not None  # accepted admissions carry their row
    try:
        await interaction.response.defer(thinking=True)
        position = bot.queue.position(job.id)
        text = (
            messages.starting(compiling=bot.queue.compiles_first(job), relax=job.relax)
            if position == 0
            else messages.queued(position or 1, model_loading=not bot.queue.engine_ready.is_set(), relax=job.relax)
        )
        if source is not None:
            text = messages.derived_queued(job, source) + "\n" + text
        msg = await interaction.edit_original_response(content=text, allowed_mentions=messages.NO_PINGS)
    except discord.HTTPException as exc:
        # The job is admitted and charged: it still runs, and delivery finds another way
        # (a followup or the channel). Telling the member "something went wrong" would be false.
        log.warning("job %d: could not show its queue position (%s); it stays queued", job.id, exc)
        return
    await bot.queue.attach_message(job.id, msg.id)
