"""What the store hands out and takes in: job rows, quota answers, admission verdicts.

Plain values with no database behind them, so callers (the queue, the Discord side) can build and
read them without a connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from ..params import JobParams

ORIGINS = ("imagine", "reroll", "vary_subtle", "vary_strong", "upscale", "remix", "pick")  # pick: a grid's U
"""How a job was asked for: /imagine, or a result's button (every one but /imagine names its
`source_job_id`, the result it came from)."""


class StoreError(Exception):
    """The database cannot be opened, migrated or used, or a request makes no sense."""


class StoreBusy(StoreError):
    """Another writer held the database past the caller's deadline: nothing was written."""


class InvalidTransition(StoreError):
    """The job is not where this move starts from (cancelled meanwhile, say): nothing changed."""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    GENERATED = "generated"  # image saved to disk, not yet delivered
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.GENERATED)
"""Count toward queue caps; are resumed after a restart."""


@dataclass(frozen=True, kw_only=True)
class NewJob(JobParams):
    """A job to admit: its parameters plus who asked, where, and through which interaction."""

    user_id: int
    guild_id: int | None
    channel_id: int | None
    interaction_id: int | None = None
    interaction_token: str | None = None
    interaction_created_at: float | None = None  # unix seconds
    application_id: int | None = None
    origin: str = "imagine"  # one of ORIGINS
    upload_limit: int | None = None  # bytes the interaction may upload (boosted servers allow more)
    source_job_id: int | None = None  # the result a button's job came from (Re-roll, Vary, Upscale, Remix)
    units: int = 1  # quota units the job takes (Upscale: 2), all refunded if it fails


@dataclass(frozen=True, kw_only=True)
class JobRecord(JobParams):
    """One row of ``jobs``: the job's parameters plus its ledger state."""

    id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    status: JobStatus
    attempts: int
    charged_day: str | None  # the UTC day the quota unit was taken from; None once refunded
    queued_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    interaction_id: int | None
    interaction_token: str | None
    interaction_created_at: float | None
    application_id: int | None
    origin: str
    progress_message_id: int | None  # the message that shows queue position/progress
    result_path: str | None  # where the finished image waits for delivery
    result_message_id: int | None  # the delivered message
    duration_s: float | None  # generation seconds
    upload_limit: int | None  # bytes the interaction may upload; None: Discord's default
    relax: bool = False  # admitted in relax mode (quota used up): charged nothing, runs after charged jobs
    source_job_id: int | None = None  # the result a button's job came from
    units: int = 1  # quota units taken at admission (given back together on a refund)
    result_deleted_at: float | None = None  # the result's message was deleted with its Delete button


@dataclass(frozen=True)
class QuotaStatus:
    user_id: int
    day: str
    used: int
    limit: int
    remaining: int  # max(0, limit - used)
    resets_at: datetime  # next UTC midnight, tz-aware
    has_override: bool


class AdmissionStatus(enum.Enum):
    ACCEPTED = "accepted"
    QUEUE_FULL = "queue_full"
    USER_CAP = "user_cap"
    QUOTA_EXHAUSTED = "quota_exhausted"


@dataclass(frozen=True)
class Admission:
    status: AdmissionStatus
    job: JobRecord | None
    quota: QuotaStatus

    @property
    def relax(self) -> bool:
        """Accepted in relax mode: the quota was used up, so nothing was charged."""
        return self.job is not None and self.job.relax


@dataclass(frozen=True)
class LedgerStats:
    """What `/admin stats` shows from the ledger: finished jobs since the UTC day began and over
    the last 7 days."""

    images_today: int
    images_week: int
    failed_today: int
    failed_week: int
    mean_seconds_week: float | None  # painting time per delivered image; None without any
    busiest_week: tuple[tuple[int, int], ...]  # (user id, images), most first, up to 5
