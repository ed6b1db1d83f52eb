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
