"""Run the real bot (`fluxbot run`) in its own process against a FakeDiscord, for the SIGKILL tests.

    DISCORD_TOKEN=... python tests/bot_process.py --api-base URL --gateway URL --config FILE \
        [--kill-point loading|before|during|after_generation|after_delivery --marker FILE] [--wait-for FILE]

The kill point is test code: it monkeypatches one place in the bot so that the first job to get
there writes `--marker` (the job id or prompt, then a rename: the file appears whole) and blocks
forever, in the GPU thread or in the event loop, so the test can SIGKILL the process exactly there.
Everything else is the product: `bot.cli.main(["run", "--config", FILE])`.

`--wait-for FILE`: import the heavy modules (torch, diffsynth, discord.py: seconds), then wait until
FILE exists before starting the bot. A test starts the "restarted" process early, while the first
one still runs, and lets it go once the first is dead: a fresh process that has touched neither the
database nor Discord yet, only without the import time on the test's clock.

- loading:          the engine load began (GPU thread) and never finishes, as a load or a first
                    compile that takes minutes looks to a stop; members' jobs wait in the queue
- before:           the worker is about to generate its first job (ledger: running, nothing painted)
- during:           the engine finished denoising step 1 of the first generation (GPU thread)
- after_generation: the image is saved and the ledger says generated; nothing was sent to Discord
- after_delivery:   the result reached Discord; the ledger has not recorded it (still generated)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KILL_POINTS = ("loading", "before", "during", "after_generation", "after_delivery")


def _marker_writer(marker: Path):
    lock = threading.Lock()
    fired = []

    def fire(detail: str) -> bool:
        """Write the marker once; True for the first caller (the one that must block)."""
        with lock:
            if fired:
                return False
            fired.append(detail)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(detail)
        tmp.replace(marker)
        return True

    return fire


def install_kill_point(point: str, marker: Path) -> None:
    fire = _marker_writer(marker)

    async def hang_in_loop() -> None:
        await asyncio.Event().wait()  # the event loop stays free; this coroutine never returns

    if point == "loading":
        from bot.engine.pipeline import Engine

        def load(cls, model_settings, **kwargs):
            fire("loading")
            threading.Event().wait()  # the GPU thread never comes back: no load, no compile, no jobs

        Engine.load = classmethod(load)
    elif point == "before":
        from bot.jobs import JobQueue

        real_generate = JobQueue._generate

        async def generate(self, entry):
            if fire(str(entry.job.id)):
                await hang_in_loop()
            return await real_generate(self, entry)

        JobQueue._generate = generate
    elif point == "during":
        from bot.engine.pipeline import Engine

        real_generate = Engine.generate

        def generate(self, request, *, on_progress=None, should_cancel=None):
            def progress(step, total):
                if on_progress is not None:
                    on_progress(step, total)
                if step == 1 and fire(request.prompt):
                    time.sleep(3600)  # the GPU thread "hangs" mid-generation

            return real_generate(self, request, on_progress=progress, should_cancel=should_cancel)

        Engine.generate = generate
    elif point == "after_generation":
        from bot.discord.delivery import DiscordDelivery

        real_deliver = DiscordDelivery.deliver

        async def deliver(self, job, image_path):
            if fire(str(job.id)):
                await hang_in_loop()
            return await real_deliver(self, job, image_path)

        DiscordDelivery.deliver = deliver
    elif point == "after_delivery":
        from bot.store import Store

        real_mark_done = Store.mark_done

        async def mark_done(self, job_id, result_message_id, now=None):
            if fire(str(job_id)):
                await hang_in_loop()
            return await real_mark_done(self, job_id, result_message_id, now)

        Store.mark_done = mark_done
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {', '.join(KILL_POINTS)}")


def slow_steps(delay: float) -> None:
    """Each step of the real engine takes `delay` s longer; its cancel check between steps is untouched."""
    from bot.engine.pipeline import Engine

    real_generate = Engine.generate

    def generate(self, request, *, on_progress=None, should_cancel=None):
        def progress(step, total):
            time.sleep(delay)
            if on_progress is not None:
                on_progress(step, total)

        return real_generate(self, request, on_progress=progress, should_cancel=should_cancel)

    Engine.generate = generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api-base", required=True, help="the fake's REST base, e.g. http://127.0.0.1:PORT/api/v10")
    p.add_argument("--gateway", required=True, help="the fake's websocket URL")
    p.add_argument("--config", required=True)
    p.add_argument("--kill-point", choices=KILL_POINTS)
    p.add_argument("--marker", type=Path)
    p.add_argument("--wait-for", type=Path, help="after the imports, wait until this file exists")
    p.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        help="seconds each denoising step takes longer (a slow card), for the shutdown tests",
    )
    p.add_argument("--wait-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.kill_point and not args.marker:
        p.error("--kill-point needs --marker")

    import yarl

    with warnings.catch_warnings():  # discord.player imports audioop (deprecated on 3.11+)
        warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
        import discord

    discord.http.Route.BASE = args.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(args.gateway)
    if args.kill_point:
        install_kill_point(args.kill_point, args.marker)
    if args.step_delay:
        slow_steps(args.step_delay)
    if not os.environ.get("DISCORD_TOKEN"):
        p.error("DISCORD_TOKEN must be set")

    from bot.cli import main as fluxbot_main

    if args.wait_for:
        import bot.discord.app
        import bot.engine.pipeline
        import bot.engine.tiny  # noqa: F401

        deadline = time.monotonic() + args.wait_timeout
        while not args.wait_for.exists():
            if time.monotonic() > deadline:
                print(f"bot_process: {args.wait_for} never appeared", file=sys.stderr)
                return 3
            time.sleep(0.02)
    return fluxbot_main(["run", "--config", args.config])


if __name__ == "__main__":
    raise SystemExit(main())
