"""Tell members about their jobs: queue position, progress, the finished image, failures.

Everything goes through the interaction's webhook (works without channel permissions) while its
token is fresh; after ~14 minutes the token is near its 15-minute end, so results go to the
channel as a message that mentions the requester.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import discord

from ..images import fit_upload
from ..jobs import DeliveryFailed
from ..store import JobRecord
from . import messages
from .views import result_view

log = logging.getLogger("fluxbot.discord")

TOKEN_FRESH_S = 14 * 60
DEFAULT_UPLOAD_LIMIT = 8 * 1024 * 1024
UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
INVALID_WEBHOOK_TOKEN = 50027


def _result_stem(job: JobRecord) -> str:
    """How every upload of the job's result is named at the start (crash recovery looks for it)."""
    return f"fluxbot-{job.id}-"


def _holds_result(job: JobRecord, msg: discord.Message) -> bool:
    return any(a.filename.startswith(_result_stem(job)) for a in msg.attachments)


class DiscordDelivery:
    def __init__(self, bot: discord.Client):
        self.bot = bot

    # ------------------------------------------------------------------ plumbing
    def _webhook(self, job: JobRecord) -> discord.Webhook | None:
        if not job.interaction_token or not job.application_id or job.interaction_created_at is None:
            return None
        if time.time() - job.interaction_created_at > TOKEN_FRESH_S:
            return None
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self.bot)

    async def _edit_status(self, job: JobRecord, content: str) -> bool:
        """Edit the progress message; False when there is none to edit (no fresh token or message)."""
        webhook = self._webhook(job)
        if webhook is None or job.progress_message_id is None:
            return False
        await webhook.edit_message(job.progress_message_id, content=content, allowed_mentions=messages.NO_PINGS)
        return True

    async def _channel(self, job: JobRecord):
        if job.channel_id is None:
            raise DeliveryFailed("the job has no channel to post to")
        channel = self.bot.get_channel(job.channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(job.channel_id)
            except (discord.NotFound, discord.Forbidden) as exc:
                raise DeliveryFailed(f"channel {job.channel_id} is gone or hidden: {exc.text}") from None
        return channel

    # ------------------------------------------------------------------ Delivery protocol
    async def position(self, job: JobRecord, position: int, *, model_loading: bool = False) -> None:
        await self._edit_status(job, messages.queued(position, model_loading=model_loading))

    async def started(self, job: JobRecord, *, compiling: bool = False) -> None:
        await self._edit_status(job, messages.starting(compiling=compiling))

    async def progress(self, job: JobRecord, step: int, total: int) -> None:
        await self._edit_status(job, messages.progress(step, total))

    async def cancelled(self, job: JobRecord) -> None:
        await self._edit_status(job, messages.cancelled())

    async def failed(self, job: JobRecord, reason: str) -> None:
        text = messages.failed(reason)
        try:
            if await self._edit_status(job, text):
                return
        except discord.NotFound:
            pass
        channel = await self._channel(job)
        await channel.send(
            messages.failed_in_channel(job.user_id, reason), allowed_mentions=messages.ping_only(job.user_id)
        )

    async def find_delivered(self, job: JobRecord) -> int | None:
        """Did a result for this job already arrive? (crash between sending and recording)"""
        webhook = self._webhook(job)
        if webhook is not None and job.progress_message_id is not None:
            try:
                msg = await webhook.fetch_message(job.progress_message_id)
            except discord.HTTPException as exc:  # gone, or Discord would not say: look in the channel
                if not isinstance(exc, discord.NotFound):
                    log.warning("job %d: could not read the progress message: %s", job.id, exc)
                msg = None
            if msg is not None and _holds_result(job, msg):
                return msg.id
        # The result may be a message of its own: a followup (the progress message was deleted) or a
        # channel post (token expired; its nonce dedupes a repeat only for minutes). Look in the channel.
        return await self._find_in_channel(job)

    async def _find_in_channel(self, job: JobRecord) -> int | None:
        """The newest message since the job was queued that is this job's result. Every message since
        then is looked through (discord.py pages 100 at a time): in a busy channel the result may be
        hundreds of messages back, and missing it would post the image twice."""
        try:
            channel = await self._channel(job)
            after = datetime.fromtimestamp(job.queued_at, timezone.utc)
            async for msg in channel.history(limit=None, after=after, oldest_first=False):
                ours = (self.bot.user is not None and msg.author.id == self.bot.user.id) or (
                    job.application_id is not None and msg.webhook_id == job.application_id
                )
                if ours and _holds_result(job, msg):  # a member's upload of the same name does not count
                    return msg.id
        except (DeliveryFailed, discord.HTTPException) as exc:
            log.warning("job %d: could not look for an earlier result in channel %s: %s", job.id, job.channel_id, exc)
        return None

    async def deliver(self, job: JobRecord, image_path: Path) -> int | None:
        limit = job.upload_limit or DEFAULT_UPLOAD_LIMIT  # the interaction's, kept in the ledger
        # Reading and re-encoding a 1024x1024 image takes long enough to stall the event loop.
        data, ext = await asyncio.to_thread(lambda: fit_upload(image_path.read_bytes(), limit))
        if ext != "png":
            log.info("job %d: PNG over the %d-byte upload limit; sent as %s", job.id, limit, ext)
        name = f"{_result_stem(job)}{job.seed}.{ext}"

        def file() -> discord.File:  # a File is consumed by one request; each attempt needs its own
            return discord.File(io.BytesIO(data), filename=name)

        embed = messages.result_embed(job)
        embed.set_image(url=f"attachment://{name}")
        webhook = self._webhook(job)
        if webhook is not None and job.progress_message_id is not None:
            try:  # an edit: repeated by a retry, it is still one message
                msg = await webhook.edit_message(
                    job.progress_message_id,
                    content="",
                    embed=embed,
                    attachments=[file()],
                    view=result_view(job.id),
                    allowed_mentions=messages.NO_PINGS,
                )
                return msg.id
            except discord.NotFound as exc:
                if exc.code == UNKNOWN_MESSAGE:
                    log.info("job %d: progress message was deleted; posting the result anew", job.id)
                elif exc.code in (UNKNOWN_WEBHOOK, INVALID_WEBHOOK_TOKEN):
                    log.info("job %d: interaction token no longer valid; posting to the channel", job.id)
                    webhook = None
                else:
                    raise
            except discord.Forbidden as exc:
                raise DeliveryFailed(f"Discord refused the reply: {exc.text}") from None
        # A new message goes to the channel first: its nonce makes Discord drop a repeat, so an HTTP
        # retry after an answer lost on the way (a 502 for a post that was stored) cannot double it.
        # A webhook follow-up has no such guard: it is the way only where the bot may not post.
        try:
            return await self._post_to_channel(job, embed, file)
        except DeliveryFailed as exc:
            if webhook is None:
                raise
            log.info("job %d: %s; sending the result as a follow-up instead", job.id, exc)
        try:
            msg = await webhook.send(
                embed=embed, file=file(), view=result_view(job.id), allowed_mentions=messages.NO_PINGS, wait=True
            )
        except (discord.NotFound, discord.Forbidden) as exc:
            raise DeliveryFailed(f"Discord refused the reply: {exc.text}") from None
        return msg.id

    async def _post_to_channel(self, job: JobRecord, embed: discord.Embed, file: Callable[[], discord.File]) -> int:
        channel = await self._channel(job)
        try:
            msg = await channel.send(
                messages.ready_in_channel(job.user_id),
                embed=embed,
                file=file(),
                view=result_view(job.id),
                nonce=f"fluxbot-{job.id}",  # Discord drops a repeat of this post (enforce_nonce)
                allowed_mentions=messages.ping_only(job.user_id),
            )
        except discord.Forbidden as exc:
            raise DeliveryFailed(f"missing permission to post in channel {job.channel_id}: {exc.text}") from None
        return msg.id
