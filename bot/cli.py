"""`fluxbot`: run the bot, paint one image, check the machine, fetch weights, back up the database."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from . import instance
from .config import ConfigError, ModelSettings, Settings, load_settings
from .logs import redact, setup_logging

log = logging.getLogger("fluxbot")
DEFAULT_CONFIG = Path("config.toml")


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _load(arg: str | None, **kwargs) -> tuple[Settings, Path | None]:
    path = _config_path(arg)
    return load_settings(path, **kwargs), path


def compile_cache_env(model, environ: Mapping[str, str]) -> dict[str, str]:
    """The cache variables to set so compiled kernels outlive the process: Inductor's and Triton's
    caches under `[model] compile_cache` (Inductor's own default is in /tmp). Set ones are kept."""
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(model.compile_cache / "inductor"),
        "TRITON_CACHE_DIR": str(model.compile_cache / "triton"),
    }
    return {name: value for name, value in wanted.items() if not environ.get(name)}


def one_shot_compile(configured: str, *, asked: bool) -> str:
    """`[model] compile` for `fluxbot generate`: one image cannot earn back a compile (a minute or
    more on a GPU), so "auto" is off there; `--compile` turns it on."""
    if asked:
        return "on"
    return "off" if configured == "auto" else configured


def _use_compile_cache(model) -> None:
    os.environ.update(compile_cache_env(model, os.environ))  # before torch is imported


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {redact(message)}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    # The config first: a mistake in it is answered at once, not after seconds of importing torch.
    settings, path = _load(args.config, require_token=True)
    token = settings.discord.token.get()
    setup_logging(args.log_level, secrets=[token])
    _use_compile_cache(settings.model)
    try:
        with instance.exclusive(settings.storage.database):  # before anything reads or writes the ledger
            return _run_bot(settings, path, token)
    except instance.AlreadyRunning as exc:
        return _fail(str(exc), 1)


def _run_bot(settings: Settings, path: Path | None, token: str) -> int:
    from .engine import weights

    # Before connecting to Discord: missing weights fail the start (main() prints which files), and
    # so does a machine with too little memory for the plan (main() prints what helps).
    root = weights.require(settings.model.preset, settings.model.dir, str(path or ""))
    if settings.model.preset != "tiny-random":  # the tiny files are written on first use
        from .engine import hostmem

        log.info("host memory: the plan needs %s", hostmem.check(settings.model, root)[1].describe())

    from .discord.serve import DiscordRefused, serve
    from .engine.pipeline import Engine

    def load_engine() -> Engine:
        engine = Engine.load(settings.model, config_hint=str(path or ""))
        if engine.compiled:  # compile now for the default size, not during a member's first image
            gen = settings.generation
            log.info("warming up the compiled model (%.0f s)", engine.warm_up(gen.width, gen.height))
        return engine

    # `docker stop` sends SIGTERM, handled like Ctrl-C by serve(): the job in progress stops at its
    # next step and stays in the ledger for the next start.
    try:
        asyncio.run(serve(settings, load_engine, token))
    except KeyboardInterrupt:
        pass  # stopped on purpose: the bot closed itself on the way out
    except DiscordRefused as exc:
        return _fail(str(exc), 1)
    return 0


