"""What the bot counts, for Prometheus (`prometheus_client`), and the listener that serves it.

One registry per bot (not the library's global one), so several bots in one process (the tests)
count apart. Names follow Prometheus' conventions as mold and vLLM use them: a `fluxbot_` prefix,
base units (seconds, bytes), `_total` on counters. `/health` on the same listener answers 200
only while the gateway is connected, the database answers and the GPU worker is alive.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .config import ConfigError

log = logging.getLogger("fluxbot.metrics")

JOB_END_STATUSES = ("done", "failed", "cancelled")
DISCORD_ERROR_KINDS = ("delivery", "notify", "command")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("fluxbot_queue_depth", "Jobs waiting or being painted.", registry=r)
        self.jobs = Counter("fluxbot_jobs", "Jobs that ended, by how they ended.", ["status"], registry=r)
        self.generation_seconds = Histogram(
            "fluxbot_generation_seconds",
            "Seconds to paint one image (text encoding, denoising, decoding).",
            buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.step_seconds = Histogram(
            "fluxbot_step_seconds",
            "Mean seconds per denoising step of each image.",
            buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.gpu_memory_bytes = Gauge(
            "fluxbot_gpu_memory_bytes", "Peak GPU memory allocated while painting the last image.", registry=r
        )
        self.worker_up = Gauge("fluxbot_worker_up", "1 while the GPU worker runs with its model loaded.", registry=r)
        self.discord_errors = Counter(
            "fluxbot_discord_errors", "Requests to Discord that failed, by what they were for.", ["kind"], registry=r
        )
        self.quota_refusals = Counter(
            "fluxbot_quota_refusals", "Jobs refused because the member's daily quota was used up.", registry=r
        )
        self.relax_jobs = Counter(
            "fluxbot_relax_jobs",
            "Jobs admitted in relax mode: the member's quota was used up, so free and after charged jobs.",
            registry=r,
        )
        for status in JOB_END_STATUSES:  # every series exists from the start (a rate over 0s, not absent)
            self.jobs.labels(status=status)
        for kind in DISCORD_ERROR_KINDS:
            self.discord_errors.labels(kind=kind)

    def image_painted(self, seconds: float, steps: int, peak_vram_gib: float | None) -> None:
        self.generation_seconds.observe(seconds)
        if steps > 0:
            self.step_seconds.observe(seconds / steps)
        if peak_vram_gib is not None:
            self.gpu_memory_bytes.set(peak_vram_gib * 2**30)

    def job_ended(self, status: str) -> None:
        self.jobs.labels(status=status).inc()

    def discord_error(self, kind: str) -> None:
        self.discord_errors.labels(kind=kind).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], Awaitable[dict[str, bool]]]


class MetricsServer:
    """`/metrics` and `/health` over HTTP, in the bot's own event loop (both answers are quick)."""

    def __init__(self, metrics: Metrics, health: HealthCheck) -> None:
        self.metrics = metrics
        self.health = health
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"[metrics] listen: cannot serve on {host}:{port} ({exc.strerror or exc}); "
                'choose another address, or "" to turn metrics off',
                key="[metrics] listen",
            ) from None
        log.info("metrics on http://%s:%d/metrics, health on /health", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        checks = await self.health()
        healthy = all(checks.values())
        return web.json_response({"healthy": healthy, **checks}, status=200 if healthy else 503)
