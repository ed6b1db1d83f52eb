"""Every text and embed the Discord side shows, in one place: replies, statuses, command and button
labels. (The queue's failure reasons come from `bot.jobs`, which knows nothing of Discord; they are
shown through `failed`.)"""

from __future__ import annotations

from datetime import datetime

import discord

from ..config import Settings
from ..params import MemberSettings, image_seed
from ..store import AdmissionStatus, JobRecord, LedgerStats, QuotaStatus
from ..validation import member_defaults, size_presets

NO_PINGS = discord.AllowedMentions.none()


def ping_only(user_id: int) -> discord.AllowedMentions:
    """Mentions allowed in a channel post addressed to one member: that member, nobody else."""
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(user_id)])


COLOR = discord.Colour(0x7C5CFF)


def _ts(when: datetime, style: str = "R") -> str:
    return f"<t:{int(when.timestamp())}:{style}>"


def queued(position: int, *, model_loading: bool = False, relax: bool = False) -> str:
    where = "you are next" if position <= 1 else f"position {position}"
    loading = " The model is loading (after a start: a minute or two, once)." if model_loading else ""
    if relax:
        return (
            f"💤 Queued in relax mode: your daily quota is used up, so this image is free and is painted "
            f"after everyone else's ({where} for now).{loading} `/cancel` withdraws it."
        )
    return f"🕒 Queued: {where}.{loading} `/cancel` withdraws it."


RELAX_NOTE = " Relax mode: your daily quota is used up, so this image is free (it waits for everyone else's)."
RELAX_FREE = "It was a free relax-mode image: nothing was charged, so nothing is refunded."


def starting(*, compiling: bool = False, relax: bool = False) -> str:
    note = RELAX_NOTE if relax else ""
    if compiling:
        return (
            "🎨 Painting: starting… The first image at this size since the bot started prepares "
            "the model for it first: a minute or two more, once." + note
        )
    return "🎨 Painting: starting…" + note


def progress_bar(step: int, total: int, width: int = 16) -> str:
    filled = round(width * step / max(total, 1))
    return "▰" * filled + "▱" * (width - filled)


def progress(step: int, total: int, *, relax: bool = False) -> str:
    text = f"🎨 Painting: step {step}/{total}  {progress_bar(step, total)}  {round(100 * step / max(total, 1))}%"
    return text + ("  💤 relax mode, free" if relax else "")


def failed(reason: str) -> str:
    return f"❌ Could not paint this image: {reason}"


def cancelled(*, relax: bool = False) -> str:
    return "🛑 Cancelled. " + (RELAX_FREE if relax else "Your quota was refunded.")


def refusal(status: AdmissionStatus, quota: QuotaStatus, settings: Settings, *, units: int = 1) -> str:
    """Why a job was not admitted (`units`: what it would have taken of the quota)."""
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
    if 0 < quota.remaining < units:
        return (
            f"This takes {units} images of your daily quota and you have {quota.remaining} left, so nothing was "
            f"charged. It resets {_ts(quota.resets_at)} ({quota.resets_at:%H:%M} UTC)."
        )
    return (
        f"Your daily quota of {quota.limit} images is used up. It resets {_ts(quota.resets_at)} "
        f"({quota.resets_at:%H:%M} UTC)."
    )


def quota_text(q: QuotaStatus, *, whose: str = "You have", relax: bool = False) -> str:
    """`relax`: the bot has relax mode on, and this is the member's own quota."""
    relax_note = relax and q.limit > 0 and q.remaining == 0
    return (
        f"{whose} used {q.used} of {q.limit} images today; {q.remaining} left. "
        f"Resets {_ts(q.resets_at)} ({q.resets_at:%H:%M} UTC)."
        + (" (personal limit set by an admin)" if q.has_override else "")
        + (" Relax mode is on: your next images are free, painted after everyone else's." if relax_note else "")
    )


def result_embed(job: JobRecord, *, source: JobRecord | None = None) -> discord.Embed:
    """The result's embed; a button's result says what it came from (`source`: that job's row, which
    an Upscale's factor is read from; None where it could not be read)."""
    prompt = job.prompt if len(job.prompt) <= 4000 else job.prompt[:3999] + "…"
    embed = discord.Embed(description=prompt, colour=COLOR, title=derived_title(job))
    embed.add_field(name="Seed" if job.count == 1 else "Seeds", value=seeds_text(job))
    embed.add_field(name="Steps", value=str(job.steps))
    embed.add_field(name="Size", value=f"{job.width}x{job.height}")
    if job.duration_s is not None:
        embed.add_field(name="Time", value=f"{job.duration_s:.1f} s")
    embed.add_field(name="Requested by", value=f"<@{job.user_id}>")
    if job.from_image:
        embed.add_field(name="Strength", value=f"{job.strength:g}")
    if job.origin == "upscale" and source is not None:
        embed.add_field(name="Upscaled", value=upscale_note(source.width, source.height, job.width, job.height))
    if job.relax:
        embed.add_field(name="Mode", value="Relax (free)")
    embed.set_footer(text=f"job {job.id}")
    return embed


def seeds_text(job: JobRecord) -> str:
    """The seed, or a grid's seeds in order (seed, seed + 1, ...)."""
    return str(job.seed) if job.count == 1 else ", ".join(str(image_seed(job.seed, i)) for i in range(job.count))


