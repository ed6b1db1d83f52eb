"""Shared fixtures: one tiny random model on disk for the whole run, and engines built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ModelSettings


def tiny_model_settings(dir: Path, **overrides) -> ModelSettings:
    """The [model] section for the tiny random model on the CPU."""
    return ModelSettings(**{"preset": "tiny-random", "dir": dir, "device": "cpu", **overrides})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_engine(model_dir):
    from bot.engine.pipeline import Engine

    return Engine.load(tiny_model_settings(model_dir))


@pytest.fixture
async def fake():
    """A fake Discord on 127.0.0.1 that the real discord.py client in the bot talks to."""
    from botkit import add_members
    from fake_discord import FakeDiscord

    f = FakeDiscord()
    await f.start()
    f.install()
    add_members(f)
    yield f
    await f.stop()


@pytest.fixture
def engine(tiny_engine):
    """The session's tiny engine behind a gate and failure switches (tests/botkit.py)."""
    from botkit import ControlledEngine

    return ControlledEngine(tiny_engine)
