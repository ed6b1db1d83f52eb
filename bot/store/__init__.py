"""The bot's SQLite store: the quota and job ledger, and the database under it.

``records`` holds the values it hands out, ``days`` the quota day, ``schema`` the migrations,
``database`` the connection (opening, migrating, locking, transactions, backup), ``ledger`` the
:class:`Store` with quotas, admission and job transitions; ``aiosqlite_shim`` is the one use of
aiosqlite's private API. Import from here; the submodules are for the store and its tests.
"""

from .days import next_reset, utc_day
from .ledger import SQL_INSERT_JOB, Store
from .records import (
    ACTIVE_STATUSES,
    ORIGINS,
    Admission,
    AdmissionStatus,
    InvalidTransition,
    JobRecord,
    JobStatus,
    LedgerStats,
    NewJob,
    QuotaStatus,
    StoreBusy,
    StoreError,
)
from .schema import LATEST_VERSION

__all__ = [
    "ACTIVE_STATUSES",
    "LATEST_VERSION",
    "ORIGINS",
    "SQL_INSERT_JOB",
    "Admission",
    "AdmissionStatus",
    "InvalidTransition",
    "JobRecord",
    "JobStatus",
    "LedgerStats",
    "NewJob",
    "QuotaStatus",
    "Store",
    "StoreBusy",
    "StoreError",
    "next_reset",
    "utc_day",
]
