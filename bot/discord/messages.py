"""Every text and embed the Discord side shows, in one place: replies, statuses, command and button
labels. (The queue's failure reasons come from `bot.jobs`, which knows nothing of Discord; they are
shown through `failed`.)"""

from __future__ import annotations

from datetime import datetime

import discord

from ..config import Settings
from ..params import MemberSettings
from ..store import AdmissionStatus, JobRecord, LedgerStats, QuotaStatus
from ..validation import member_defaults, size_presets

NO_PINGS = discord.AllowedMentions.none()


def ping_only(user_id: int) -> discord.AllowedMentions:
    """Mentions allowed in a channel post addressed to one member: that member, nobody else."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(user_id)])


COLOR = discord.Colour(0x7C5CFF)


def _ts(when: datetime, style: str = "R") -> str:
    return f"<t:{int(when.timestamp())}:{style}>"


def queued(position: int, *, model_loading: bool = False) -> str:
    where = "you are next" if position <= 1 else f"position {position}"
    loading = " The model is loading (after a start: a minute or two, once)." if model_loading else ""
    return f"🕒 Queued: {where}.{loading} `/cancel` withdraws it."


def starting(*, compiling: bool = False) -> str:
    if compiling:
        return (
            "🎨 Painting: starting… The first image at this size since the bot started prepares "
            "the model for it first: a minute or two more, once."
        )
    return "🎨 Painting: starting…"


def progress_bar(step: int, total: int, width: int = 16) -> str:
    filled = round(width * step / max(total, 1))
    return "▰" * filled + "▱" * (width - filled)


def progress(step: int, total: int) -> str:
    return f"🎨 Painting: step {step}/{total}  {progress_bar(step, total)}  {round(100 * step / max(total, 1))}%"


def failed(reason: str) -> str:
    return f"❌ Could not paint this image: {reason}"


def cancelled() -> str:
    return "🛑 Cancelled. Your quota was refunded."


def refusal(status: AdmissionStatus, quota: QuotaStatus, settings: Settings) -> str:
    if status is AdmissionStatus.QUEUE_FULL:
        return (
            f"The queue is full ({settings.queue.max_size} images waiting). "
            "Nothing was charged; please try again in a few minutes."
        )
    if status is AdmissionStatus.USER_CAP:
        return (
            f"You already have {settings.queue.max_per_user} images waiting, the most one member may queue. "
            "Nothing was charged; wait for one to finish."
        )
    return (
        f"Your daily quota of {quota.limit} images is used up. It resets {_ts(quota.resets_at)} "
        f"({quota.resets_at:%H:%M} UTC)."
    )


def quota_text(q: QuotaStatus, *, whose: str = "You have") -> str:
    return (
        f"{whose} used {q.used} of {q.limit} images today; {q.remaining} left. "
        f"Resets {_ts(q.resets_at)} ({q.resets_at:%H:%M} UTC)."
        + (" (personal limit set by an admin)" if q.has_override else "")
    )


def result_embed(job: JobRecord) -> discord.Embed:
    prompt = job.prompt if len(job.prompt) <= 4000 else job.prompt[:3999] + "…"
    embed = discord.Embed(description=prompt, colour=COLOR)
    embed.add_field(name="Seed", value=str(job.seed))
    embed.add_field(name="Steps", value=str(job.steps))
    embed.add_field(name="Size", value=f"{job.width}x{job.height}")
    if job.duration_s is not None:
        embed.add_field(name="Time", value=f"{job.duration_s:.1f} s")
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    embed.set_footer(text=f"job {job.id}")
    return embed


def queue_listing(running: JobRecord | None, waiting: list[JobRecord], me: int) -> str:
    if running is None and not waiting:
        return "The queue is empty: your next `/imagine` starts at once."
    lines: list[str] = []
    if running is not None:
        lines.append(
            f"▶️ now: <@{running.user_id}>, {running.steps} steps" + ("  ← yours" if running.user_id == me else "")
        )
    for pos, job in enumerate(waiting[:20], start=1):
        lines.append(f"{pos}. <@{job.user_id}>, {job.steps} steps" + ("  ← yours" if job.user_id == me else ""))
    if len(waiting) > 20:
        lines.append(f"… and {len(waiting) - 20} more")
    return "\n".join(lines)


ADMIN_ONLY = (
    "You need the Manage Server permission in one of this bot's home servers (or to be listed in "
    "`admin_user_ids`) to use admin commands. Nothing was changed."
)


# ---------------------------------------------------------------- commands: names shown in the client

IMAGINE = "Paint an image from a text prompt"
IMAGINE_PROMPT = "What to paint (up to {max_chars} characters)"
IMAGINE_SEED = "Seed for the same image again; leave empty or -1 for a random one"
IMAGINE_STEPS = "Denoising steps, 1 to {max_steps} (default {default_steps}); more is slower"
IMAGINE_SIZE = "Image shape"
QUEUE = "Show what is waiting for the GPU"
CANCEL = "Cancel your newest waiting image, or the one being painted"
QUOTA = "How many images you may still make today"
ADMIN = "Server admin commands"
ADMIN_QUOTA = "Members' daily image quotas"
QUOTA_SET = "Set a member's daily limit from now on"
QUOTA_RESET = "Clear a member's usage for today"
QUOTA_SHOW = "Show a member's quota"
QUOTA_DEFAULT = "Daily limit for everyone without a personal one"
ADMIN_STATS = "Images, failures and speed today and this week; the queue; the busiest members"
OPTION_MEMBER = "The member"
OPTION_LIMIT = "Images per day (0 to {max_limit})"
SETTINGS = "Your defaults for /imagine: size, steps, count, live previews"
SETTINGS_SIZE = "Image shape when /imagine is not told one"
SETTINGS_STEPS = "Denoising steps when /imagine is not told them (1 to {max_steps})"
SETTINGS_COUNT = "Images per /imagine, 1 to {max_count} (kept for grids: one image at a time for now)"
SETTINGS_PREVIEWS = "Show a small preview of the image while it is painted"
SETTINGS_RESET = "Forget your choices: the bot's defaults again"
REROLL_LABEL = "Re-roll"
DELETE_LABEL = "Delete"


# ---------------------------------------------------------------- replies to commands and buttons


def not_queued(reason: object) -> str:
    return f"Not queued: {reason}."


def cancelled_waiting(job_id: int) -> str:
    return f"Cancelled your waiting image (job {job_id}). Your quota was refunded."


def stopping(job_id: int) -> str:
    return f"Stopping your image (job {job_id}) at the next step. Your quota will be refunded."


def too_late_to_cancel(job_id: int) -> str:
    return f"Your image (job {job_id}) is finished and being posted: too late to cancel it. Delete it once it arrives."


NOTHING_TO_CANCEL = "You have nothing waiting or being painted."


def settings_refused(reason: object) -> str:
    return f"Nothing changed: {reason}."


def settings_text(mine: MemberSettings, settings: Settings, *, changed: bool = False) -> str:
    """A member's /settings: each default, whether it is theirs or the bot's, and how to change it."""
    gen = settings.generation
    steps, size = member_defaults(mine, gen)
    preset = size_presets(gen.width, gen.height)[size]

    def whose(value: object) -> str:
        return "yours" if value is not None else "the bot's default"

    steps_note = whose(mine.steps)
    if mine.steps is not None and mine.steps > steps:
        steps_note = f"yours was {mine.steps}, capped to the most this bot allows"
    count = 1 if mine.count is None else mine.count
    count_note = whose(mine.count) + "; kept for grids: /imagine paints one image at a time for now"
    if not settings.discord.previews:
        previews = "off: this bot sends none" + ("" if mine.previews is None else f" (yours: {_on(mine.previews)})")
    else:
        previews = f"{_on(mine.previews is not False)}, {whose(mine.previews)}"
    lines = [
        ("Saved. " if changed else "") + "**Your defaults for /imagine** (an option you give it wins):",
        f"• Size: {preset.label}, {whose(mine.size if mine.size == size else None)}",
        f"• Steps: {steps}, {steps_note}",
        f"• Count: {count}, {count_note}",
        f"• Live previews: {previews}",
        "Change one with `/settings steps:30`; `/settings reset:True` goes back to the bot's defaults.",
    ]
    return "\n".join(lines)


def _on(value: bool) -> str:
    return "on" if value else "off"


def bad_limit(max_limit: int) -> str:
    return f"Nothing changed: limit must be a whole number between 0 and {max_limit}."


def default_limit_set(limit: int) -> str:
    return f"The default daily limit is now {limit} images (members with a personal limit keep theirs)."


def unknown_job(job_id: int, *, action: str = "") -> str:
    return f"I no longer know that image (job {job_id})" + (f", so it cannot be {action}." if action else ".")


def cannot_reroll(reason: object) -> str:
    return f"Cannot re-roll: {reason}."


def only_owner_deletes(owner_id: int) -> str:
    return f"Only <@{owner_id}> (who asked for it) or an admin can delete this image."


DATABASE_BUSY = "The bot's database is busy right now, so nothing was queued or charged. Try again in a moment."
DATABASE_FAILED = "The bot's database did not answer (busy or failing), so nothing was changed. Try again in a moment."
BUTTON_INACTIVE = "This button is no longer active."
OPTIONS_MISMATCH = (
    "That request's options do not match this command (Discord may still show an older version of it): "
    "nothing was queued or changed. Try again in a minute."
)
UNKNOWN_COMMAND = "Unknown command: it may have been removed. Discord refreshes the command list shortly."
INTERNAL_ERROR = "Something went wrong on the bot's side. If an image was charged, it is refunded when it fails."


def invalid_option(value: object) -> str:
    return f"{str(value)[:100]!r} is not a valid value for that option."


# ---------------------------------------------------------------- channel posts (the token expired)


def ready_in_channel(user_id: int) -> str:
    return f"<@{user_id}> your image is ready."


def failed_in_channel(user_id: int, reason: str) -> str:
    return f"<@{user_id}> {failed(reason)}"


def stats_text(stats: LedgerStats, *, queue_depth: int, peak_vram_gib: float | None) -> str:
    mean = "n/a" if stats.mean_seconds_week is None else f"{stats.mean_seconds_week:.1f} s"
    lines = [
        f"**Images** today {stats.images_today}, last 7 days {stats.images_week}",
        f"**Failed** today {stats.failed_today}, last 7 days {stats.failed_week} (each refunded)",
        f"**Mean time per image** (7 days): {mean}",
        f"**Queue**: {queue_depth} waiting or being painted",
        "**GPU memory** (last image): " + ("n/a" if peak_vram_gib is None else f"{peak_vram_gib:.2f} GiB"),
    ]
    if stats.busiest_week:
        lines.append("**Busiest** (7 days): " + ", ".join(f"<@{u}> {n}" for u, n in stats.busiest_week))
    return "\n".join(lines)
