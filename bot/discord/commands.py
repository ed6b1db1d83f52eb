"""Slash commands and button handlers: check, admit, acknowledge, hand over to the queue."""

# No `from __future__ import annotations`: discord.py reads the option annotations at runtime,
# and the step range comes from the settings.

import dataclasses
import logging

import discord
from discord import app_commands

from ..logs import redact
from ..jobs import CancelOutcome
from ..store import AdmissionStatus, NewJob
from ..params import JobParams
from ..validation import (MAX_SEED, ValidationError, check_imagine, check_prompt, check_seed,
                          size_presets)
from . import messages

log = logging.getLogger("fluxbot.discord")
MAX_LIMIT = 100_000


def is_admin(interaction: discord.Interaction) -> bool:
    settings = interaction.client.settings
    if interaction.user.id in settings.discord.admin_user_ids:
        return True
    perms = interaction.permissions
    return interaction.guild_id is not None and (perms.manage_guild or perms.administrator)


class NotAdmin(app_commands.CheckFailure):
    """A member who is not an admin called an admin command (answered in `on_tree_error`)."""


class AdminGroup(app_commands.Group):
    """Its commands run for admins only: discord.py runs this check before every one of them."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if not is_admin(interaction):
            raise NotAdmin("admins only")
        return True


async def tell(interaction: discord.Interaction, text: str) -> None:
    """A private answer, whether or not the interaction was acknowledged yet."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=messages.NO_PINGS)
    else:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=messages.NO_PINGS)


async def enqueue(interaction: discord.Interaction, params: JobParams, origin: str) -> None:
    """Admit (ledger row + quota charge in one transaction), then acknowledge, then show the position."""
    bot = interaction.client
    new = NewJob(
        **vars(params.params()),
        user_id=interaction.user.id, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
        interaction_id=interaction.id, interaction_token=interaction.token,
        interaction_created_at=interaction.created_at.timestamp(), application_id=interaction.application_id,
        origin=origin, upload_limit=interaction.filesize_limit or None,
    )
    admission = await bot.queue.submit(new)
    if admission.status is not AdmissionStatus.ACCEPTED:
        await tell(interaction, messages.refusal(admission.status, admission.quota, bot.settings))
        return
    job = admission.job
    try:
        await interaction.response.defer(thinking=True)
        position = bot.queue.position(job.id)
        text = (messages.starting(compiling=bot.queue.compiles_first(job)) if position == 0
                else messages.queued(position or 1))
        msg = await interaction.edit_original_response(content=text, allowed_mentions=messages.NO_PINGS)
    except discord.HTTPException as exc:
        # The job is admitted and charged: it still runs, and delivery finds another way
        # (a followup or the channel). Telling the member "something went wrong" would be false.
        log.warning("job %d: could not show its queue position (%s); it stays queued", job.id, exc)
        return
    await bot.queue.attach_message(job.id, msg.id)


async def reroll(interaction: discord.Interaction, job_id: int) -> None:
    bot = interaction.client
    job = await bot.store.get_job(job_id)
    if job is None:
        await tell(interaction, f"I no longer know that image (job {job_id}), so it cannot be re-rolled.")
        return
    gen = bot.settings.generation
    try:
        prompt = check_prompt(job.prompt, max_chars=gen.max_prompt_chars,
                              blocked_terms=bot.settings.moderation.blocked_terms)
    except ValidationError as exc:
        await tell(interaction, f"Cannot re-roll: {exc}.")
        return
    seed, _ = check_seed(None)
    params = dataclasses.replace(job.params(), prompt=prompt, seed=seed, steps=min(job.steps, gen.max_steps))
    await enqueue(interaction, params, "reroll")


async def delete_result(interaction: discord.Interaction, job_id: int) -> None:
    bot = interaction.client
    job = await bot.store.get_job(job_id)
    if job is None:
        await tell(interaction, f"I no longer know that image (job {job_id}).")
        return
    if interaction.user.id != job.user_id and not is_admin(interaction):
        await tell(interaction, f"Only <@{job.user_id}> (who asked for it) or an admin can delete this image.")
        return
    await interaction.response.defer()
    await interaction.delete_original_response()


