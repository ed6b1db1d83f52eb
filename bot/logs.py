"""Logging set-up and secret redaction.

``setup_logging`` puts one handler on the root logger (stderr) with a
:class:`RedactingFilter`, so every record that reaches it, from any logger, has
the known secrets (the bot token) replaced by ``[REDACTED]`` — in the message,
its arguments, exception text and stack. ``redact`` applies the same to any
string, e.g. an error shown to a user.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = ["RedactingFilter", "REDACTED", "add_secret", "redact", "setup_logging"]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _forms(secret: str) -> set[str]:
    """The secret and the ways URL encoding may spell it."""
    return {secret, quote(secret), quote(secret, safe=""), quote_plus(secret), quote_plus(secret, safe="")}


def _compile(secrets: Iterable[str]) -> re.Pattern[str] | None:
    forms = {form for secret in secrets for form in _forms(secret)}
    if not forms:
        return None
    # Longest first so a secret is never half-replaced by a shorter one; case-insensitive
    # so %2f and %2F both match.
    alternatives = sorted(forms, key=lambda s: (-len(s), s))
    return re.compile("|".join(re.escape(s) for s in alternatives), re.IGNORECASE)


def add_secret(value: str) -> None:
    """Register a secret for redaction. Empty or short (< 8 characters) values are ignored."""
    global _pattern
    if not isinstance(value, str):
        return
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _pattern = _compile(_secrets)


def _clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def _redact_with(pattern: re.Pattern[str] | None, text: str) -> str:
    return pattern.sub(REDACTED, text) if pattern is not None else text


def redact(text: str) -> str:
    """``text`` with every registered secret (and its URL-encoded forms) replaced."""
    return _redact_with(_pattern, text)


class RedactingFilter(logging.Filter):
    """Replaces secrets in a record; never drops one.

    Uses the secrets registered with :func:`add_secret` plus those given here.
    The message is formatted here (``msg % args``) and stored redacted with
    ``args`` cleared; exception and stack text are formatted, redacted and
    stored in ``exc_text``/``stack_info`` with ``exc_info`` cleared so no handler
    formats the raw exception again.
    """

    def __init__(self, secrets: Iterable[str] = (), name: str = "") -> None:
        super().__init__(name)
        self._own = {s.strip() for s in secrets if isinstance(s, str) and len(s.strip()) >= MIN_SECRET_LENGTH}

    def _pattern(self) -> re.Pattern[str] | None:
        if not self._own:
            return _pattern
        with _lock:
            return _compile(_secrets | self._own)

    def filter(self, record: logging.LogRecord) -> bool:
        pattern = self._pattern()
        if pattern is None:
            return True
        try:
            self._redact_record(record, pattern)
        except Exception:  # never let a record through unredacted, never drop it
            record.msg = "[log record could not be redacted]"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True

    @staticmethod
    def _redact_record(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
        try:
            message = record.getMessage()
            formatted = True
        except Exception:  # bad %-args: logging would print them raw in handleError
            message = f"{record.msg} (unformattable arguments: {record.args!r})"
            formatted = False
        redacted = _redact_with(pattern, message)
        if redacted != message or not formatted:
            record.msg = redacted
            record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = _redact_with(pattern, text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = _redact_with(pattern, record.exc_text)
        if record.stack_info:
            record.stack_info = _redact_with(pattern, record.stack_info)


_NETWORK_ERRORS = ("GatewayNotFound", "ConnectionClosed", "DiscordServerError")


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # connection refused or reset, DNS, timeouts (asyncio's too)
        return True
    return any(cls.__module__.startswith("aiohttp") or cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


class NetworkTracebackFilter(logging.Filter):
    """A network failure that a library logs with its traceback (discord.py's "Attempting a
    reconnect in 4s") becomes one line: the message and the error. The traceback says nothing a
    self-hoster can act on; DEBUG keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_network_error(exc):
            detail = str(exc).splitlines()[0] if str(exc) else ""
            record.msg = f"{record.getMessage()} ({type(exc).__name__}{': ' + detail if detail else ''})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def setup_logging(level: str = "INFO", *, secrets: Iterable[str] = ()) -> None:
    """One stderr handler on the root logger, with redaction; safe to call again.

    discord.py's loggers stay at WARNING unless ``level`` is DEBUG.
    """
    name = str(level).upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    for secret in secrets:
        add_secret(secret)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_fluxbot", False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr)
    handler._fluxbot = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    if numeric > logging.DEBUG:
        handler.addFilter(NetworkTracebackFilter())
    handler.addFilter(RedactingFilter())  # last: it also sees the text the filter above made
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("discord").setLevel(logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)
