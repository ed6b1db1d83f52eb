"""`fluxbot` commands, run in-process through bot.cli.main."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main

TOKEN = "MTIzNDU2Nzg5.fake-token-for-tests.abcdefghijklmnop"


def write_config(tmp_path: Path, model_dir: Path, body: str = "", preset: str = "tiny-random") -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[model]\npreset = "{preset}"\ndir = "{model_dir}"\ndevice = "cpu"\n'
        f'[storage]\ndatabase = "{tmp_path / "bot.db"}"\n' + body
    )
    cfg.chmod(0o600)
    return cfg


def test_generate_writes_a_png_with_its_parameters(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat in the sun", "--seed", "99", "--steps", "2", "--width", "256",
                 "--height", "192", "-o", str(out), "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "seed: 99" in printed and "time:" in printed and "peak VRAM: n/a (CPU)" in printed
    img = Image.open(out)
    assert img.size == (256, 192)
    assert img.text["prompt"] == "a cat in the sun"
    assert img.text["seed"] == "99" and img.text["steps"] == "2" and img.text["size"] == "256x192"


def test_generate_random_seed_is_printed(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)
    out = tmp_path / "r.png"
    assert main(["generate", "x", "--steps", "1", "--width", "128", "--height", "128", "-o", str(out),
                 "--config", str(cfg)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seed:"))
    seed = line.split()[1]
    assert seed.isdigit() and Image.open(out).text["seed"] == seed


def test_generate_without_weights_names_the_files(tmp_path, capsys):
    cfg = write_config(tmp_path, tmp_path / "empty-models", preset="majicflus")
    assert main(["generate", "x", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "majicflus_v134.safetensors" in err and "ae.safetensors" in err
    assert "fluxbot download" in err


@pytest.mark.parametrize("args,expected", [
    (["--steps", "0"], "steps must be between 1 and 50"),
    (["--seed", "-5"], "seed must be between"),
])
def test_generate_rejects_bad_values(tmp_path, model_dir, capsys, args, expected):
    cfg = write_config(tmp_path, model_dir)
    assert main(["generate", "x", *args, "--config", str(cfg)]) == 2
    assert expected in capsys.readouterr().err


def test_bad_config_names_the_key(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir, '[queue]\nmax_size = "ten"\n')
    assert main(["generate", "x", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[queue] max_size" in err


def test_run_without_a_token_says_so_and_leaks_nothing(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    cfg = write_config(tmp_path, model_dir)
    assert main(["run", "--config", str(cfg)]) == 2
    assert "DISCORD_TOKEN" in capsys.readouterr().err


def test_run_with_missing_weights_stops_before_connecting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    cfg = write_config(tmp_path, tmp_path / "nothing", preset="majicflus")
    assert main(["run", "--config", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert "majicflus_v134.safetensors" in captured.err and "fluxbot download" in captured.err
    assert TOKEN not in captured.err + captured.out


def test_doctor_passes_on_the_tiny_preset(tmp_path, model_dir, capsys, kernel_toolchain):
    cfg = write_config(tmp_path, model_dir)
    assert main(["doctor", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "tiny generation  PASS" in out and "0 failed" in out
    assert "kernel build     PASS" in out


def test_doctor_says_what_gpu_kernels_lack(tmp_path, model_dir, capsys, monkeypatch, kernel_toolchain):
    """No C compiler: the doctor names it and the fix; on a machine without a GPU that is only
    information, and nothing fails."""
    import shutil
    cfg = write_config(tmp_path, model_dir)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["doctor", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("kernel build"))
    assert " INFO " in line and "a C compiler" in line and "apt install gcc python3-dev" in line


def test_doctor_fails_when_weights_are_missing(tmp_path, capsys):
    cfg = write_config(tmp_path, tmp_path / "nothing", preset="majicflus")
    assert main(["doctor", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "weights" in out and "FAIL" in out and "fluxbot download" in out


async def _make_db(path: Path) -> None:
    from bot.store import NewJob, Store

    store = await Store.open(path, default_daily_limit=5)
    await store.admit(NewJob(user_id=1, guild_id=2, channel_id=3, prompt="p", seed=1, steps=2, width=64, height=64), max_queue=10, max_per_user=10)
    await store.close()


def test_db_backup_copies_the_ledger(tmp_path, model_dir, capsys):
    import asyncio

    cfg = write_config(tmp_path, model_dir)
    asyncio.run(_make_db(tmp_path / "bot.db"))
    dest = tmp_path / "backup.db"
    assert main(["db", "backup", str(dest), "--config", str(cfg)]) == 0
    with sqlite3.connect(dest) as conn:
        assert conn.execute("select count(*) from jobs").fetchone()[0] == 1
