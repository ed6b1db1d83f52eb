"""The job queue and the single GPU worker. Knows nothing of Discord: it talks to a `Delivery`.

The ledger in SQLite is the truth; this queue is an in-memory view of its active rows. A job is
in the queue only after `Store.admit` committed its row and its quota charge together. On start
the queue reloads every active row: queued jobs wait again in order, a job that was running when
the process died runs again (up to `[jobs] max_attempts`), a finished image that was never
delivered is delivered.

Order is fair rather than first-come: the next job belongs to the user served least recently,
so one member's three queued jobs do not hold back everyone else. Relax-mode jobs (admitted free
once their member's quota was used up, `[quota] relax`) come after every charged job, in the same
round robin among themselves: one runs only when no charged job waits, and they come back from the
ledger as relax jobs after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import heapq
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .config import Settings
from .engine.api import (
    GenerationCancelled,
    GenerationOOM,
    GenerationRequest,
    GenerationResult,
    ImageEngine,
    Preview,
    PreviewFn,
    ProgressWithPreviews,
    SourceImageMissing,
)
from .gpu_thread import GpuThread
from .images import grid_image, grid_part_path, png_metadata, save_png
from .metrics import Metrics
from .params import image_seed
from .store import (
    ACTIVE_STATUSES,
    Admission,
    AdmissionStatus,
    InvalidTransition,
    JobRecord,
    JobStatus,
    NewJob,
    Store,
    StoreError,
)

log = logging.getLogger("fluxbot.jobs")
T = TypeVar("T")


STOP_GRACE_S = 5.0
"""How long a stop waits for the job in progress to reach its next step (Docker allows 10 s)."""

PROGRESS_SETTLE_S = 10.0
"""How long a job's end waits for its last progress edit still on its way (it must not land after the
result or the failure notice and replace it)."""

LEDGER_RETRY_DELAYS_S = (1.0, 3.0, 10.0)
"""Pauses between the worker's tries of a ledger write after an error (each try itself waits out a
lock for `store.database.BUSY_TIMEOUT_MS`). Past them the worker goes on to the next job and the
write is tried again in the background, the pauses doubling up to `LEDGER_RETRY_CAP_S`, until the
ledger takes it (or the bot stops: the row is still active then, and the next start resumes it)."""

LEDGER_RETRY_CAP_S = 30.0
"""The longest pause between two background tries of a ledger write the worker gave up on."""

LEDGER_DOWN = (
    "the bot's database is not answering, so this image could not be finished. Your quota is "
    "refunded as soon as it answers again, and this message will say so (if the bot restarts "
    "first, the image is painted then); you are never charged twice"
)
LEDGER_DOWN_RELAX = (
    "the bot's database is not answering, so this image could not be finished. It was a free "
    "relax-mode image, so nothing is owed; this message will say when the database answers again "
    "(if the bot restarts first, the image is painted then)"
)

REFUNDED = "your quota was refunded"
NOTHING_CHARGED = "nothing was charged (it was a free relax-mode image)"


SOURCE_GONE = "the image it starts from is gone from the bot's disk; your quota was refunded"


class EngineNotReady(Exception):
    """The model is still loading (or failed to load): nothing can be asked of the engine yet."""


def for_job(job: JobRecord, reason: str) -> str:
    """The failure notice `reason` as `job`'s member must read it: a relax job took no quota, so it is
    promised no refund (`Delivery.failed` words every notice through this)."""
    if not job.relax:
        return reason
    if reason == LEDGER_DOWN:
        return LEDGER_DOWN_RELAX
    return reason.replace(REFUNDED, NOTHING_CHARGED)


def _background_pauses() -> Iterator[float]:
    """Pauses between background tries: doubling from the worker's last one, capped, forever."""
    pause = LEDGER_RETRY_DELAYS_S[-1] if LEDGER_RETRY_DELAYS_S else 1.0
    while True:
        pause = min(2 * pause, LEDGER_RETRY_CAP_S)
        yield pause


