"""The bot as a process of its own (`fluxbot run` through tests/bot_process.py) against a FakeDiscord
served from the test's process: for crashes, signals and the network at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ceilings import START
from fake_discord import FakeDiscord

LAUNCHER = Path(__file__).with_name("bot_process.py")


def write_config(tmp_path: Path, model_dir: Path, fake: FakeDiscord) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[discord]
guild_ids = [{fake.guild_id}]

[model]
preset = "tiny-random"
dir = "{model_dir.as_posix()}"
device = "cpu"

[generation]
width = 256
height = 256
default_steps = 2

[quota]
daily_limit = 10

[queue]
max_size = 100
max_per_user = 5

[storage]
database = "{(tmp_path / "fluxbot.db").as_posix()}"
results_dir = "{(tmp_path / "results").as_posix()}"

[metrics]
listen = ""
""")
    return config


class BotProcess:
    """One `fluxbot run` child process; its output goes to a log file shown when a check fails."""

    def __init__(self, fake: FakeDiscord, config: Path, log: Path):
        self.fake, self.config, self.log = fake, config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(
        self,
        kill_point: str | None = None,
        marker: Path | None = None,
        wait_for: Path | None = None,
        step_delay: float = 0.0,
    ) -> None:
        args = [
            str(LAUNCHER),
            "--api-base",
            self.fake.api_base,
            "--gateway",
            self.fake.gateway_url,
            "--config",
            str(self.config),
        ]
        if kill_point:
            args += ["--kill-point", kill_point, "--marker", str(marker)]
        if wait_for:
            args += ["--wait-for", str(wait_for)]
        if step_delay:
            args += ["--step-delay", str(step_delay)]
        env = {**os.environ, "DISCORD_TOKEN": self.fake.token, "FLUXBOT_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as out:
            out.write(f"\n===== start (kill point: {kill_point}) =====\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise AssertionError(f"the bot process exited early with code {self.proc.returncode}:\n{self.log_tail()}")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()  # SIGKILL: no cleanup of any kind runs in the bot
            await self.proc.wait()

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (what `docker stop` sends), then SIGKILL if it does not exit in time."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                await self.kill()
                raise AssertionError(f"the bot did not stop on SIGTERM within {timeout}s:\n{self.log_tail()}") from None
        return self.proc.returncode


async def until(check, proc: BotProcess, timeout: float, what: str):
    """Poll `check` (and that the process is alive) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        proc.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; bot log:\n{proc.log_tail()}")
        await asyncio.sleep(0.05)


LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # a write lock, as another program (or a backup tool) would take
print("locked", flush=True)
sys.stdin.readline()
conn.rollback()
"""


@contextlib.asynccontextmanager
async def write_lock_held(database: Path, timeout: float = START) -> AsyncIterator[None]:
    """Another process holds SQLite's write lock on `database` from entry until the block ends
    (then it lets go and exits); readers still read (WAL), writers wait out their busy timeout."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_HOLDER,
        str(database),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), timeout)
        assert line == b"locked\n", f"the lock holder said {line!r}"
        yield
    finally:
        if holder.returncode is None:
            with contextlib.suppress(ConnectionError):
                holder.stdin.write(b"\n")
                await holder.stdin.drain()
            try:
                await asyncio.wait_for(holder.wait(), timeout)
            except asyncio.TimeoutError:
                holder.kill()
                await holder.wait()
