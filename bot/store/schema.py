"""The database schema, as the forward-only list of migrations that builds it.

A database records how far it got in ``PRAGMA user_version``; opening it applies the missing steps
(see :mod:`bot.store.database`). A released migration is never edited, since databases in the wild
already ran it: every change is a new :class:`Migration` appended to ``MIGRATIONS``.

Adding a job parameter: a field with a default in :class:`bot.params.JobParams` (the ledger's
INSERT and SELECT follow its fields) plus a new migration that adds its column with the same
default, e.g. ``ALTER TABLE jobs ADD COLUMN guidance REAL NOT NULL DEFAULT 3.5``, so rows admitted
before it read back with that value.

No table declares ``REFERENCES``, so foreign-key enforcement is left off; a migration that adds
one must also turn on ``PRAGMA foreign_keys`` for every connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from .records import StoreError


@dataclass(frozen=True)
class Migration:
    """One forward step of the schema. Never edit a released migration; append a new one."""

    version: int
    name: str
    sql: str

    @property
    def statements(self) -> list[str]:
        return split_sql(self.sql)


MIGRATION_1_INITIAL = """
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE user_limits (
    user_id     INTEGER PRIMARY KEY,
    daily_limit INTEGER NOT NULL CHECK (daily_limit >= 0)
);

CREATE TABLE usage (
    user_id INTEGER NOT NULL,
    day     TEXT    NOT NULL,
    used    INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (user_id, day)
) WITHOUT ROWID;

CREATE TABLE jobs (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id                INTEGER NOT NULL,
    guild_id               INTEGER,
    channel_id             INTEGER,
    prompt                 TEXT    NOT NULL,
    seed                   INTEGER NOT NULL,
    steps                  INTEGER NOT NULL,
    width                  INTEGER NOT NULL,
    height                 INTEGER NOT NULL,
    status                 TEXT    NOT NULL CHECK (status IN
                               ('queued', 'running', 'generated', 'done', 'failed', 'cancelled')),
    attempts               INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    charged_day            TEXT,
    queued_at              REAL    NOT NULL,
    started_at             REAL,
    finished_at            REAL,
    error                  TEXT,
    interaction_id         INTEGER,
    interaction_token      TEXT,
    interaction_created_at REAL,
    application_id         INTEGER,
    origin                 TEXT    NOT NULL DEFAULT 'imagine'
);

CREATE INDEX jobs_status ON jobs (status);
"""

MIGRATION_2_DELIVERY_RECOVERY = """
ALTER TABLE jobs ADD COLUMN progress_message_id INTEGER;
ALTER TABLE jobs ADD COLUMN result_path TEXT;
ALTER TABLE jobs ADD COLUMN result_message_id INTEGER;
ALTER TABLE jobs ADD COLUMN duration_s REAL;

DROP INDEX jobs_status;
CREATE INDEX jobs_active ON jobs (status, id)
    WHERE status IN ('queued', 'running', 'generated');
CREATE INDEX jobs_user_active ON jobs (user_id, status)
    WHERE status IN ('queued', 'running', 'generated');
CREATE INDEX jobs_charged ON jobs (user_id, charged_day)
    WHERE charged_day IS NOT NULL;
"""

MIGRATION_3_UPLOAD_LIMIT = """
ALTER TABLE jobs ADD COLUMN upload_limit INTEGER;
"""

# A member's /settings: NULL in a column means "not chosen" (the bot's default applies). The size
# is a preset's name, checked by the bot (presets may be added without a migration); steps have no
# upper bound here because the configured maximum can change (the bot caps them when it uses them).
MIGRATION_4_MEMBER_SETTINGS = """
CREATE TABLE member_settings (
    user_id  INTEGER PRIMARY KEY,
    size     TEXT    CHECK (size IS NULL OR length(size) > 0),
    steps    INTEGER CHECK (steps IS NULL OR steps >= 1),
    count    INTEGER CHECK (count IS NULL OR count BETWEEN 1 AND 4),
    previews INTEGER CHECK (previews IS NULL OR previews IN (0, 1))
);
"""

# Relax mode ([quota] relax): a job admitted after its member's quota was used up, charged nothing
# (its charged_day stays NULL), painted only when no charged job waits. Rows from before are not.
MIGRATION_5_RELAX = """
ALTER TABLE jobs ADD COLUMN relax INTEGER NOT NULL DEFAULT 0 CHECK (relax IN (0, 1));
"""

# Derived jobs (the result buttons Vary, Upscale, Remix): the job a result came from, the image an
# img2img job paints from (its path kept here, so a restart re-runs the job without the source's
# row), its denoising strength (1: from noise, as every earlier row), the quota units the job took
# (Upscale takes 2; every earlier row took 1) and when the Delete button removed a result.
MIGRATION_6_DERIVED = """
ALTER TABLE jobs ADD COLUMN strength REAL NOT NULL DEFAULT 1.0 CHECK (strength > 0 AND strength <= 1);
ALTER TABLE jobs ADD COLUMN source_path TEXT;
ALTER TABLE jobs ADD COLUMN source_job_id INTEGER;
ALTER TABLE jobs ADD COLUMN units INTEGER NOT NULL DEFAULT 1 CHECK (units >= 1);
ALTER TABLE jobs ADD COLUMN result_deleted_at REAL;
"""

# A grid (/imagine count 2..4): the images one job paints, each with its own seed (seed, seed + 1, ...);
# its `units` are the count. Every earlier row painted one image.
MIGRATION_7_COUNT = """
ALTER TABLE jobs ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count >= 1 AND count <= 4);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial: settings, user_limits, usage, jobs", MIGRATION_1_INITIAL),
    Migration(2, "delivery and recovery columns, active-job indexes", MIGRATION_2_DELIVERY_RECOVERY),
    Migration(3, "the interaction's upload limit, kept across restarts", MIGRATION_3_UPLOAD_LIMIT),
    Migration(4, "members' own defaults (/settings)", MIGRATION_4_MEMBER_SETTINGS),
    Migration(5, "relax-mode jobs (free, after the charged ones)", MIGRATION_5_RELAX),
    Migration(6, "derived jobs: source, strength, units, deleted results", MIGRATION_6_DERIVED),
    Migration(7, "grids: the images one job paints", MIGRATION_7_COUNT),
)


def split_sql(script: str) -> list[str]:
    """Split a script into complete statements (semicolons inside strings or triggers are kept)."""
    statements: list[str] = []
    parts = script.split(";")
    buffer = ""
    for index, part in enumerate(parts):
        buffer += part
        if index == len(parts) - 1:
            break
        buffer += ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: {buffer.strip()[:80]!r}")
    return statements


def validate_migrations(migrations: Sequence[Migration]) -> int:
    """Check that versions run 1, 2, ... N without gaps; return N (the latest version)."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise StoreError(
                f"migration list is broken: expected version {expected}, found {migration.version} "
                f"({migration.name!r}); versions must run 1..N without gaps"
            )
        if not migration.statements:
            raise StoreError(f"migration {migration.version} ({migration.name!r}) has no statements")
    return len(migrations)


LATEST_VERSION = validate_migrations(MIGRATIONS)
