"""Result buttons: Re-roll, Vary (Subtle), Vary (Strong), Upscale, Remix and Delete, each a
`DynamicItem` that owns its callback, and Remix's form (a modal).

Their custom id carries the job id, so they keep working after a restart; Remix's form carries it
too and is answered from `on_interaction` (`remix_submitted`), never from discord.py's memory of the
modals it sent, so a form sent before a restart is still taken after it.

Who may click what (as Re-roll always did): anyone who sees a result may Re-roll, Vary, Upscale or
Remix it, and is charged for what they ask (one unit; an Upscale two); only the member who asked for
it, or an admin, may Delete it. Every click is checked here, whatever the client sent: the job must
be known, finished and the result shown on the message clicked, in its channel (a button copied
onto another message, or a message of an older database, names a job that is not its own), not
deleted with its Delete button, and, for what paints from its pixels, its file still on disk. A
refusal says why, privately, and writes and charges nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import discord

from ..engine.api import MAX_UPSCALED_PIXELS
from ..images import grid_part_path
from ..jobs import EngineNotReady
from ..params import MAX_COUNT, JobParams, image_seed
from ..store import JobRecord, JobStatus, StoreBusy, StoreError
from ..validation import MAX_SEED, ValidationError, check_prompt, check_seed, size_presets
from . import messages
from .interactions import ANSWER_DEADLINE_S, Interaction, enqueue, is_admin, new_job, tell

log = logging.getLogger("fluxbot.discord")
PREFIX = "fluxbot:"
REROLL_ID = re.compile(rf"{PREFIX}reroll:(?P<job_id>[0-9]+)")
VARY_ID = re.compile(rf"{PREFIX}vary-(?P<kind>subtle|strong):(?P<job_id>[0-9]+)")
UPSCALE_ID = re.compile(rf"{PREFIX}upscale:(?P<job_id>[0-9]+)")
REMIX_ID = re.compile(rf"{PREFIX}remix:(?P<job_id>[0-9]+)")
DELETE_ID = re.compile(rf"{PREFIX}delete:(?P<job_id>[0-9]+)")
GRID_ID = re.compile(rf"{PREFIX}grid-(?P<kind>[uv])(?P<index>[0-9]):(?P<job_id>[0-9]+)")  # U1..U4, V1..V4
JOB_BUTTON_ID = re.compile(
    rf"{PREFIX}(?:reroll|vary-subtle|vary-strong|upscale|remix|delete|grid-[uv][0-9]):[0-9]+"
)  # any above
REMIX_FORM_ID = re.compile(rf"{PREFIX}remix-form:(?P<job_id>[0-9]+)")
REMIX_PROMPT, REMIX_SEED = "prompt", "seed"  # the form's text inputs
UPSCALE_UNITS = 2


def _button(label: str, emoji: str, style: discord.ButtonStyle, custom_id: str, row: int) -> discord.ui.Button[Any]:
    return discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=custom_id, row=row)


# ---------------------------------------------------------------- checks every button makes


async def _is_file(path: str | None) -> bool:
    return path is not None and await asyncio.to_thread(Path(path).is_file)


async def result_refusal(interaction: Interaction, job: JobRecord, *, needs_file: bool) -> str | None:
    """Why this click may not use `job`'s result (None: it may). `needs_file`: the button paints
    from the result's pixels (Vary, Upscale, or a Re-roll of an image painted from another one)."""
    if job.status not in (JobStatus.DONE, JobStatus.GENERATED):
        return messages.RESULT_NOT_FINISHED
    # The message the result is on: recorded once posted; until the ledger has it (a click in the
    # moment between), the progress message its result replaced.
    own = {job.result_message_id}
    if job.status is JobStatus.GENERATED:
        own.add(job.progress_message_id)
    own.discard(None)
    message_id = interaction.message.id if interaction.message is not None else None
    if message_id not in own or interaction.channel_id != job.channel_id:
        return messages.NOT_THIS_RESULT
    if job.result_deleted_at is not None:
        return messages.RESULT_DELETED
    if needs_file and not await _is_file(job.result_path):
        return messages.RESULT_FILE_GONE
    return None


