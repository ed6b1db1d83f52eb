"""The quota day: a UTC date, the same for every member wherever they are, ending at UTC midnight."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone


def as_utc(now: datetime | None) -> datetime:
    """``now`` in UTC, or the current time for ``None``; a naive datetime is refused, not guessed."""
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: pass a timezone-aware datetime (UTC)")
    return now.astimezone(timezone.utc)


def utc_day(now: datetime) -> str:
    """The quota day of ``now``: its UTC date as ``YYYY-MM-DD``."""
    return as_utc(now).date().isoformat()


def next_reset(now: datetime) -> datetime:
    """The next UTC midnight after ``now`` (tz-aware), when the quota day of ``now`` ends."""
    day = as_utc(now).date() + timedelta(days=1)
    return datetime.combine(day, time(0), tzinfo=timezone.utc)