def queue_listing(running: JobRecord | None, waiting: list[JobRecord], me: int, *, admin: bool = False) -> str:
    """What waits, the caller's own marked; relax-mode jobs are marked for admins (and for their owner)."""
    if running is None and not waiting:
        return "The queue is empty: your next `/imagine` starts at once."

    def marks(job: JobRecord) -> str:
        relax = "  💤 relax (free)" if job.relax and (admin or job.user_id == me) else ""
        return relax + ("  ← yours" if job.user_id == me else "")

    lines: list[str] = []
    if running is not None:
        lines.append(f"▶️ now: <@{running.user_id}>, {running.steps} steps" + marks(running))
    for pos, job in enumerate(waiting[:20], start=1):
        lines.append(f"{pos}. <@{job.user_id}>, {job.steps} steps" + marks(job))
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
IMAGINE_COUNT = "Images, 1 to {max_count}: more than one come as a grid (default: your /settings, else 1)"
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
SETTINGS_COUNT = "Images per /imagine, 1 to {max_count} (more than one come as a grid)"
SETTINGS_PREVIEWS = "Show a small preview of the image while it is painted"
SETTINGS_RESET = "Forget your choices: the bot's defaults again"
REROLL_LABEL = "Re-roll"
VARY_SUBTLE_LABEL = "Vary (Subtle)"
VARY_STRONG_LABEL = "Vary (Strong)"
UPSCALE_LABEL = "Upscale"
REMIX_LABEL = "Remix"
DELETE_LABEL = "Delete"
REMIX_PROMPT_LABEL = "Prompt"
REMIX_SEED_LABEL = "Seed (empty or -1: a random one)"


# ---------------------------------------------------------------- replies to commands and buttons


def not_queued(reason: object) -> str:
    return f"Not queued: {reason}."


def cancelled_waiting(job_id: int, *, relax: bool = False) -> str:
    return f"Cancelled your waiting image (job {job_id}). " + (RELAX_FREE if relax else "Your quota was refunded.")


def stopping(job_id: int, *, relax: bool = False) -> str:
    return f"Stopping your image (job {job_id}) at the next step. " + (
        RELAX_FREE if relax else "Your quota will be refunded."
    )


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
    count_note = whose(mine.count) + ("; more than one come as a grid" if count > 1 else "")
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


# ---------------------------------------------------------------- the result buttons that paint from a result

DERIVED_LABELS = {
    "reroll": REROLL_LABEL,
    "vary_subtle": VARY_SUBTLE_LABEL,
    "vary_strong": VARY_STRONG_LABEL,
    "upscale": UPSCALE_LABEL,
    "remix": REMIX_LABEL,
    "pick": "Image",
}
ACTIONS = {
    "reroll": "re-rolled",
    "vary_subtle": "varied",
    "vary_strong": "varied",
    "upscale": "upscaled",
    "remix": "remixed",
    "delete": "deleted",
    "pick": "posted alone",
}


def derived_title(job: JobRecord) -> str | None:
    """What a button's result came from: "Vary (Subtle) of #123" (None for an /imagine)."""
    label = DERIVED_LABELS.get(job.origin)
    if label is None or job.source_job_id is None:
        return None
    if job.origin == "pick":
        return f"Image of the grid #{job.source_job_id}"
    return f"{label} of #{job.source_job_id}"


def upscale_note(width: int, height: int, new_width: int, new_height: int) -> str:
    """How an Upscale grew its source, and why not 2x where it did not."""
    factor = new_width / width if width else 0
    text = f"{factor:g}× ({width}x{height} → {new_width}x{new_height})"
    return text if factor >= 2 else text + ": 2× does not fit this GPU's memory budget"


def derived_queued(job: JobRecord, source: JobRecord) -> str:
    """The first line of a button's reply, before the queue position: what it paints, from what."""
    title = derived_title(job) or ""
    if job.origin == "upscale":
        return f"**{title}**: {upscale_note(source.width, source.height, job.width, job.height)}."
    return f"**{title}**."


def button_refused(job_id: int, action: str, reason: str) -> str:
    """A result button that cannot do its work: nothing was queued or charged."""
    return f"That image (job {job_id}) cannot be {ACTIONS.get(action, action)}: {reason}. Nothing was charged."


NOT_A_GRID = "it is not a grid"


def no_such_image(index: int, count: int) -> str:
    return f"its grid has {count} images, so there is no image {index}"


def grid_label(kind: str, index: int) -> str:
    """A grid's buttons: U1..Un post image n alone, V1..Vn vary it (subtly)."""
    return f"{kind.upper()}{index}"


NOT_THIS_RESULT = "this button is not on that image's own message"
RESULT_DELETED = "it was deleted"
RESULT_NOT_FINISHED = "it is not finished yet (try again once it is posted)"
RESULT_FILE_GONE = "its file is no longer on the bot's disk"
MODEL_LOADING = "the model is still loading, so the bot cannot tell yet how large it can make it; try again in a minute"


def too_large_to_upscale(width: int, height: int, max_pixels: int) -> str:
    return (
        f"it is {width}x{height} already, and this bot upscales to at most {max_pixels / 1e6:.1f} megapixels "
        "(and within its GPU's memory budget)"
    )


def remix_title(job_id: int) -> str:
    return f"Remix #{job_id}"


def remix_refused(reason: object) -> str:
    return f"Not queued: {reason}. Nothing was charged."


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
        f"**Failed** today {stats.failed_today}, last 7 days {stats.failed_week} (refunded, except relax jobs: those cost nothing)",
        f"**Mean time per image** (7 days): {mean}",
        f"**Queue**: {queue_depth} waiting or being painted",
        "**GPU memory** (last image): " + ("n/a" if peak_vram_gib is None else f"{peak_vram_gib:.2f} GiB"),
    ]
    if stats.busiest_week:
        lines.append("**Busiest** (7 days): " + ", ".join(f"<@{u}> {n}" for u, n in stats.busiest_week))
    return "\n".join(lines)
