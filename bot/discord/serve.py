"""Keep the bot connected: log in (retrying while Discord cannot be reached), then run until stopped.

discord.py reconnects by itself once connected; what it does not do is retry the first login, so
a DNS hiccup or a router still booting when the box starts would end the bot. Refusals that
retrying cannot fix (a bad or reset token, a privileged intent) end it with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import discord

from ..config import Settings
from ..engine.api import ImageEngine
from .app import FluxBot

log = logging.getLogger("fluxbot.discord")

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0

# Network trouble, or Discord itself failing (5xx): worth another try.
UNREACHABLE = (aiohttp.ClientError, OSError, asyncio.TimeoutError, discord.GatewayNotFound, discord.DiscordServerError)

CLOSE_REASONS = {
    4004: "authentication failed: the token was reset or revoked; put the new one in DISCORD_TOKEN",
    4010: "invalid shard",
    4011: "this bot needs sharding (it is in too many servers for one connection)",
    4012: "invalid gateway API version",
    4013: "invalid intents",
}


class DiscordRefused(Exception):
    """Discord refused the bot for good; the message (one line, no secrets) says what to fix."""


def describe_unreachable(exc: BaseException) -> str:
    """A short reason for a failed connection, without the traceback."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _on_stop_signals(stop: Callable[[], None]) -> None:
    """SIGTERM (`docker stop`) and Ctrl-C close the bot from the event loop, in order: the job in
    progress is flagged and stops at its next step, the ledger is closed. (A KeyboardInterrupt
    raised wherever the main thread happened to be could land inside any task.)"""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows; not the main thread
            loop.add_signal_handler(sig, stop)


async def _first(work: asyncio.Future[Any], stopping: asyncio.Event) -> bool:
    """Wait for `work` or a stop signal; True when `work` finished first (its error is raised)."""
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if work.done():
        work.result()
        return True
    return False


async def serve(
    settings: Settings,
    engine_loader: Callable[[], ImageEngine],
    token: str,
    *,
    first_retry_s: float = FIRST_RETRY_S,
    max_retry_s: float = MAX_RETRY_S,
) -> None:
    """Run the bot until a stop signal or Ctrl-C. Raises `DiscordRefused` when Discord says no."""
    stopping = asyncio.Event()
    _on_stop_signals(stopping.set)
    delay = first_retry_s
    while not stopping.is_set():
        bot = FluxBot(settings, engine_loader)
        async with bot:  # closed (queue stopped, database closed) however this block ends
            login = asyncio.ensure_future(bot.login(token))  # also runs setup_hook: database, commands, worker
            try:
                if not await _first(login, stopping):
                    login.cancel()
                    await asyncio.gather(login, return_exceptions=True)
                    return
            except discord.LoginFailure:
                raise DiscordRefused(
                    "Discord rejected the bot token: check DISCORD_TOKEN or [discord] token "
                    "(Developer Portal -> your application -> Bot -> Reset Token)"
                ) from None
            except UNREACHABLE as exc:
                log.warning("cannot reach Discord (%s); trying again in %.0f s", describe_unreachable(exc), delay)
            else:
                connect = asyncio.ensure_future(bot.connect())
                try:
                    if not await _first(connect, stopping):
                        log.info("stopping: the job in progress (if any) stops at its next step")
                        await bot.close()  # connect() returns once the bot is closed
                        await asyncio.gather(connect, return_exceptions=True)
                except discord.PrivilegedIntentsRequired as exc:
                    raise DiscordRefused(f"Discord refused a privileged intent: {exc}") from None
                except discord.ConnectionClosed as exc:
                    reason = CLOSE_REASONS.get(exc.code, exc.reason or "no reason given")
                    raise DiscordRefused(f"Discord closed the connection (code {exc.code}): {reason}") from None
                return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        delay = min(delay * 2, max_retry_s)
