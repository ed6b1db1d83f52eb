"""The gate, run by the README's test command: ruff's lint rules, ruff's formatting, mypy on `bot`.

Their configuration (and why each rule set) is in pyproject.toml; the versions are pinned in the
`test` extra. Each runs without a cache of its own from earlier runs, as on a fresh machine.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ceilings import START

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = args[0]
    if (
        shutil.which(tool) is None
        and subprocess.run([sys.executable, "-m", tool, "--version"], capture_output=True).returncode != 0
    ):
        pytest.fail(f"{tool} is not installed: install the test extra (pip install '.[test]')")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=START)


def test_ruff_finds_nothing():
    done = run_tool("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_code_is_formatted():
    done = run_tool("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout[-6000:] + done.stderr[-2000:]


def test_mypy_finds_no_errors(tmp_path):
    done = run_tool("mypy", "--cache-dir", str(tmp_path / "mypy-cache"))  # `packages` and flags: pyproject.toml
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Success" in done.stdout
