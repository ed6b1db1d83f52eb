"""One job-parameters type: every place a job's parameters go is derived from `JobParams`."""

import contextlib
import dataclasses
import sqlite3

from bot.engine.api import GenerationRequest
from bot.images import png_metadata
from bot.params import PARAM_FIELDS, JobParams
from bot.store import SQL_INSERT_JOB, JobRecord, NewJob, Store


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_job_type_carries_every_parameter():
    assert PARAM_FIELDS == ("prompt", "seed", "steps", "width", "height", "strength", "source_path", "count")
    for cls in (NewJob, JobRecord, GenerationRequest):
        assert issubclass(cls, JobParams)
        assert set(PARAM_FIELDS) <= field_names(cls), cls


def test_the_ledger_insert_and_png_metadata_name_every_parameter():
    for name in PARAM_FIELDS:
        assert f":{name}" in SQL_INSERT_JOB
    meta = png_metadata(JobParams("a cat", 7, 3, 64, 48), "tiny", job=5)
    assert meta == {
        "prompt": "a cat",
        "seed": 7,
        "steps": 3,
        "size": "64x48",
        "model": "tiny",
        "job": 5,
        "generator": "fluxbot",
    }


def test_request_and_params_round_trip():
    params = JobParams("a cat", 7, 3, 64, 48)
    request = GenerationRequest.of(params, guidance=2.5)
    assert request.guidance == 2.5 and request.params() == params
    job = NewJob(**vars(params), user_id=1, guild_id=None, channel_id=None)
    assert job.params() == params and type(job.params()) is JobParams


async def test_the_migrated_table_has_a_column_per_parameter(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite", default_daily_limit=5)
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert set(PARAM_FIELDS) <= columns
