"""/metrics and /health on the bot's listener, read over HTTP as Prometheus and Docker would."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from bot.config import ConfigError
from bot.discord.app import FluxBot

from botkit import ALICE, has_image, make_settings, running_bot
from ceilings import WAIT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def sample(text: str, name: str) -> float:
    """The value of one series line (`name` with its labels, as Prometheus writes it)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


async def test_metrics_count_what_the_bot_did(fake, tmp_path, model_dir, engine):
    port = free_port()
    settings = make_settings(
        tmp_path, model_dir, fake, quota={"daily_limit": 1}, metrics={"listen": f"127.0.0.1:{port}"}
    )
    async with running_bot(fake, settings, engine) as bot:
        url = f"http://127.0.0.1:{port}/metrics"
        status, text = await get(url)
        assert status == 200
        assert sample(text, "fluxbot_worker_up") == 1.0 and sample(text, "fluxbot_queue_depth") == 0.0
        assert sample(text, 'fluxbot_jobs_total{status="done"}') == 0.0  # every series exists from the start
        await (await fake.slash("imagine", {"prompt": "counted"}, user_id=ALICE)).wait_original(has_image)
        refused = await fake.slash("imagine", {"prompt": "over quota"}, user_id=ALICE)
        await refused.response()
        await bot.queue.wait_idle(30)
        _, text = await get(url)
        assert sample(text, 'fluxbot_jobs_total{status="done"}') == 1.0
        assert sample(text, 'fluxbot_jobs_total{status="failed"}') == 0.0
        assert sample(text, "fluxbot_quota_refusals_total") == 1.0
        assert sample(text, "fluxbot_generation_seconds_count") == 1.0
        assert sample(text, "fluxbot_generation_seconds_sum") > 0
        assert sample(text, "fluxbot_step_seconds_count") == 1.0
        assert sample(text, 'fluxbot_discord_errors_total{kind="delivery"}') == 0.0
        assert "# TYPE fluxbot_gpu_memory_bytes gauge" in text


async def test_health_is_200_only_while_everything_answers(fake, tmp_path, model_dir, engine):
    port = free_port()
    settings = make_settings(tmp_path, model_dir, fake, metrics={"listen": f"127.0.0.1:{port}"})
    async with running_bot(fake, settings, engine):
        status, body = await get(f"http://127.0.0.1:{port}/health")
        assert status == 200 and '"healthy": true' in body
    # a model that does not load: the worker takes no jobs, so the bot is not healthy
    settings = make_settings(
        tmp_path,
        model_dir,
        fake,
        metrics={"listen": f"127.0.0.1:{port}"},
        storage={"database": str(tmp_path / "second.db")},
    )

    def broken():
        raise RuntimeError("no weights")

    async with running_bot(fake, settings, engine, engine_loader=broken):
        status, body = await get(f"http://127.0.0.1:{port}/health")
        assert status == 503
        assert '"worker": false' in body and '"gateway": true' in body and '"database": true' in body


async def test_health_is_503_while_the_gateway_is_down(fake, tmp_path, model_dir, engine):
    """A dropped gateway connection that cannot come back (the gateway answers nothing) makes the
    bot unhealthy until it has reconnected."""
    from botkit import eventually

    port = free_port()
    settings = make_settings(tmp_path, model_dir, fake, metrics={"listen": f"127.0.0.1:{port}"})
    async with running_bot(fake, settings, engine) as bot:
        fake.gateway_open.clear()
        await fake.drop_gateway(4000, wait=False)
        await eventually(lambda: not bot.is_ready() or bot.ws is None or not bot.ws.open, what="the bot to notice")
        status, body = await get(f"http://127.0.0.1:{port}/health")
        assert status == 503
        assert '"gateway": false' in body and '"database": true' in body and '"worker": true' in body
        before = fake.gateway_connections
        fake.gateway_open.set()
        await eventually(
            lambda: fake.gateway_connections >= before and bot.ws is not None and bot.ws.open, what="reconnect"
        )
        for _ in range(int(WAIT / 0.05)):  # healthy again once the session is resumed
            status, body = await get(f"http://127.0.0.1:{port}/health")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body


async def test_a_taken_metrics_port_stops_the_start_with_a_clear_message(fake, tmp_path, model_dir, engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(tmp_path, model_dir, fake, metrics={"listen": f"127.0.0.1:{port}"})
        bot = FluxBot(settings, lambda: engine)
        try:
            with pytest.raises(ConfigError, match=rf"\[metrics\] listen: cannot serve on 127.0.0.1:{port}"):
                await bot.login(fake.token)
        finally:
            await bot.close()


async def test_fluxbot_health_asks_the_running_bot(fake, tmp_path, model_dir, engine, capsys):
    from bot.cli import main

    port = free_port()
    config = tmp_path / "health.toml"
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    assert await asyncio.to_thread(main, ["health", "--config", str(config)]) == 1  # nothing runs yet
    assert "no answer from the bot" in capsys.readouterr().err
    settings = make_settings(tmp_path, model_dir, fake, metrics={"listen": f"127.0.0.1:{port}"})
    async with running_bot(fake, settings, engine):
        assert await asyncio.to_thread(main, ["health", "--config", str(config)]) == 0
    assert "healthy: gateway, database, worker answer" in capsys.readouterr().out
