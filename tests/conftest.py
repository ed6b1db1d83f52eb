"""Shared fixtures: one tiny random model on disk for the whole run, and engines built from it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# A newcomer's machine has empty compiler caches: unless the caller chose them (`.ci/run` does, a
# developer may point them at a directory of their own to reuse compiled kernels), every run compiles
# from scratch into a directory of its own, removed at the end. Set before anything imports torch.
_OWN_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="fluxbot-test-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_OWN_CACHE, "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_OWN_CACHE, "triton"))


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


from bot.config import ModelSettings  # noqa: E402  (after the cache set-up)


@pytest.fixture(autouse=True)
def _drop_log_handlers_of_the_test():
    """A test that runs a CLI command in-process gets setup_logging's stderr handler on the root
    logger, bound to pytest's capture of that test; later tests then logged into a closed file
    ("--- Logging error ---" in CI's output). Remove the handlers a test added when it ends."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before and getattr(h, "_fluxbot", False)]:
        root.removeHandler(handler)
        handler.close()


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
def kernel_toolchain(monkeypatch, tmp_path):
    """What Triton builds GPU kernels with, as this test decides, not as the machine has it: gcc
    found on PATH and Python.h where sysconfig says. Returns the header's path (unlink it to take
    the headers away); patch `shutil.which` again to take the compiler away."""
    import shutil
    import sysconfig

    header = tmp_path / "include" / "Python.h"
    header.parent.mkdir()
    header.write_text("")
    real_paths = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**real_paths(*a, **k), "include": str(header.parent)})
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    monkeypatch.delenv("CC", raising=False)
    return header


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
