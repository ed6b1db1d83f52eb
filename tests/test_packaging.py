"""Promises the README makes about the project itself."""

from __future__ import annotations

import re
from pathlib import Path

from bot.config import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = [
        ln.strip()
        for ln in re.findall(r"```sh\n(.*?)```", quickstart, re.S)[0].splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    assert len(commands) == 2, commands
    assert "fluxbot run" in commands[0]
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    assert commands[1] in ci


def test_docker_config_loads(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "x" * 60)
    settings = load_settings(ROOT / "config.docker.toml", require_token=True)
    assert str(settings.model.dir) == "/models"
    assert str(settings.storage.database) == "/data/fluxbot.db"


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    from bot.cli import main

    [script] = entry_points(group="console_scripts", name="fluxbot")
    assert script.load() is main


def test_docker_checks_health_with_the_config_it_runs_with(monkeypatch):
    from bot.cli import build_parser

    dockerfile = (ROOT / "Dockerfile").read_text()
    run = re.search(r'^CMD \["run", "--config", "([^"]+)"\]', dockerfile, re.M)
    check = re.search(r'^HEALTHCHECK .*?CMD \["fluxbot", "health", "--config", "([^"]+)"\]', dockerfile, re.M | re.S)
    assert run and check and run.group(1) == check.group(1) == "/config/config.toml"
    compose = (ROOT / "docker-compose.yml").read_text()
    assert 'test: ["CMD", "fluxbot", "health", "--config", "/config/config.toml"]' in compose
    assert build_parser().parse_args(["health", "--config", "/config/config.toml"]).command == "health"
    monkeypatch.setenv("DISCORD_TOKEN", "x" * 60)
    assert load_settings(ROOT / "config.docker.toml").metrics.address == ("127.0.0.1", 9464)  # inside the container
