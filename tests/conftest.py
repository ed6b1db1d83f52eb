"""Shared fixtures: one tiny random model on disk for the whole run, and engines built from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyModelSettings:
    """Stands in for bot.config.ModelSettings where a test needs only the model part."""

    dir: Path
    preset: str = "tiny-random"
    vram_limit_gb: float | None = 8.0
    device: str = "cpu"
    fp8_matmul: str = "auto"
    keep_resident: str = "auto"
    compile: str = "auto"
    t5_fp8: bool = False


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_engine(model_dir):
    from bot.engine.pipeline import Engine

    return Engine.load(TinyModelSettings(dir=model_dir))


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