def _unexpected(exc: Exception) -> str:
    """What the member is told when a job ends on an error no step expected."""
    if isinstance(exc, OSError):
        return f"the bot could not save the image ({exc.strerror or type(exc).__name__}); {REFUNDED}"
    if isinstance(exc, StoreError):
        return f"the bot's database was busy; {REFUNDED}. Try again in a minute."
    return f"something went wrong on the bot's side ({type(exc).__name__}); {REFUNDED}"


def _undeliverable(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the finished image is gone from the bot's disk; your quota was refunded"
    detail = str(exc) if isinstance(exc, DeliveryFailed) else type(exc).__name__
    return f"the finished image could not be posted ({detail}); your quota was refunded"


def _round_robin(jobs: list[JobRecord], served: dict[int, int], turn: int) -> list[JobRecord]:
    """`jobs` in the order they run: the next is the oldest one of the user served least recently
    (`served`: user -> turn last served; updated here as if each job were served, from `turn` on)."""
    per_user: dict[int, list[JobRecord]] = {}
    for job in jobs:
        per_user.setdefault(job.user_id, []).append(job)
    heap: list[tuple[int, int, int]] = []
    for user, mine in per_user.items():
        mine.sort(key=lambda j: j.id, reverse=True)  # pop() takes the oldest
        heap.append((served.get(user, -1), mine[-1].id, user))
    heapq.heapify(heap)
    order: list[JobRecord] = []
    while heap:
        _, _, user = heapq.heappop(heap)
        mine = per_user[user]
        order.append(mine.pop())
        turn += 1
        served[user] = turn
        if mine:
            heapq.heappush(heap, (turn, mine[-1].id, user))
    return order


class DeliveryFailed(Exception):
    """The result cannot reach the member (no permission, channel gone...): give up and refund."""


class Delivery(Protocol):
    """What the worker tells the outside world. Every method may raise; the worker logs and goes on."""

    async def position(self, job: JobRecord, position: int, *, model_loading: bool = False) -> None: ...
    async def started(self, job: JobRecord, *, compiling: bool = False) -> None: ...
    async def wants_previews(self, job: JobRecord) -> bool:
        """Whether this job's progress edits carry live previews (asked once, as it starts)."""

    async def progress(self, job: JobRecord, step: int, total: int, *, preview: Preview | None = None) -> None: ...
    async def deliver(self, job: JobRecord, image_path: Path) -> int | None: ...
    async def find_delivered(self, job: JobRecord) -> int | None:
        """After a crash between sending and recording: the id of the result message if it already arrived."""

    async def failed(self, job: JobRecord, reason: str) -> None:
        """Tell the member the job failed: `reason` as the queue words it (a relax job's notice then
        promises no refund: `for_job`)."""

    async def cancelled(self, job: JobRecord) -> None: ...


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"  # was waiting: removed and refunded
    STOPPING = "stopping"  # is running: stops at the next step (or before it is posted), then refunded
    TOO_LATE = "too_late"  # finished and being posted: it arrives and stays charged
    NOT_FOUND = "not_found"


@dataclass
class _Entry:
    job: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    last_progress_edit: float = float("-inf")  # set on the GPU thread (`_JobProgress`): the first step is shown
    edit_in_flight: bool = False  # set on the GPU thread, cleared on the event loop once the edit is done
    progress_edit: asyncio.Task[None] | None = None  # the newest progress edit
    posting: bool = False  # the upload began: a cancel can no longer keep its promise


class _JobProgress(ProgressWithPreviews):
    """A job's step reports, on the GPU thread: which become an edit of its message (at most one per
    `progress_interval`, never two at once, not the last step: the result follows), and for those
    alone, with previews on, a live preview (GPU work, so never for a step that is not shown)."""

    def __init__(self, queue: JobQueue, entry: _Entry, loop: asyncio.AbstractEventLoop, *, previews: bool) -> None:
        self.queue, self.entry, self.loop, self.previews = queue, entry, loop, previews

    def __call__(self, step: int, total: int, preview: PreviewFn | None = None) -> None:  # GPU thread
        entry, now = self.entry, time.monotonic()
        if step >= total or entry.edit_in_flight or now - entry.last_progress_edit < self.queue.progress_interval:
            return
        entry.last_progress_edit = now
        entry.edit_in_flight = True
        shot = None
        if self.previews and preview is not None:
            try:
                shot = preview()
            except Exception:  # a preview is a nicety: the job goes on, without them from now on
                self.previews = False
                log.warning("job %d: a live preview failed; the job goes on without them", entry.job.id, exc_info=True)
        self.loop.call_soon_threadsafe(self.queue._send_progress, entry, step, total, shot)


class JobQueue:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        delivery: Delivery,
        engine_loader: Callable[[], ImageEngine],
        *,
        progress_interval: float = 1.5,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.delivery = delivery
        self._engine_loader = engine_loader
        self._engine: ImageEngine | None = None
        self._engine_error: str | None = None
        self.progress_interval = progress_interval
        self._entries: dict[int, _Entry] = {}
        self._running: _Entry | None = None
        self._served: dict[int, int] = {}  # user -> turn number when last served
        self._turn = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._mending: set[int] = set()  # jobs whose last ledger write is being tried again in the background
        self._gpu = GpuThread()
        self._gpu_call: Future[Any] | None = None  # the engine call in progress, if any
        self.engine_ready = asyncio.Event()
        self.last_peak_vram_gib: float | None = None  # GPU memory of the last image painted (for /admin stats)
        self.metrics = metrics or Metrics()
        self.metrics.queue_depth.set_function(lambda: len(self._entries))
        self.metrics.worker_up.set_function(lambda: 1.0 if self.worker_alive else 0.0)

    @property
    def worker_alive(self) -> bool:
        """The worker runs and its model loaded (it takes jobs)."""
        return self._worker is not None and not self._worker.done() and self._engine is not None and not self._stopping

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Reload unfinished jobs from the ledger and start the worker (and the engine load)."""
        for job in await self.store.active_jobs():
            if job.status is JobStatus.RUNNING:
                log.warning("job %d was interrupted (attempt %d); it runs again", job.id, job.attempts)
                job = await self.store.requeue(job.id)
            self._entries[job.id] = _Entry(job)
        if self._entries:
            log.info("resuming %d unfinished job(s) from the ledger", len(self._entries))
        self._worker = asyncio.create_task(self._work(), name="gpu-worker")

    async def stop(self) -> None:
        """Stop the worker. A job in progress is interrupted and stays in the ledger for next start."""
        self._stopping = True
        if self._running is not None:
            self._running.cancel.set()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._let_the_gpu_stop()
        self._gpu.shutdown()

    async def _let_the_gpu_stop(self) -> None:
        """Wait briefly for the engine call in progress: a job stops at its next step; a model load
        or compile cannot be stopped and is not waited for (the GPU thread dies with the process)."""
        call = self._gpu_call
        if call is None or call.done():
            return
        if not self.engine_ready.is_set():  # the call is the load (and its warm-up compile): minutes, no steps
            log.warning("the model is still loading; not waiting for it (a load cannot be interrupted)")
            return
        waiter = asyncio.wrap_future(call)
        await asyncio.wait({waiter}, timeout=STOP_GRACE_S)
        if not waiter.done():
            waiter.cancel()  # only our wait: the call itself runs on (it cannot be interrupted)
            log.warning("the GPU is still busy (loading, compiling or inside a step); not waiting for it")
        elif isinstance(waiter.exception(), GenerationCancelled):
            log.info("the job in progress stopped (%s); it runs again at the next start", waiter.exception())

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Until nothing waits or runs, and no job waits for the ledger to record its end (for tests
        and graceful shutdown)."""

        async def idle() -> None:
            while self._entries or self._running is not None or self._mending:
                self._idle.clear()
                await self._idle.wait()

        await asyncio.wait_for(idle(), timeout)

    # ------------------------------------------------------------------ admission
    async def submit(self, new: NewJob, *, deadline_s: float | None = None) -> Admission:
        """Admit `new` (see `Store.admit`; in relax mode when `[quota] relax` is on and the member's
        quota is used up); `StoreBusy` when the database is not free by `deadline_s`."""
        q = self.settings.queue
        admission = await self.store.admit(
            new,
            max_queue=q.max_size,
            max_per_user=q.max_per_user,
            deadline_s=deadline_s,
            relax=self.settings.quota.relax,
        )
        if admission.status is AdmissionStatus.QUOTA_EXHAUSTED:
            self.metrics.quota_refusals.inc()
        if admission.relax:
            self.metrics.relax_jobs.inc()
        if admission.status is AdmissionStatus.ACCEPTED:
            assert admission.job is not None
            self._entries[admission.job.id] = _Entry(admission.job)
            self._idle.clear()
            self._wake.set()
        return admission

    async def attach_message(self, job_id: int, message_id: int) -> None:
        """Record the message that shows this job's progress, in the ledger and in the queue."""
        await self.store.set_progress_message(job_id, message_id)
        entry = self._entries.get(job_id)
        if entry is not None:
            entry.job = dataclasses.replace(entry.job, progress_message_id=message_id)

    async def deliver_picked(self, job: JobRecord) -> None:
        """Post a result that is already painted (a grid's U button: `Store.record_pick`) now, beside
        the worker, as any result is posted (recorded done, or failed). A restart before it is
        recorded finds it `generated` and delivers it then."""
        await self._deliver(job)

    # ------------------------------------------------------------------ views
    def waiting(self) -> list[JobRecord]:
        """Waiting jobs in the order they will run: the charged ones, then the relax-mode ones, each
        in round robin (the next job is the oldest one of the user served least recently)."""
        jobs = [entry.job for entry in self._entries.values() if entry is not self._running]
        served = dict(self._served)  # updated as each charged job would be served: relax turns come after
        charged = _round_robin([j for j in jobs if not j.relax], served, self._turn)
        return charged + _round_robin([j for j in jobs if j.relax], served, self._turn + len(charged))

    def upscale_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size Upscale paints an image of this size at, as the engine's plan decides (2x, or
        1.5x where 2x does not fit; None: not at all). `EngineNotReady` while the model loads."""
        if self._engine is None:
            raise EngineNotReady(self._engine_error or "the model is still loading")
        return self._engine.upscale_size(width, height)

    def compiles_first(self, job: JobRecord) -> bool:
        """Whether the engine compiles for this job's size before painting it (the first job at a
        size: a minute or more). Its status says so, or it would look stuck before step 1."""
        return self._engine is not None and self._engine.compiles_for(job.width, job.height)

    @property
    def running(self) -> JobRecord | None:
        return None if self._running is None else self._running.job

    def position(self, job_id: int) -> int | None:
        """0 while running, 1.. while waiting, None when not in the queue."""
        if self._running is not None and self._running.job.id == job_id:
            return 0
        for i, job in enumerate(self.waiting(), start=1):
            if job.id == job_id:
                return i
        return None

    # ------------------------------------------------------------------ cancel
    async def cancel(self, user_id: int) -> tuple[CancelOutcome, JobRecord | None]:
        """Cancel one of `user_id`'s jobs: their newest waiting job, else their running one."""
        mine = [e for e in self._entries.values() if e.job.user_id == user_id]
        waiting = [e for e in mine if e is not self._running and e.job.status is JobStatus.QUEUED]
        if waiting:
            entry = max(waiting, key=lambda e: e.job.id)
            del self._entries[entry.job.id]
            job = await self.store.mark_cancelled(entry.job.id, refund=True)
            self.metrics.job_ended("cancelled")
            self._spawn(self._notify_positions())
            self._check_idle()
            return CancelOutcome.CANCELLED, job
        if self._running is not None and self._running in mine:
            if self._running.posting:
                return CancelOutcome.TOO_LATE, self._running.job
            self._running.cancel.set()
            return CancelOutcome.STOPPING, self._running.job
        return CancelOutcome.NOT_FOUND, None

    # ------------------------------------------------------------------ worker
    def _check_idle(self) -> None:
        if not self._entries and self._running is None and not self._mending:
            self._idle.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _safe(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception:
            self.metrics.discord_error("notify")
            log.exception("could not tell Discord about %s", what)

    async def _fail(self, job: JobRecord, error: str, reason: str | None = None) -> None:
        """Record the failure (refunding the quota unit, if it took one) and tell the member `reason`
        (default: `error`)."""
        job = await self.store.mark_failed(job.id, error, refund=True)
        self.metrics.job_ended("failed")
        await self._safe("a failure", self.delivery.failed(job, reason or error))

    async def _notify_positions(self, limit: int = 10) -> None:
        loading = not self.engine_ready.is_set()
        for pos, job in enumerate(self.waiting()[:limit], start=1):
            await self._safe(f"job {job.id}'s queue position", self.delivery.position(job, pos, model_loading=loading))

    async def _on_gpu(self, fn: Callable[[], T]) -> T:
        self._gpu_call = future = self._gpu.submit(fn)
        return await asyncio.wrap_future(future)

    async def _load_engine(self) -> None:
        try:
            self._engine = await self._on_gpu(self._engine_loader)
        except Exception as exc:
            log.exception("the model failed to load")
            self._engine_error = (
                f"the image model failed to load ({type(exc).__name__}); an admin must check the bot's log"
            )
        self.engine_ready.set()

    async def _work(self) -> None:
        await self._load_engine()
        if len(self.waiting()) > 1:  # the first starts now; the others' notes say the model is loading
            self._spawn(self._notify_positions())
        while True:
            order = self.waiting()
            if not order:
                self._check_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            job = order[0]
            entry = self._entries[job.id]
            self._turn += 1
            self._served[job.user_id] = self._turn
            try:
                await self._process(entry)
            except asyncio.CancelledError:
                # Stopping, maybe before stop() could flag the job (asyncio.run cancels every task at
                # once on SIGTERM): the engine must still stop at its next step, not paint on.
                entry.cancel.set()
                raise
            except Exception as exc:
                log.exception("job %d: unexpected error in the worker", job.id)
                await self._end_after_error(entry, exc)
            finally:
                self._running = None
                self._entries.pop(job.id, None)
                self._check_idle()

    async def _process(self, entry: _Entry) -> None:
        job = entry.job
        if job.status is JobStatus.GENERATED:  # made before a restart; maybe even sent
            try:
                already = await self.delivery.find_delivered(job)
            except Exception:
                log.exception("job %d: could not check whether the result already arrived", job.id)
                already = None
            if already is not None:
                log.info("job %d: result had already reached Discord (message %d)", job.id, already)
                await self._record_done(job, already)
                return
            await self._deliver(job)
            return
        # Running from here on: a /cancel that arrives while the row turns "running" must stop the
        # job (cancel event), not cancel it as a waiting one while the worker goes on painting.
        self._running = entry
        try:
            job = await self.store.mark_running(job.id)
        except InvalidTransition:
            log.info("job %d is no longer runnable; skipped", job.id)
            return
        entry.job = job
        max_attempts = self.settings.jobs.max_attempts
        if job.attempts > max_attempts:
            await self._fail(job, f"it failed {max_attempts} times in a row, so it was given up")
            return
        if self._engine is None:
            await self._fail(job, self._engine_error or "no model")
            return
        if job.source_path is not None and not await asyncio.to_thread(Path(job.source_path).is_file):
            await self._fail(job, f"source image {job.source_path} is gone", SOURCE_GONE)
            return
        self._spawn(self._notify_positions())
        await self._safe("a start", self.delivery.started(job, compiling=self.compiles_first(job)))
        result = await self._generate(entry)
        if result is None:
            return
        self.metrics.image_painted(result.seconds, job.steps, result.peak_vram_gib)
        if result.peak_vram_gib is not None:
            self.last_peak_vram_gib = result.peak_vram_gib
        if len(result.images) != job.count:  # the engine broke its contract: nothing half-delivered
            short = f"the engine painted {len(result.images)} of {job.count} images"
            await self._fail(job, short, f"{short}; {REFUNDED}")
            return
        path = Path(self.settings.storage.results_dir) / f"job-{job.id}.png"
        derived = {} if job.source_job_id is None else {"from_job": job.source_job_id, "made_by": job.origin}
        meta = png_metadata(job, self._engine.preset, job=job.id, **derived)
        if job.count > 1:  # a grid: each image kept beside it (its U and V buttons take them), then the grid
            for index, one in enumerate(result.images, start=1):
                part = dataclasses.replace(job, seed=image_seed(job.seed, index - 1), count=1)
                part_meta = png_metadata(part, self._engine.preset, job=job.id, image=index)
                await asyncio.to_thread(save_png, one, grid_part_path(path, index), part_meta)
        image = result.image if job.count == 1 else grid_image(list(result.images))
        await asyncio.to_thread(save_png, image, path, meta)
        job = await self.store.mark_generated(job.id, str(path), result.seconds)
        entry.job = job
        if entry.cancel.is_set() and not self._stopping:  # /cancel came after the last step: keep its promise
            job = await self.store.mark_cancelled(job.id, refund=True)
            self.metrics.job_ended("cancelled")
            await self._safe("a cancel", self.delivery.cancelled(job))
            return
        entry.posting = True  # from here a /cancel says it is too late (no await since the check above)
        await self._deliver(job)

    async def _wants_previews(self, job: JobRecord) -> bool:
        try:
            return await self.delivery.wants_previews(job)
        except Exception:
            log.warning("job %d: could not tell whether it shows live previews; it does not", job.id, exc_info=True)
            return False

    async def _generate(self, entry: _Entry) -> GenerationResult | None:
        """The job's images: one, or a grid's `count` painted in one batch, each from its own seed
        (seed, seed + 1, ...: `image_seed`), with one progress count and previews of the whole grid."""
        job = entry.job
        request = GenerationRequest.of(job, guidance=self.settings.generation.guidance)
        progress = _JobProgress(self, entry, asyncio.get_running_loop(), previews=await self._wants_previews(job))
        engine = self._engine
        assert engine is not None  # _process checked

        def call() -> GenerationResult:  # GPU thread
            return engine.generate(request, on_progress=progress, should_cancel=entry.cancel.is_set)

        try:
            try:
                return await self._on_gpu(call)
            finally:
                await self._progress_settled(entry)
        except GenerationCancelled:
            if self._stopping:
                return None  # stays "running" in the ledger: resumed on next start
            job = await self.store.mark_cancelled(job.id, refund=True)
            self.metrics.job_ended("cancelled")
            await self._safe("a cancel", self.delivery.cancelled(job))
        except SourceImageMissing as exc:  # deleted or damaged after the job's start checked it
            log.error("job %d: %s", job.id, exc)
            await self._fail(job, str(exc), SOURCE_GONE)
        except GenerationOOM as exc:
            log.error("job %d: %s", job.id, exc)
            await self._fail(
                job, str(exc), "the GPU ran out of memory; your quota was refunded. Try fewer steps or a smaller size."
            )
        except Exception as exc:
            log.exception("job %d: generation failed", job.id)
            await self._fail(
                job,
                f"{type(exc).__name__}: {exc}",
                f"generation failed ({type(exc).__name__}); your quota was refunded",
            )
        return None

    def _send_progress(self, entry: _Entry, step: int, total: int, preview: Preview | None) -> None:
        """Edit the job's message to show `step` (and `preview`): `_JobProgress` decided it is due."""

        async def edit() -> None:
            try:
                await self._safe("progress", self.delivery.progress(entry.job, step, total, preview=preview))
            finally:
                entry.edit_in_flight = False

        entry.progress_edit = self._spawn(edit())

    async def _progress_settled(self, entry: _Entry) -> None:
        """Let a progress edit still on its way land before what ends the job is shown (a preview's
        upload takes a moment): arriving later, it would replace the result or the failure notice."""
        edit = entry.progress_edit
        if edit is not None and not edit.done() and not self._stopping:
            await asyncio.wait({edit}, timeout=PROGRESS_SETTLE_S)

    async def _deliver(self, job: JobRecord) -> None:
        job = await self.store.get_job(job.id) or job  # pick up the progress message id set meanwhile
        if job.result_path is None:  # a generated row always has one; a damaged ledger must not stall the worker
            await self._fail(job, "the finished image went missing; your quota was refunded")
            return
        try:
            message_id = await self.delivery.deliver(job, Path(job.result_path))
        except Exception as exc:
            # DeliveryFailed is an expected refusal (permissions, channel gone): no traceback.
            log.error("job %d: delivery failed: %s", job.id, exc, exc_info=not isinstance(exc, DeliveryFailed))
            self.metrics.discord_error("delivery")
            failed = await self.store.mark_failed(job.id, f"delivery failed: {exc}", refund=True)
            self.metrics.job_ended("failed")
            await self._safe("a failed delivery", self.delivery.failed(failed, _undeliverable(exc)))
            return
        await self._record_done(job, message_id)

    async def _record_done(self, job: JobRecord, message_id: int | None) -> None:
        """The result reached Discord: record it. Never refund from here (the member has the image):
        if the ledger does not answer, the worker goes on and the write is tried again in the
        background until it is taken (or, after a stop, the next start finds the result)."""

        async def record() -> bool:
            try:
                await self.store.mark_done(job.id, message_id)
            except InvalidTransition as exc:  # ended meanwhile (by an earlier try, or by hand)
                log.warning("job %d: delivered, and the ledger has it ended already (%s)", job.id, exc)
                return True
            except StoreError as exc:
                log.warning("job %d: could not record the delivery (%s); trying again", job.id, exc)
                return False
            self.metrics.job_ended("done")
            return True

        if await self._tries(record, (0.0, *LEDGER_RETRY_DELAYS_S)):
            return
        log.error("job %d: delivered, but the ledger did not record it; trying again in the background", job.id)
        self._keep_trying(job.id, record)

    async def _end_after_error(self, entry: _Entry, exc: Exception) -> None:
        """An error the steps did not handle (the image could not be saved, the ledger refused a
        write): end the job in the ledger, failed and refunded, and tell the member. A locked
        database is waited for a while; if it still does not answer, the member is told so and the
        failure is written in the background once the ledger answers (then the member is told that):
        until then the row stays active, and a restart meanwhile runs the job again."""
        job = entry.job

        async def end() -> bool:
            try:
                current = await self.store.get_job(job.id)
                if current is None or current.status not in ACTIVE_STATUSES:
                    return True  # already ended (cancelled, failed) by the step that raised
                failed = await self.store.mark_failed(job.id, f"{type(exc).__name__}: {exc}", refund=True)
            except StoreError as again:
                log.warning("job %d: the ledger did not take its failure (%s); trying again", job.id, again)
                return False
            self.metrics.job_ended("failed")
            await self._safe("a failure", self.delivery.failed(failed, _unexpected(exc)))
            return True

        if await self._tries(end, (0.0, *LEDGER_RETRY_DELAYS_S)):
            return
        log.error("job %d: the ledger is not answering; its failure is written once it answers again", job.id)
        await self._safe("a failure", self.delivery.failed(job, LEDGER_DOWN))
        self._keep_trying(job.id, end)  # after LEDGER_DOWN reached the member: the final word comes last

    @staticmethod
    async def _tries(attempt: Callable[[], Awaitable[bool]], pauses: Iterable[float]) -> bool:
        """`attempt()` after each pause until it returns True (True), or the pauses run out (False)."""
        for pause in pauses:
            if pause:
                await asyncio.sleep(pause)
            if await attempt():
                return True
        return False

    def _keep_trying(self, job_id: int, attempt: Callable[[], Awaitable[bool]]) -> None:
        """Try `attempt` (a job's ledger transition and what follows it) in the background until it
        succeeds. The worker drops the job from the queue as soon as this returns (no await
        between), so nothing paints or delivers it again meanwhile; `stop` cancels this (the row is
        then still active, and the next start resumes the job)."""

        async def keep_trying() -> None:
            try:
                await self._tries(attempt, _background_pauses())
                log.info("job %d: the ledger answered again; the job's end is recorded", job_id)
            except Exception:  # a bug, not the ledger: the row stays active for the next start
                log.exception("job %d: gave up recording the job's end", job_id)
            finally:
                self._mending.discard(job_id)
                self._check_idle()

        self._mending.add(job_id)
        self._spawn(keep_trying())
