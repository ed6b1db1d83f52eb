"""Helpers for the bot tests: settings, an engine with a gate and failure switches, a running bot."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from pathlib import Path

from PIL import Image

from bot.config import default_settings
from bot.discord.app import FluxBot
from bot.engine.api import GenerationCancelled

from ceilings import WAIT
from fake_discord import FakeDiscord

ALICE, BOB, CAROL, ADMIN, MOD = 1001, 1002, 1003, 1009, 1010


def make_settings(tmp_path: Path, model_dir: Path, fake: FakeDiscord, **sections):
    base = {
        "discord": {"token": fake.token, "guild_ids": [fake.guild_id], "admin_user_ids": [ADMIN]},
        "model": {"preset": "tiny-random", "dir": str(model_dir), "device": "cpu"},
        "generation": {"width": 256, "height": 256, "default_steps": 3, "max_steps": 50},
        "quota": {"daily_limit": 5},
        "queue": {"max_size": 100, "max_per_user": 3},
        "storage": {"database": str(tmp_path / "fluxbot.db"), "results_dir": str(tmp_path / "results")},
        "metrics": {"listen": ""},  # off: tests that want it pick a free port
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return default_settings(**base)


class ControlledEngine:
    """The real tiny engine behind a gate (to hold the GPU busy) and per-prompt failure switches."""

    def __init__(self, engine):
        self.engine = engine
        self.preset = engine.preset
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.busy = threading.Event()

    def compiles_for(self, width: int, height: int) -> bool:
        return self.engine.compiles_for(width, height)

    def upscale_size(self, width: int, height: int):
        return self.engine.upscale_size(width, height)

    def generate(self, request, *, on_progress=None, should_cancel=None):
        self.calls.append(request.prompt)
        self.busy.set()
        try:
            deadline = time.monotonic() + WAIT
            while not self.gate.wait(0.02):  # like the real engine: a cancel stops it between steps
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled("cancelled while waiting at the test gate")
                if time.monotonic() > deadline:
                    raise TimeoutError("test gate never opened")
            for word, exc in self.fail_on.items():
                if word in request.prompt:
                    raise exc
            return self.engine.generate(request, on_progress=on_progress, should_cancel=should_cancel)
        finally:
            self.busy.clear()


def add_members(fake: FakeDiscord) -> None:
    for uid, name in ((ALICE, "alice"), (BOB, "bob"), (CAROL, "carol"), (ADMIN, "admin")):
        fake.add_member(uid, name)
    fake.add_member(MOD, "mod", manage_guild=True)


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord, settings, engine, *, progress_interval: float = 0.0, engine_loader=None):
    bot = FluxBot(settings, engine_loader or (lambda: engine), guild_ready_timeout=0.01)
    async with fake.run_bot(bot):
        await fake.wait_commands_synced()
        bot.queue.progress_interval = progress_interval
        await asyncio.wait_for(bot.queue.engine_ready.wait(), WAIT)
        yield bot


async def eventually(check, timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def embed_field(message: dict, name: str) -> str | None:
    for embed in message.get("embeds", []):
        for field in embed.get("fields", []):
            if field["name"] == name:
                return field["value"]
    return None


def has_image(message: dict) -> bool:
    """The message carries a result (named fluxbot-<job id>-...), not only a live preview."""
    return any(a["filename"].startswith("fluxbot-") for a in message.get("attachments", []))


def images_for(fake: FakeDiscord, job_id: int) -> list[dict]:
    """The messages that carry this job's result (its attachment is named fluxbot-<job id>-...)."""
    return [
        m
        for m in fake.messages.values()
        if any(a["filename"].startswith(f"fluxbot-{job_id}-") for a in m.get("attachments", []))
    ]


def ephemeral_texts(fake: FakeDiscord, interaction) -> list[str]:
    """Text of every private answer to this interaction (callback type 4 with flag 64, or followups)."""
    out = []
    for ev in fake.events:
        if f"/interactions/{interaction.id}/" in ev.path and ev.json and ev.json.get("type") == 4:
            data = ev.json.get("data") or {}
            if int(data.get("flags") or 0) & 64:
                out.append(data.get("content") or "")
        elif f"/webhooks/{fake.application_id}/{interaction.token}" in ev.path and ev.method == "POST" and ev.json:
            if int(ev.json.get("flags") or 0) & 64:
                out.append(ev.json.get("content") or "")
    return out


def picture(fake: FakeDiscord, message: dict) -> Image.Image:
    """The image a result message carries (its fluxbot-* attachment), as RGB."""
    attachment = next(a for a in message["attachments"] if a["filename"].startswith("fluxbot-"))
    return Image.open(io.BytesIO(fake.attachment_data[int(attachment["id"])])).convert("RGB")
