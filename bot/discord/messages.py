"""Every text and embed the bot shows, in one place."""

from __future__ import annotations

from datetime import datetime

import discord

from ..store import AdmissionStatus, JobRecord, QuotaStatus

NO_PINGS = discord.AllowedMentions.none()


def ping_only(user_id: int) -> discord.AllowedMentions:
    """Mentions allowed in a channel post addressed to one member: that member, nobody else."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(user_id)])


COLOR = discord.Colour(0x7C5CFF)


def _ts(when: datetime, style: str = "R") -> str:
    return f"<t:{int(when.timestamp())}:{style}>"


def queued(position: int) -> str:
    if position <= 1:
        return "🕒 Queued: you are next. `/cancel` withdraws it."
    return f"🕒 Queued: position {position}. `/cancel` withdraws it."


def starting(*, compiling: bool = False) -> str:
    if compiling:
        return ("🎨 Painting: starting… The first image at this size since the bot started prepares "
                "the model for it first: a minute or two more, once.")
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


def refusal(status: AdmissionStatus, quota: QuotaStatus, settings) -> str:
    if status is AdmissionStatus.QUEUE_FULL:
        return (f"The queue is full ({settings.queue.max_size} images waiting). "
                "Nothing was charged; please try again in a few minutes.")
    if status is AdmissionStatus.USER_CAP:
        return (f"You already have {settings.queue.max_per_user} images waiting, the most one member may queue. "
                "Nothing was charged; wait for one to finish.")
    return (f"Your daily quota of {quota.limit} images is used up. It resets {_ts(quota.resets_at)} "
            f"({quota.resets_at:%H:%M} UTC).")


def quota_text(q: QuotaStatus, *, whose: str = "You have") -> str:
    return (f"{whose} used {q.used} of {q.limit} images today; {q.remaining} left. "
            f"Resets {_ts(q.resets_at)} ({q.resets_at:%H:%M} UTC)."
            + (" (personal limit set by an admin)" if q.has_override else ""))


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
    lines = []
    if running is not None:
        lines.append(f"▶️ now: <@{running.user_id}>, {running.steps} steps" + ("  ← yours" if running.user_id == me else ""))
    for pos, job in enumerate(waiting[:20], start=1):
        lines.append(f"{pos}. <@{job.user_id}>, {job.steps} steps" + ("  ← yours" if job.user_id == me else ""))
    if len(waiting) > 20:
        lines.append(f"… and {len(waiting) - 20} more")
    return "\n".join(lines)


ADMIN_ONLY = ("You need the Manage Server permission (or to be listed in `admin_user_ids`) "
              "to use admin commands. Nothing was changed.")