async def _result(
    interaction: Interaction, job_id: int, action: str, *, needs_file: bool, deadline_s: float
) -> JobRecord | None:
    """The job whose result was clicked, checked (`result_refusal`); None once the member was told why not."""
    try:
        job = await interaction.client.store.get_job(job_id, deadline_s=deadline_s)
    except StoreBusy:
        await tell(interaction, messages.DATABASE_BUSY)
        return None
    if job is None:
        await tell(interaction, messages.unknown_job(job_id, action=messages.ACTIONS[action]))
        return None
    refusal = await result_refusal(interaction, job, needs_file=needs_file)
    if refusal is not None:
        log.info("a %s click on job %d was refused: %s", action, job_id, refusal)
        await tell(interaction, messages.button_refused(job_id, action, refusal))
        return None
    return job


def _checked_prompt(interaction: Interaction, prompt: object) -> str:
    """The prompt, checked against today's rules (they may have changed since the image was made)."""
    settings = interaction.client.settings
    return check_prompt(
        prompt, max_chars=settings.generation.max_prompt_chars, blocked_terms=settings.moderation.blocked_terms
    )


def _left(started: float) -> float:
    """What remains of Discord's answer deadline for the admission (the reading shared it)."""
    return max(0.2, ANSWER_DEADLINE_S - (time.monotonic() - started))


# ---------------------------------------------------------------- the buttons


class RerollButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=REROLL_ID):
    """Paint the same prompt at the same size again with a new seed, for whoever clicks (charged to
    them). A Re-roll of a Vary or an Upscale does that again, from the same source image."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            _button(messages.REROLL_LABEL, "🎲", discord.ButtonStyle.primary, f"{PREFIX}reroll:{job_id}", 0)
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> RerollButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        started = time.monotonic()
        job = await _result(interaction, self.job_id, "reroll", needs_file=False, deadline_s=ANSWER_DEADLINE_S / 2)
        if job is None:
            return
        if job.from_image and not await _is_file(job.source_path):
            await tell(interaction, messages.button_refused(job.id, "reroll", messages.RESULT_FILE_GONE))
            return
        try:
            prompt = _checked_prompt(interaction, job.prompt)
        except ValidationError as exc:
            await tell(interaction, messages.cannot_reroll(exc))
            return
        seed, _ = check_seed(None)
        gen = interaction.client.settings.generation
        params = dataclasses.replace(job.params(), prompt=prompt, seed=seed, steps=min(job.steps, gen.max_steps))
        await enqueue(interaction, params, "reroll", deadline_s=_left(started), source=job, units=job.units)


class VaryButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=VARY_ID):
    """img2img from the result at its size with a new seed: `[generation] vary_subtle_strength` or
    `vary_strong_strength`; charged one unit to whoever clicks."""

    def __init__(self, job_id: int, kind: str) -> None:
        label = messages.VARY_SUBTLE_LABEL if kind == "subtle" else messages.VARY_STRONG_LABEL
        emoji = "🌱" if kind == "subtle" else "🌀"
        super().__init__(_button(label, emoji, discord.ButtonStyle.secondary, f"{PREFIX}vary-{kind}:{job_id}", 0))
        self.job_id, self.kind = job_id, kind

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> VaryButton:
        return cls(int(match["job_id"]), match["kind"])

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        started = time.monotonic()
        origin = f"vary_{self.kind}"
        job = await _result(interaction, self.job_id, origin, needs_file=True, deadline_s=ANSWER_DEADLINE_S / 2)
        if job is None:
            return
        try:
            prompt = _checked_prompt(interaction, job.prompt)
        except ValidationError as exc:
            await tell(interaction, messages.button_refused(job.id, origin, str(exc)))
            return
        gen = interaction.client.settings.generation
        strength = gen.vary_subtle_strength if self.kind == "subtle" else gen.vary_strong_strength
        seed, _ = check_seed(None)
        params = dataclasses.replace(
            job.params(),
            prompt=prompt,
            seed=seed,
            steps=min(job.steps, gen.max_steps),
            strength=strength,
            source_path=job.result_path,
        )
        await enqueue(interaction, params, origin, deadline_s=_left(started), source=job)


class UpscaleButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=UPSCALE_ID):
    """The result at 2x width and height (1.5x where the engine's plan cannot hold 2x) by a tiled
    img2img pass at `[generation] upscale_strength`, with steps x strength steps (as many as the
    source's schedule has over the part the pass repaints); charged two units to whoever clicks."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            _button(messages.UPSCALE_LABEL, "🔍", discord.ButtonStyle.primary, f"{PREFIX}upscale:{job_id}", 0)
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> UpscaleButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        started = time.monotonic()
        bot = interaction.client
        job = await _result(interaction, self.job_id, "upscale", needs_file=True, deadline_s=ANSWER_DEADLINE_S / 2)
        if job is None:
            return
        try:
            size = bot.queue.upscale_size(job.width, job.height)
        except EngineNotReady:
            await tell(interaction, messages.button_refused(job.id, "upscale", messages.MODEL_LOADING))
            return
        if size is None:
            reason = messages.too_large_to_upscale(job.width, job.height, MAX_UPSCALED_PIXELS)
            await tell(interaction, messages.button_refused(job.id, "upscale", reason))
            return
        try:
            prompt = _checked_prompt(interaction, job.prompt)
        except ValidationError as exc:
            await tell(interaction, messages.button_refused(job.id, "upscale", str(exc)))
            return
        strength = bot.settings.generation.upscale_strength
        params = dataclasses.replace(
            job.params(),
            prompt=prompt,
            width=size[0],
            height=size[1],
            steps=max(1, math.ceil(min(job.steps, bot.settings.generation.max_steps) * strength)),
            strength=strength,
            source_path=job.result_path,
        )
        await enqueue(interaction, params, "upscale", deadline_s=_left(started), source=job, units=UPSCALE_UNITS)


class RemixButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=REMIX_ID):
    """A form with the result's prompt and seed to edit; its submission (`remix_submitted`) paints
    the edited prompt from noise at the result's size, charged one unit to whoever sends it."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            _button(messages.REMIX_LABEL, "✏️", discord.ButtonStyle.secondary, f"{PREFIX}remix:{job_id}", 1)
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> RemixButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        job = await _result(interaction, self.job_id, "remix", needs_file=False, deadline_s=ANSWER_DEADLINE_S)
        if job is None:
            return
        await interaction.response.send_modal(remix_form(job, interaction.client.settings.generation.max_prompt_chars))


class DeleteButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=DELETE_ID):
    """Delete the result message: for the member who asked for it, or an admin. The ledger records
    it, so a stale copy of the message can no longer vary, upscale or remix it."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            _button(messages.DELETE_LABEL, "🗑️", discord.ButtonStyle.secondary, f"{PREFIX}delete:{job_id}", 1)
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> DeleteButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        job = await _result(interaction, self.job_id, "delete", needs_file=False, deadline_s=ANSWER_DEADLINE_S)
        if job is None:
            return
        if interaction.user.id != job.user_id and not is_admin(interaction):
            await tell(interaction, messages.only_owner_deletes(job.user_id))
            return
        await interaction.response.defer()
        await interaction.delete_original_response()
        try:
            await interaction.client.store.mark_result_deleted(job.id)
        except StoreError as exc:  # the message is gone already: nothing can be clicked on it
            log.warning("job %d: its result was deleted, but the ledger did not record it (%s)", job.id, exc)


class GridButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=GRID_ID):
    """A grid's `U1`..`Un` (image n alone, full size, as a result of its own with the six result
    buttons; nothing is painted, so nothing is charged) and `V1`..`Vn` (Vary (Subtle) of image n,
    one unit to whoever clicks). The index is checked against the grid's own count."""

    def __init__(self, job_id: int, kind: str, index: int) -> None:
        style = discord.ButtonStyle.primary if kind == "u" else discord.ButtonStyle.secondary
        super().__init__(
            discord.ui.Button(
                label=messages.grid_label(kind, index),
                style=style,
                custom_id=f"{PREFIX}grid-{kind}{index}:{job_id}",
                row=0 if kind == "u" else 1,
            )
        )
        self.job_id, self.kind, self.index = job_id, kind, index

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # only our bot's interactions reach it
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> GridButton:
        return cls(int(match["job_id"]), match["kind"], int(match["index"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # ours only
        started = time.monotonic()
        action = "pick" if self.kind == "u" else "vary_subtle"
        job = await _result(interaction, self.job_id, action, needs_file=False, deadline_s=ANSWER_DEADLINE_S / 2)
        if job is None:
            return
        refusal = None
        if job.count < 2:
            refusal = messages.NOT_A_GRID
        elif not 1 <= self.index <= job.count:
            refusal = messages.no_such_image(self.index, job.count)
        part = None if job.result_path is None else str(grid_part_path(job.result_path, self.index))
        if refusal is None and not await _is_file(part):
            refusal = messages.RESULT_FILE_GONE
        if refusal is not None or part is None:
            log.info("a grid %s%d click on job %d was refused: %s", self.kind, self.index, job.id, refusal)
            await tell(interaction, messages.button_refused(job.id, action, refusal or messages.RESULT_FILE_GONE))
            return
        one = dataclasses.replace(job.params(), seed=image_seed(job.seed, self.index - 1), count=1)
        if self.kind == "u":
            await _post_picked(interaction, job, one, part)
            return
        try:
            prompt = _checked_prompt(interaction, job.prompt)
        except ValidationError as exc:
            await tell(interaction, messages.button_refused(job.id, action, str(exc)))
            return
        gen = interaction.client.settings.generation
        seed, _ = check_seed(None)
        params = dataclasses.replace(
            one,
            prompt=prompt,
            seed=seed,
            steps=min(job.steps, gen.max_steps),
            strength=gen.vary_subtle_strength,
            source_path=part,
        )
        await enqueue(interaction, params, action, deadline_s=_left(started), source=job)


async def _post_picked(interaction: Interaction, grid: JobRecord, params: JobParams, part: str) -> None:
    """U<n>: the grid's image n as a result of its own (a row born painted, nothing charged), posted
    as the reply to the click (which the result then replaces) with the result buttons."""
    bot = interaction.client
    new = new_job(interaction, params, "pick", source_job_id=grid.id)
    try:
        job = await bot.store.record_pick(new, part, deadline_s=ANSWER_DEADLINE_S / 2)
    except StoreBusy:
        await tell(interaction, messages.DATABASE_BUSY)
        return
    try:
        await interaction.response.defer(thinking=True)
        msg = await interaction.edit_original_response(
            content=f"**{messages.derived_title(job)}**", allowed_mentions=messages.NO_PINGS
        )
        await bot.queue.attach_message(job.id, msg.id)
    except discord.HTTPException as exc:  # delivery finds another way (the channel)
        log.warning("job %d: could not answer the U click (%s); posting it anyway", job.id, exc)
    await bot.queue.deliver_picked(job)


RESULT_BUTTONS = (RerollButton, VaryButton, UpscaleButton, RemixButton, DeleteButton, GridButton)


def result_view(job_id: int) -> discord.ui.View:
    """The buttons under every result (two rows): Re-roll, Vary (Subtle), Vary (Strong), Upscale;
    Remix, Delete."""
    view = discord.ui.View(timeout=None)
    for item in (
        RerollButton(job_id),
        VaryButton(job_id, "subtle"),
        VaryButton(job_id, "strong"),
        UpscaleButton(job_id),
        RemixButton(job_id),
        DeleteButton(job_id),
    ):
        view.add_item(item)
    return view


def grid_view(job_id: int, count: int) -> discord.ui.View:
    """The buttons under a grid of `count` images: U1..Un, then V1..Vn."""
    view = discord.ui.View(timeout=None)
    for kind in ("u", "v"):
        for index in range(1, min(count, MAX_COUNT) + 1):
            view.add_item(GridButton(job_id, kind, index))
    return view


def view_for(job: JobRecord) -> discord.ui.View:
    """What goes under a job's result: a grid's U and V buttons, else the six result buttons."""
    return grid_view(job.id, job.count) if job.count > 1 else result_view(job.id)


# ---------------------------------------------------------------- Remix's form


def remix_form(job: JobRecord, max_prompt_chars: int) -> discord.ui.Modal:
    """The form Remix opens: the result's prompt and seed, prefilled. It is not kept by discord.py
    (stopped before it is sent): its submission reaches `on_interaction`, before or after a restart."""
    form = discord.ui.Modal(title=messages.remix_title(job.id), custom_id=f"{PREFIX}remix-form:{job.id}", timeout=None)
    form.add_item(
        discord.ui.TextInput(
            label=messages.REMIX_PROMPT_LABEL,
            style=discord.TextStyle.paragraph,
            custom_id=REMIX_PROMPT,
            default=job.prompt[: min(4000, max_prompt_chars)],
            max_length=min(4000, max_prompt_chars),
            required=True,
        )
    )
    form.add_item(
        discord.ui.TextInput(
            label=messages.REMIX_SEED_LABEL,
            custom_id=REMIX_SEED,
            default=str(job.seed),
            max_length=len(str(MAX_SEED)),
            required=False,
        )
    )
    form.stop()  # not stored: `remix_submitted` takes its answer
    return form


def form_values(data: Mapping[str, object] | None) -> dict[str, str]:
    """The text inputs of a modal submission by custom id, in action rows or labels (as Discord sends
    them), whatever else the payload carries."""
    found: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, list):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            custom_id, value = node.get("custom_id"), node.get("value")
            if isinstance(custom_id, str) and isinstance(value, str):
                found.setdefault(custom_id, value)
            walk(node.get("components"))
            walk(node.get("component"))

    walk((data or {}).get("components"))
    return found


def _form_seed(text: object) -> int:
    """The seed typed in the form: empty or -1 draws a random one."""
    if text is None or (isinstance(text, str) and text.strip() in ("", "-1")):
        return check_seed(None)[0]
    if not isinstance(text, str) or not text.strip().isdigit():
        raise ValidationError(f"seed must be a whole number between 0 and {MAX_SEED} (or empty for a random one)")
    return check_seed(int(text.strip()))[0]


async def remix_submitted(interaction: Interaction, job_id: int) -> None:
    """Remix's form came back: the edited prompt (and seed) from noise at the result's size, the
    result checked again as a click is. A result larger than any size /imagine paints (an Upscale)
    is remixed at the bot's own size instead."""
    started = time.monotonic()
    values = form_values(interaction.data)
    job = await _result(interaction, job_id, "remix", needs_file=False, deadline_s=ANSWER_DEADLINE_S / 2)
    if job is None:
        return
    try:
        prompt = _checked_prompt(interaction, values.get(REMIX_PROMPT))
        seed = _form_seed(values.get(REMIX_SEED))
    except ValidationError as exc:
        await tell(interaction, messages.remix_refused(exc))
        return
    gen = interaction.client.settings.generation
    width, height = job.width, job.height
    presets = size_presets(gen.width, gen.height).values()
    if width * height > max(p.width * p.height for p in presets):
        width, height = gen.width, gen.height
    params = JobParams(prompt, seed, min(job.steps, gen.max_steps), width, height)
    await enqueue(interaction, params, "remix", deadline_s=_left(started), source=job)


async def answer_modal(interaction: Interaction) -> None:
    """A form came back: Remix's is taken (`remix_submitted`), any other one (forged, or of a
    version without it) answered as no longer active."""
    data: Mapping[str, object] = interaction.data or {}
    custom_id = data.get("custom_id", "")
    match = REMIX_FORM_ID.fullmatch(custom_id) if isinstance(custom_id, str) else None
    if match is not None:
        try:
            await remix_submitted(interaction, int(match["job_id"]))
        except Exception:  # as the command tree's error handler does: log it, tell the member briefly
            log.exception("a Remix form could not be handled")
            if not interaction.response.is_done():
                await tell(interaction, messages.INTERNAL_ERROR)
    elif not interaction.response.is_done():
        await interaction.response.send_message(
            messages.BUTTON_INACTIVE, ephemeral=True, allowed_mentions=messages.NO_PINGS
        )


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
