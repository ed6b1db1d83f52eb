"""Tell members about their jobs: queue position, progress, the finished image, failures.

Everything goes through the interaction's webhook (works without channel permissions) while its
token is fresh; after ~14 minutes the token is near its 15-minute end, so results go to the
channel as a message that mentions the requester.

No result is posted twice by an HTTP retry after Discord stored it but its answer was lost (a 502):
an edit repeated is still one message, a channel post carries a nonce (Discord drops a repeat), and
a webhook follow-up, which has neither, is sent without discord.py's retries and sent again only
once the channel shows it did not arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import aiohttp
import discord

from ..engine.api import Preview
from ..images import fit_upload
from ..jobs import DeliveryFailed, for_job
from ..store import JobRecord, Store, StoreError
from . import messages
from .views import view_for

log = logging.getLogger("fluxbot.discord")

TOKEN_FRESH_S = 14 * 60
DEFAULT_UPLOAD_LIMIT = 8 * 1024 * 1024
UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
INVALID_WEBHOOK_TOKEN = 50027
FOLLOWUP_ATTEMPTS = 3  # a follow-up sent again only after the channel showed the last one did not arrive
LOST_ANSWER_LOOK_AFTER_S = 2.0  # x the attempt: how long Discord is given to finish before the bot looks


def _result_stem(job: JobRecord) -> str:
    """How every upload of the job's result is named at the start (crash recovery looks for it)."""
    return f"fluxbot-{job.id}-"


def _holds_result(job: JobRecord, msg: discord.Message) -> bool:
    return any(a.filename.startswith(_result_stem(job)) for a in msg.attachments)


class _AnswerLost(Exception):
    """Discord's answer to a request never came, or was a 5xx: it may or may not have carried it out."""


class _CannotLook(Exception):
    """The bot may not read the channel's history, so it cannot tell whether a message is there."""