def build_commands(settings) -> list:
    """The command tree's top-level commands, shaped by the settings (step limit, sizes)."""
    gen = settings.generation
    presets = size_presets(gen.width, gen.height)

    @app_commands.command(name="imagine", description="Paint an image from a text prompt")
    @app_commands.describe(
        prompt=f"What to paint (up to {gen.max_prompt_chars} characters)",
        seed="Seed for the same image again; leave empty or -1 for a random one",
        steps=f"Denoising steps, 1 to {gen.max_steps} (default {gen.default_steps}); more is slower",
        size="Image shape",
    )
    @app_commands.choices(size=[app_commands.Choice(name=p.label, value=p.name) for p in presets.values()])
    async def imagine(interaction: discord.Interaction, prompt: str,
                      seed: app_commands.Range[int, -1, MAX_SEED] | None = None,
                      steps: app_commands.Range[int, 1, gen.max_steps] | None = None,
                      size: str | None = None) -> None:
        bot = interaction.client
        try:
            params = check_imagine(prompt, seed, steps, size, bot.settings.generation, bot.settings.moderation)
        except ValidationError as exc:
            await tell(interaction, f"Not queued: {exc}.")
            return
        await enqueue(interaction, params, "imagine")

    @app_commands.command(name="queue", description="Show what is waiting for the GPU")
    async def queue(interaction: discord.Interaction) -> None:
        bot = interaction.client
        await tell(interaction, messages.queue_listing(bot.queue.running, bot.queue.waiting(), interaction.user.id))

    @app_commands.command(name="cancel", description="Cancel your newest waiting image, or the one being painted")
    async def cancel(interaction: discord.Interaction) -> None:
        outcome, job = await interaction.client.queue.cancel(interaction.user.id)
        if outcome is CancelOutcome.CANCELLED:
            await tell(interaction, f"Cancelled your waiting image (job {job.id}). Your quota was refunded.")
        elif outcome is CancelOutcome.STOPPING:
            await tell(interaction, f"Stopping your image (job {job.id}) at the next step. Your quota will be refunded.")
        else:
            await tell(interaction, "You have nothing waiting or being painted.")

    @app_commands.command(name="quota", description="How many images you may still make today")
    async def quota(interaction: discord.Interaction) -> None:
        q = await interaction.client.store.quota_status(interaction.user.id)
        await tell(interaction, messages.quota_text(q))

    admin = app_commands.Group(name="admin", description="Server admin commands",
                               default_permissions=discord.Permissions(manage_guild=True), guild_only=True)
    quota_admin = AdminGroup(name="quota", description="Members' daily image quotas", parent=admin)

    async def admin_limit(interaction: discord.Interaction, limit: object) -> int | None:
        """The checked limit, or None after telling the caller why not. discord.py does not
        enforce the option's range on what a client sends."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
            await tell(interaction, f"Nothing changed: limit must be a whole number between 0 and {MAX_LIMIT}.")
            return None
        return limit

    async def show_member(interaction: discord.Interaction, user) -> None:
        q = await interaction.client.store.quota_status(user.id)
        await tell(interaction, messages.quota_text(q, whose=f"<@{user.id}> has"))

    @quota_admin.command(name="set", description="Set a member's daily limit from now on")
    @app_commands.describe(user="The member", limit=f"Images per day (0 to {MAX_LIMIT})")
    async def quota_set(interaction: discord.Interaction, user: discord.User,
                        limit: app_commands.Range[int, 0, MAX_LIMIT]) -> None:
        value = await admin_limit(interaction, limit)
        if value is None:
            return
        await interaction.client.store.set_user_limit(user.id, value)
        await show_member(interaction, user)

    @quota_admin.command(name="reset", description="Clear a member's usage for today")
    @app_commands.describe(user="The member")
    async def quota_reset(interaction: discord.Interaction, user: discord.User) -> None:
        await interaction.client.store.reset_usage(user.id)
        await show_member(interaction, user)

    @quota_admin.command(name="show", description="Show a member's quota")
    @app_commands.describe(user="The member")
    async def quota_show(interaction: discord.Interaction, user: discord.User) -> None:
        await show_member(interaction, user)

    @quota_admin.command(name="default", description="Daily limit for everyone without a personal one")
    @app_commands.describe(limit=f"Images per day (0 to {MAX_LIMIT})")
    async def quota_default(interaction: discord.Interaction, limit: app_commands.Range[int, 0, MAX_LIMIT]) -> None:
        value = await admin_limit(interaction, limit)
        if value is None:
            return
        await interaction.client.store.set_default_limit(value)
        await tell(interaction, f"The default daily limit is now {value} images (members with a personal limit keep theirs).")

    return [imagine, queue, cancel, quota, admin]


async def on_tree_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    original = getattr(error, "original", error)
    if isinstance(original, (discord.Forbidden, discord.NotFound)):
        log.warning("Discord refused a reply: %s", redact(str(original)))
        return
    if isinstance(error, NotAdmin):
        text = messages.ADMIN_ONLY
    elif isinstance(error, app_commands.CommandNotFound):
        text = "Unknown command: it may have been removed. Discord refreshes the command list shortly."
    elif isinstance(error, app_commands.TransformerError):
        text = f"{str(error.value)[:100]!r} is not a valid value for that option."
    else:
        log.error("command failed: %s", redact(repr(original)), exc_info=original)
        text = "Something went wrong on the bot's side. If an image was charged, it is refunded when it fails."
    try:
        await tell(interaction, text)
    except discord.HTTPException:
        log.warning("could not tell the member about an error")