# --------------------------------------------------------------------------- generate
class _Bar:
    """A one-line progress bar on stderr."""

    def __init__(self, width: int = 30):
        self.width = width
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        filled = round(self.width * step / total)
        rate = (time.perf_counter() - self.start) / step
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] step {step}/{total}  {rate:.2f} s/step")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.api import GenerationRequest
    from .images import png_metadata, save_png
    from .validation import ValidationError, check_prompt, check_seed, check_steps

    settings, path = _load(args.config)
    setup_logging(args.log_level)
    model = settings.model
    if args.preset:
        model = dataclasses.replace(model, preset=args.preset)
    model = dataclasses.replace(model, compile=one_shot_compile(model.compile, asked=args.compile))
    _use_compile_cache(model)
    gen = settings.generation
    try:
        prompt = check_prompt(args.prompt, max_chars=gen.max_prompt_chars)
        seed, random_seed = check_seed(args.seed)
        steps = check_steps(args.steps, default=gen.default_steps, maximum=gen.max_steps)
    except ValidationError as exc:
        return _fail(str(exc))
    width, height = args.width or gen.width, args.height or gen.height
    if width % 16 or height % 16 or not (64 <= width <= 2048 and 64 <= height <= 2048):
        return _fail("width and height must be multiples of 16 between 64 and 2048")
    from .engine.pipeline import Engine  # torch and DiffSynth: seconds, so only once the input is known good

    print(f"loading the model ({model.preset}{', compiling first' if model.compile == 'on' else ''})…", file=sys.stderr)
    t0 = time.perf_counter()
    engine = Engine.load(model, config_hint=str(path or ""))
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"seed: {seed}" + (" (random)" if random_seed else ""))
    request = GenerationRequest(prompt, seed=seed, steps=steps, width=width, height=height, guidance=gen.guidance)
    result = engine.generate(request, on_progress=_Bar())
    out = Path(args.output or f"fluxbot-{seed}.png")
    save_png(result.image, out, png_metadata(request, model.preset))
    print(f"time: {result.seconds:.2f} s")
    print("peak VRAM: " + (f"{result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib is not None else "n/a (CPU)"))
    print(f"saved: {out}")
    return 0


# --------------------------------------------------------------------------- doctor
def cmd_doctor(args) -> int:
    import numpy as np
    import torch

    from .engine import weights
    from .engine.api import GenerationRequest
    from .engine.budget import fp8_matmul_supported, kernel_build_missing
    from .engine.pipeline import Engine

    setup_logging("WARNING")
    rows: list[tuple[str, str, str]] = []

    def row(name: str, ok: str, detail: str) -> None:
        rows.append((name, ok, redact(detail)))

    row("python", "PASS" if sys.version_info >= (3, 10) else "FAIL", platform.python_version())
    row("torch", "PASS", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row("gpu", "PASS", f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, compute {props.major}.{props.minor}")
        fp8 = fp8_matmul_supported(torch.device("cuda", 0))
        row(
            "fp8 matmul",
            "PASS" if fp8 else "INFO",
            "available (Ada/Hopper)" if fp8 else "not on this card: float8 storage with bf16 compute",
        )
    else:
        row("gpu", "WARN", "no CUDA GPU visible: the real model would run on the CPU (very slow)")
    missing = kernel_build_missing()
    row(
        "kernel build",
        "WARN" if missing and torch.cuda.is_available() else "INFO" if missing else "PASS",
        f"missing {' and '.join(missing)} (Debian/Ubuntu: apt install gcc python3-dev): on a GPU the bot runs "
        "without torch.compile, float8 matmuls and the attention kernel, slower"
        if missing
        else "a C compiler and Python's headers are here: GPU kernels can be built",
    )
    settings = None
    try:
        settings, path = _load(args.config)
        row("config", "PASS", str(path) if path else "none (defaults; pass --config or create config.toml)")
    except ConfigError as exc:
        row("config", "FAIL", str(exc))
    if settings is not None:
        try:
            root = weights.require(settings.model.preset, settings.model.dir)
            row(
                "weights",
                "PASS",
                "tiny-random preset: built on first use, nothing to download"
                if settings.model.preset == "tiny-random"
                else f"all present under {root}",
            )
            if settings.model.preset != "tiny-random":
                row("host memory", *_host_memory_row(settings.model, root))
        except weights.MissingWeightsError as exc:
            row("weights", "FAIL", f"missing under {exc.root}: {', '.join(exc.missing)}; run `fluxbot download`")
        db = Path(settings.storage.database)
        if db.exists():
            try:
                from .store import Store

                async def check():
                    async with await Store.open(db, default_daily_limit=settings.quota.daily_limit) as store:
                        return await store.integrity_ok(), await store.schema_version()

                ok, version = asyncio.run(check())
                row(
                    "database",
                    "PASS" if ok else "FAIL",
                    f"{db} (schema v{version}, integrity {'ok' if ok else 'FAILED'})",
                )
            except Exception as exc:
                row("database", "FAIL", f"{db}: {exc}")
        else:
            row("database", "PASS", f"{db} (will be created on first run)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = ModelSettings(preset="tiny-random", dir=Path(tmp), compile="off")  # a quick check: no compile
            t0 = time.perf_counter()
            engine = Engine.load(tiny)
            res = engine.generate(GenerationRequest("doctor check", seed=1, steps=2, width=256, height=256))
            row(
                "tiny generation",
                "PASS",
                f"256x256, 2 steps on {engine.device} in {time.perf_counter() - t0:.1f} s "
                f"(image std {np.asarray(res.image).std():.1f})",
            )
    except Exception as exc:
        row("tiny generation", "FAIL", f"{type(exc).__name__}: {exc}")
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        print(f"{name:<{width}}  {ok:<4}  {detail}")
    counts = {status: sum(1 for r in rows if r[1] == status) for status in ("PASS", "INFO", "WARN", "FAIL")}
    print(
        f"\n{counts['PASS']} passed, {counts['INFO']} for information, {counts['WARN']} warnings, "
        f"{counts['FAIL']} failed"
    )
    return 1 if counts["FAIL"] else 0


def _host_memory_row(model, root: Path) -> tuple[str, str]:
    from .engine import hostmem

    available = hostmem.available_bytes()
    try:
        plan, host = hostmem.check(model, root)
    except hostmem.HostMemoryShort as exc:
        return "FAIL", str(exc)
    where = "" if plan.t5_in_ram else '; T5 read from its file (t5_in_ram "off" or chosen by "auto")'
    have = "unknown" if available is None else f"{available / 1024**3:.1f} GiB"
    return "PASS", f"the plan needs {host.describe()}; {have} available{where}"


# --------------------------------------------------------------------------- download, db
def cmd_download(args) -> int:
    from .engine import weights

    settings, _ = _load(args.config)
    setup_logging(args.log_level)
    root = Path(settings.model.dir)
    print(f"fetching majicflus + FLUX.1-dev files into {root} (about 33 GB; safe to re-run, resumes)")
    try:
        missing = weights.download(root)
    except Exception as exc:
        reason = _network_failure(exc)
        if reason is None:
            raise
        return _fail(
            f"cannot reach ModelScope ({reason}): check this machine's network; files already "
            "fetched are kept, and running `fluxbot download` again resumes",
            1,
        )
    if missing:
        return _fail("still missing after download: " + ", ".join(missing), 1)
    print("all model files present")
    return 0


_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"')\]]+")


def _network_failure(exc: BaseException) -> str | None:
    """A short reason when `exc` comes from the network (an OSError anywhere in its chain: requests'
    and urllib3's connection errors are OSErrors), or None when it is something else."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    network = [e for e in chain if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | PermissionError)]
    if not network:
        return None
    for error in chain:  # the operating system's words ("[Errno 111] Connection refused"), if any
        found = _ERRNO.search(str(error))
        if found:
            return found.group(0).strip()
    text = str(network[-1]).splitlines()[0] if str(network[-1]) else type(network[-1]).__name__
    return text[:160]


def cmd_db_backup(args: argparse.Namespace) -> int:
    from .store import Store

    settings, _ = _load(args.config)
    if not Path(settings.storage.database).is_file():  # opening it would create an empty one
        return _fail(
            f"no database at {settings.storage.database}: nothing to back up (check [storage] database, or --config)"
        )

    async def backup():
        async with await Store.open(settings.storage.database, default_daily_limit=settings.quota.daily_limit) as store:
            await store.backup(args.path)

    asyncio.run(backup())
    print(f"backed up {settings.storage.database} to {args.path}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Ask the running bot's /health (for scripts and Docker's HEALTHCHECK): exit 0 only if healthy."""
    import json
    import urllib.error
    import urllib.request

    settings, _ = _load(args.config)
    address = settings.metrics.address
    if address is None:
        return _fail('[metrics] listen is "": the bot serves no health check to ask', 1)
    host, port = address
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:  # 503: it answered, unhealthy
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError) as exc:
        return _fail(f"no answer from the bot at {url} ({getattr(exc, 'reason', exc)}): is it running?", 1)
    failing = [name for name, ok in body.items() if name != "healthy" and not ok]
    if body.get("healthy"):
        print(f"healthy: {', '.join(name for name in body if name != 'healthy')} answer")
        return 0
    print(f"unhealthy: {', '.join(failing) or 'unknown'} not answering", file=sys.stderr)
    return 1


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    # --log-level and --config are accepted before or after the subcommand. The copy on each
    # subcommand has no default of its own, so it never overwrites a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=_log_level,
        default=argparse.SUPPRESS,
        help=f"one of {', '.join(LOG_LEVELS)} (default: $FLUXBOT_LOG_LEVEL or INFO)",
    )
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="TOML config file (default: ./config.toml if present, else built-in defaults)",
    )
    p = argparse.ArgumentParser(prog="fluxbot", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    def command(name: str, help_text: str, parent: argparse._SubParsersAction = sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, description=help_text, parents=[common])

    command("run", "start the Discord bot").set_defaults(func=cmd_run)
    g = command("generate", "paint one image to a PNG")
    g.add_argument("prompt", help="what to paint")
    g.add_argument("--seed", type=int, default=None, help="the seed; -1 or omitted: a random one")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (omitted: [generation] default_steps)")
    g.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (omitted: [generation] width)")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (omitted: [generation] height)")
    g.add_argument("-o", "--output", default=None, help="the PNG to write (omitted: fluxbot-SEED.png)")
    g.add_argument(
        "--preset",
        choices=["majicflus", "tiny-random"],
        default=None,
        help="the model (omitted: [model] preset); tiny-random needs no download",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first (pays off only for many images; default: off for one image)",
    )
    g.set_defaults(func=cmd_generate)
    command("doctor", "check this machine, the config and the weights").set_defaults(func=cmd_doctor)
    command("download", "fetch the model weights through modelscope").set_defaults(func=cmd_download)
    h = command("health", "ask the running bot whether it is healthy (exit 0) or not (exit 1)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    h.set_defaults(func=cmd_health)
    db = command("db", "database tools").add_subparsers(
        dest="db_command", required=True, metavar="DB_COMMAND", help="what to do with the database"
    )
    b = command("backup", "online backup of the SQLite database", db)
    b.add_argument("path", help="the new file to write (must not exist)")
    b.set_defaults(func=cmd_db_backup)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The shared options default to "not given" (argparse.SUPPRESS), so a subcommand's copy never
    # overwrites the value given before it; fill in the real defaults here.
    args.config = getattr(args, "config", None)
    args.log_level = getattr(args, "log_level", None)
    if args.log_level is None:  # not given: $FLUXBOT_LOG_LEVEL, checked like the option
        try:
            args.log_level = _log_level(os.environ.get("FLUXBOT_LOG_LEVEL") or "INFO")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"FLUXBOT_LOG_LEVEL: {exc}")
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .engine.weights import MissingWeightsError

        if isinstance(exc, MissingWeightsError):
            return _fail(str(exc))
        if "torch" in sys.modules:  # a plan was made: the machine may lack the memory for it
            from .engine.hostmem import HostMemoryShort

            if isinstance(exc, HostMemoryShort):
                return _fail(str(exc), 1)
        from .store import StoreError

        if isinstance(exc, StoreError):
            return _fail(str(exc))
        raise


if __name__ == "__main__":
    raise SystemExit(main())