class _OneAttempt:
    """The client's aiohttp session, for a request discord.py must not repeat by itself. Its webhook
    adapter sends a request again after a 5xx (up to 5 times), and a webhook follow-up that Discord
    stored before the 5xx would then be a second message: here a 5xx, a lost connection or a timeout
    raise `_AnswerLost` instead, out of discord.py's loop (a 429 still reaches it: nothing was done)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @contextlib.asynccontextmanager
    async def request(self, method: str, url: Any, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self._session.request(method, url, **kwargs) as response:
                if response.status >= 500:
                    raise _AnswerLost(f"{response.status} {response.reason}")
                yield response
        except (aiohttp.ClientError, OSError) as exc:  # OSError: TimeoutError and connection resets too
            raise _AnswerLost(f"{type(exc).__name__}: {exc}") from exc


def _may_read_history(channel: object) -> bool:
    """Without READ_MESSAGE_HISTORY Discord lists no messages rather than refusing: an empty history
    then says nothing about what is there."""
    if not isinstance(channel, (discord.abc.GuildChannel, discord.Thread)):
        return False
    me = channel.guild.me
    if me is None:
        return False
    perms = channel.permissions_for(me)
    return perms.view_channel and perms.read_message_history


PREVIEW_STEM = "preview"  # a preview's file name (never a result's `fluxbot-<job>-` prefix)


class DiscordDelivery:
    """`store` answers whether a member turned previews off; `previews` is the bot's `[discord] previews`."""

    def __init__(self, bot: discord.Client, *, store: Store | None = None, previews: bool = False):
        self.bot = bot
        self.store = store
        self.previews = previews

    # ------------------------------------------------------------------ plumbing
    def _webhook(self, job: JobRecord) -> discord.Webhook | None:
        if not job.interaction_token or not job.application_id or job.interaction_created_at is None:
            return None
        if time.time() - job.interaction_created_at > TOKEN_FRESH_S:
            return None
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self.bot)

    async def _edit_status(
        self, job: JobRecord, content: str, *, attachments: Sequence[discord.File] | None = None
    ) -> bool:
        """Edit the progress message; False when there is none to edit (no fresh token or message).
        `attachments` replace the message's files (a preview); None leaves them as they are."""
        webhook = self._webhook(job)
        if webhook is None or job.progress_message_id is None:
            return False
        if attachments is None:
            await webhook.edit_message(job.progress_message_id, content=content, allowed_mentions=messages.NO_PINGS)
        else:
            await webhook.edit_message(
                job.progress_message_id, content=content, attachments=attachments, allowed_mentions=messages.NO_PINGS
            )
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

    async def _source_of(self, job: JobRecord) -> JobRecord | None:
        """The result a button's job came from (an Upscale's embed says by how much it grew it);
        None for an /imagine, or when the ledger cannot say (the embed then leaves that out)."""
        if job.source_job_id is None or self.store is None:
            return None
        try:
            return await self.store.get_job(job.source_job_id)
        except StoreError as exc:
            log.warning("job %d: could not read the job it came from (%s)", job.id, exc)
            return None

    # ------------------------------------------------------------------ Delivery protocol
    async def position(self, job: JobRecord, position: int, *, model_loading: bool = False) -> None:
        await self._edit_status(job, messages.queued(position, model_loading=model_loading, relax=job.relax))

    async def started(self, job: JobRecord, *, compiling: bool = False) -> None:
        await self._edit_status(job, messages.starting(compiling=compiling, relax=job.relax))

    async def wants_previews(self, job: JobRecord) -> bool:
        """The bot sends previews and the member did not turn theirs off (/settings)."""
        if not self.previews:
            return False
        if self.store is None:
            return True
        try:
            mine = await self.store.member_settings(job.user_id)
        except StoreError as exc:
            log.warning("job %d: could not read the member's settings (%s); previews stay on", job.id, exc)
            return True
        return mine.previews is not False

    async def progress(self, job: JobRecord, step: int, total: int, *, preview: Preview | None = None) -> None:
        text = messages.progress(step, total, relax=job.relax)
        if preview is None:
            await self._edit_status(job, text)
            return
        image = await asyncio.to_thread(preview.encode)  # waits for the GPU's copy, then the JPEG
        file = discord.File(io.BytesIO(image.data), filename=f"{PREVIEW_STEM}.{image.ext}")
        await self._edit_status(job, text, attachments=[file])

    async def cancelled(self, job: JobRecord) -> None:
        await self._edit_status(job, messages.cancelled(relax=job.relax), attachments=[])  # a preview goes with the job

    async def failed(self, job: JobRecord, reason: str) -> None:
        text = messages.failed(for_job(job, reason))  # a relax job is promised no refund
        # A job that never made its image leaves a preview at most, which goes; once it was made, the
        # message may hold the result (its posting failed half-way), which stays as it is.
        drop_preview: list[discord.File] | None = [] if job.result_path is None else None
        try:
            if await self._edit_status(job, text, attachments=drop_preview):
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
        try:
            return await self._scan_channel(job, await self._channel(job))
        except (DeliveryFailed, discord.HTTPException) as exc:
            log.warning("job %d: could not look for an earlier result in channel %s: %s", job.id, job.channel_id, exc)
        return None

    async def _scan_channel(self, job: JobRecord, channel: Any) -> int | None:
        """The newest message since the job was queued that is this job's result. Every message since
        then is looked through (discord.py pages 100 at a time): in a busy channel the result may be
        hundreds of messages back, and missing it would post the image twice."""
        after = datetime.fromtimestamp(job.queued_at, timezone.utc)
        async for msg in channel.history(limit=None, after=after, oldest_first=False):
            ours = (self.bot.user is not None and msg.author.id == self.bot.user.id) or (
                job.application_id is not None and msg.webhook_id == job.application_id
            )
            if ours and _holds_result(job, msg):  # a member's upload of the same name does not count
                return msg.id
        return None

    async def _arrived(self, job: JobRecord) -> int | None:
        """The result's message if it is in the channel, None if it is not; `_CannotLook` where the
        bot may not read the channel (then neither answer would be true)."""
        try:
            channel = await self._channel(job)
        except DeliveryFailed as exc:
            raise _CannotLook(str(exc)) from None
        if not _may_read_history(channel):
            raise _CannotLook(f"no permission to read the history of channel {job.channel_id}")
        try:
            return await self._scan_channel(job, channel)
        except discord.HTTPException as exc:
            raise _CannotLook(f"channel {job.channel_id} could not be read: {exc}") from None

    async def deliver(self, job: JobRecord, image_path: Path) -> int | None:
        limit = job.upload_limit or DEFAULT_UPLOAD_LIMIT  # the interaction's, kept in the ledger
        # Reading and re-encoding a 1024x1024 image takes long enough to stall the event loop.
        data, ext = await asyncio.to_thread(lambda: fit_upload(image_path.read_bytes(), limit))
        if ext != "png":
            log.info("job %d: PNG over the %d-byte upload limit; sent as %s", job.id, limit, ext)
        name = f"{_result_stem(job)}{job.seed}.{ext}"

        def file() -> discord.File:  # a File is consumed by one request; each attempt needs its own
            return discord.File(io.BytesIO(data), filename=name)

        embed = messages.result_embed(job, source=await self._source_of(job))
        embed.set_image(url=f"attachment://{name}")
        webhook = self._webhook(job)
        if webhook is not None and job.progress_message_id is not None:
            try:  # an edit: repeated by a retry, it is still one message
                msg = await webhook.edit_message(
                    job.progress_message_id,
                    content="",
                    embed=embed,
                    attachments=[file()],
                    view=view_for(job),
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
        return await self._send_followup(job, webhook, embed, file)

    async def _send_followup(
        self, job: JobRecord, webhook: discord.Webhook, embed: discord.Embed, file: Callable[[], discord.File]
    ) -> int:
        """A webhook follow-up has no nonce: Discord keeps every copy it is sent. So discord.py does not
        repeat it (`_OneAttempt`); where its answer is lost, the bot looks in the channel for it and
        sends it again only if it is not there. Where the bot may not read the channel it cannot tell,
        and does not send it again: the job fails and is refunded, and the image may have arrived."""
        assert job.application_id is not None and job.interaction_token is not None  # a webhook has them
        session = cast(aiohttp.ClientSession, _OneAttempt(webhook.session))
        once = discord.Webhook.partial(job.application_id, job.interaction_token, session=session, client=self.bot)
        for attempt in range(1, FOLLOWUP_ATTEMPTS + 1):
            if attempt > 1 and self._webhook(job) is None:
                raise DeliveryFailed("the interaction's token ran out while the follow-up was being sent again")
            try:
                msg = await once.send(
                    embed=embed, file=file(), view=view_for(job), allowed_mentions=messages.NO_PINGS, wait=True
                )
                return msg.id
            except (discord.NotFound, discord.Forbidden) as exc:
                raise DeliveryFailed(f"Discord refused the reply: {exc.text}") from None
            except _AnswerLost as exc:
                lost = exc
            log.warning(
                "job %d: Discord's answer to the follow-up was lost (%s); looking whether it arrived", job.id, lost
            )
            await asyncio.sleep(LOST_ANSWER_LOOK_AFTER_S * attempt)
            try:
                found = await self._arrived(job)
            except _CannotLook as exc:
                raise DeliveryFailed(
                    f"Discord's answer to the follow-up was lost ({lost}) and the bot cannot see whether it "
                    f"arrived ({exc}); not sent again, so that it cannot arrive twice"
                ) from None
            if found is not None:
                log.info("job %d: the follow-up had arrived (message %d)", job.id, found)
                return found
            log.info("job %d: the follow-up is not in the channel; sending it again", job.id)
        raise DeliveryFailed(f"Discord kept losing its answer to the follow-up ({lost}); it did not arrive")

    async def _post_to_channel(self, job: JobRecord, embed: discord.Embed, file: Callable[[], discord.File]) -> int:
        channel = await self._channel(job)
        try:
            msg = await channel.send(
                messages.ready_in_channel(job.user_id),
                embed=embed,
                file=file(),
                view=view_for(job),
                nonce=f"fluxbot-{job.id}",  # Discord drops a repeat of this post (enforce_nonce)
                allowed_mentions=messages.ping_only(job.user_id),
            )
        except discord.Forbidden as exc:
            raise DeliveryFailed(f"missing permission to post in channel {job.channel_id}: {exc.text}") from None
        return msg.id
