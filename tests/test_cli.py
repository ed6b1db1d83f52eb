"""`fluxbot` commands, run in-process through bot.cli.main."""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot.cli import main

from ceilings import START

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
    assert (
        main(
            [
                "generate",
                "a cat in the sun",
                "--seed",
                "99",
                "--steps",
                "2",
                "--width",
                "256",
                "--height",
                "192",
                "-o",
                str(out),
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "seed: 99" in printed and "time:" in printed and "peak VRAM: n/a (CPU)" in printed
    img = Image.open(out)
    assert img.size == (256, 192)
    assert img.text["prompt"] == "a cat in the sun"
    assert img.text["seed"] == "99" and img.text["steps"] == "2" and img.text["size"] == "256x192"


def test_generate_random_seed_is_printed(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)
    out = tmp_path / "r.png"
    assert (
        main(
            ["generate", "x", "--steps", "1", "--width", "128", "--height", "128", "-o", str(out), "--config", str(cfg)]
        )
        == 0
    )
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("seed:"))
    seed = line.split()[1]
    assert seed.isdigit() and Image.open(out).text["seed"] == seed


def test_generate_without_weights_names_the_files(tmp_path, capsys):
    cfg = write_config(tmp_path, tmp_path / "empty-models", preset="majicflus")
    assert main(["generate", "x", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "majicflus_v134.safetensors" in err and "ae.safetensors" in err
    assert "fluxbot download" in err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--steps", "0"], "steps must be between 1 and 50"),
        (["--seed", "-5"], "seed must be between"),
    ],
)
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
    await store.admit(
        NewJob(user_id=1, guild_id=2, channel_id=3, prompt="p", seed=1, steps=2, width=64, height=64),
        max_queue=10,
        max_per_user=10,
    )
    await store.close()


def test_db_backup_copies_the_ledger(tmp_path, model_dir, capsys):
    import asyncio

    cfg = write_config(tmp_path, model_dir)
    asyncio.run(_make_db(tmp_path / "bot.db"))
    dest = tmp_path / "backup.db"
    assert main(["db", "backup", str(dest), "--config", str(cfg)]) == 0
    with sqlite3.connect(dest) as conn:
        assert conn.execute("select count(*) from jobs").fetchone()[0] == 1


# ---------------------------------------------------------------- a newcomer's first minutes (#15)

ROOT = Path(__file__).resolve().parents[1]


def run_fluxbot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m bot.cli ARGS` in a process of its own (what a newcomer types, minus the script)."""
    full_env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=START
    )


def test_a_missing_config_is_answered_before_torch_or_discord_is_imported(tmp_path):
    probe = (
        "import sys; from bot.cli import main; rc = main(['run', '--config', sys.argv[1]]); "
        "print(rc, sorted(m for m in ('torch', 'diffsynth', 'discord') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "missing.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START,
    )
    assert done.stdout.split(None, 1) == ["2", "[]\n"], done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: config file not found: {tmp_path / 'missing.toml'} (copy config.example.toml)"
    ]


@pytest.mark.parametrize("token", ["MTIz.abc\ndef", "MTIz abc", "MTIz\x07abc"])
def test_a_token_with_a_line_break_or_space_is_one_clear_line(tmp_path, model_dir, capsys, monkeypatch, token):
    monkeypatch.setenv("DISCORD_TOKEN", token)
    cfg = write_config(tmp_path, model_dir)
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: DISCORD_TOKEN: contains a line break, space or control character: paste the token again as one line"
    ]
    monkeypatch.delenv("DISCORD_TOKEN")
    cfg.write_text(cfg.read_text() + f"[discord]\ntoken = {token!r}\n".replace("'", '"').replace("\\x07", "\\u0007"))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[discord] token: contains a line break" in err and "abc" not in err


def test_db_backup_without_a_database_creates_nothing(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)
    dest = tmp_path / "backup.db"
    assert main(["db", "backup", str(dest), "--config", str(cfg)]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not dest.exists() and not (tmp_path / "bot.db").exists()


def test_log_level_goes_before_or_after_the_command_and_a_bad_one_is_one_line(tmp_path, model_dir, capsys, monkeypatch):
    from bot.cli import build_parser

    assert build_parser().parse_args(["--log-level", "debug", "run"]).log_level == "DEBUG"
    assert build_parser().parse_args(["run", "--log-level", "warning"]).log_level == "WARNING"
    assert build_parser().parse_args(["--log-level", "error", "db", "backup", "x"]).log_level == "ERROR"
    assert build_parser().parse_args(["--config", "a.toml", "doctor"]).config == "a.toml"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--log-level", "loud"])
    assert exit_info.value.code == 2 and "'loud' is not a log level" in capsys.readouterr().err
    monkeypatch.setenv("FLUXBOT_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit):
        main(["run"])
    assert "FLUXBOT_LOG_LEVEL: 'chatty' is not a log level" in capsys.readouterr().err


def test_every_option_says_what_it_does():
    from bot.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help text"


def test_doctor_counts_warnings_apart_from_passes(tmp_path, model_dir, capsys, monkeypatch, kernel_toolchain):
    import torch

    cfg = write_config(tmp_path, model_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: a WARN row
    main(["doctor", "--config", str(cfg)])
    out = capsys.readouterr().out
    rows = [m.group(1) for m in re.finditer(r"^\S.*?  (PASS|INFO|WARN|FAIL)  ", out, re.MULTILINE)]
    summary = out.strip().splitlines()[-1]
    assert "WARN" in rows
    assert summary == (
        f"{rows.count('PASS')} passed, {rows.count('INFO')} for information, "
        f"{rows.count('WARN')} warnings, {rows.count('FAIL')} failed"
    )


def test_download_without_network_is_one_clear_line(tmp_path, model_dir):
    """ModelScope unreachable (its endpoint: a closed port on this machine): no traceback."""
    cfg = write_config(tmp_path, tmp_path / "weights", preset="majicflus")
    done = run_fluxbot(
        "download",
        "--config",
        str(cfg),
        env={"MODELSCOPE_DOMAIN": "127.0.0.1:9", "MODELSCOPE_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "cannot reach ModelScope" in errors[0] and "again resumes" in errors[0]


def test_one_image_from_the_command_line_compiles_only_when_asked():
    from bot.cli import one_shot_compile

    assert one_shot_compile("auto", asked=False) == "off"  # `fluxbot run` keeps "auto" (on with a GPU)
    assert one_shot_compile("auto", asked=True) == "on"
    assert one_shot_compile("on", asked=False) == "on"  # what the config says explicitly stands
    assert one_shot_compile("off", asked=True) == "on"


def test_generate_says_what_it_is_doing_while_it_loads(tmp_path, model_dir, capsys):
    cfg = write_config(tmp_path, model_dir)  # [model] compile left at its default, "auto"
    out = tmp_path / "x.png"
    argv = ["generate", "x", "--steps", "1", "--width", "128", "--height", "128", "-o", str(out), "--config", str(cfg)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "loading the model (tiny-random)…" in err and "compiling" not in err
    assert re.search(r"model loaded in \d+\.\d s", err)


def test_compiled_kernels_are_cached_outside_tmp_unless_the_caller_chose_a_place(tmp_path):
    from bot.cli import compile_cache_env
    from bot.config import ModelSettings

    model = ModelSettings()
    assert model.compile_cache == Path.home() / ".cache" / "fluxbot" / "compile"
    env = compile_cache_env(model, {})
    assert env == {
        "TORCHINDUCTOR_CACHE_DIR": str(model.compile_cache / "inductor"),
        "TRITON_CACHE_DIR": str(model.compile_cache / "triton"),
    }
    chosen = compile_cache_env(model, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert chosen == {"TRITON_CACHE_DIR": str(model.compile_cache / "triton")}
