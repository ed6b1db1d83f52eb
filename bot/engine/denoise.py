"""One job's denoising steps as the engine sees them: reported, cancellable and timed.

DiffSynth hands its timesteps to a progress-bar callable and iterates what that returns; the
`DenoiseLoop` is that callable. It gets control back between two steps, so it is where a job is
cancelled and where a step is reported once the GPU has really finished it (with a way to make a
live preview of it, for a `ProgressWithPreviews`); it also keeps the clock marks and CUDA events the
job's timings come from.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator

import torch

from .api import CancelFn, GenerationCancelled, PreviewFn, ProgressFn, ProgressWithPreviews
from .offload import to_device_nonblocking


def _recorded_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class DenoiseLoop:
    """Build one per job, pass it as DiffSynth's `progress_bar_cmd`, then call `finish()`.

    Progress is honest: a step is reported once the GPU finished it. With `queue_ahead` (the DiT all
    on the GPU) the CPU queues step i+1 before waiting for step i, so the GPU never idles between
    steps; without it (streamed layers) it waits at once: the CPU must not run far ahead of the
    copies. On the CPU each step is done when it returns.

    With `preview` and an `on_progress` that takes previews, each report comes with `preview`: called
    then, it previews the newest step queued (with `queue_ahead`, the one after the step reported).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
        queue_ahead: bool = False,
        preview: PreviewFn | None = None,
    ):
        self.device = device
        self.cuda = device.type == "cuda"
        self.on_progress = on_progress
        self.preview = preview if isinstance(on_progress, ProgressWithPreviews) else None
        self.should_cancel = should_cancel
        self.queue_ahead = self.cuda and queue_ahead
        self.start = time.perf_counter()
        self.denoise_start: float | None = None  # the loop began (the text encoders were queued)
        self.decode_start: float | None = None  # the last step was reported: decoding follows
        self.events: list[torch.cuda.Event] = []  # GPU: denoising starts, then each step ends
        self.total = 0
        self._unreported: tuple[torch.cuda.Event, int] | None = None  # a step queued, not yet reported

    def __call__(self, timesteps: torch.Tensor) -> Iterator[torch.Tensor]:
        self.total = len(timesteps)
        self.denoise_start = time.perf_counter()
        if self.cuda:  # GPU-side times: the CPU runs ahead of the GPU, so its clock would blur phases
            self.events.append(_recorded_event())
        # One copy for all steps: DiffSynth moves each step's timestep to the GPU with a
        # blocking copy, which would make the CPU wait for the GPU at every step.
        for i, t in enumerate(to_device_nonblocking(timesteps, self.device)):
            if self.should_cancel is not None and self.should_cancel():
                raise GenerationCancelled(f"cancelled before step {i + 1}/{self.total}")
            yield t
            self._queued(i + 1)
        self._report_unreported()
        self.decode_start = time.perf_counter()

    def _report(self, step: int) -> None:
        if isinstance(self.on_progress, ProgressWithPreviews):
            self.on_progress(step, self.total, self.preview)
        elif self.on_progress is not None:
            self.on_progress(step, self.total)

    def _queued(self, step: int) -> None:
        """The pipeline queued `step` (1-based): report it, or the one before, once the GPU is done."""
        if not self.cuda:
            self._report(step)
            return
        done = _recorded_event()
        self.events.append(done)
        self._report_unreported()
        self._unreported = (done, step)
        if not self.queue_ahead:
            self._report_unreported()

    def _report_unreported(self) -> None:
        if self._unreported is not None:
            event, step = self._unreported
            self._unreported = None
            event.synchronize()
            self._report(step)

    def finish(self) -> tuple[float, dict[str, float]]:
        """After the pipeline returned: the job's seconds, and the seconds of its phases (text
        encoding, denoising, decoding; with a GPU also the median step after the first)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        return end - self.start, self._timings(end)

    def _timings(self, end: float) -> dict[str, float]:
        timings: dict[str, float] = {}
        if self.denoise_start is None:
            return timings
        denoised = end if self.decode_start is None else self.decode_start
        timings["denoise_s"] = denoised - self.denoise_start
        if len(self.events) > 1:
            # From the GPU's clock: the text encoders' queued work is not counted as denoising,
            # and a step's time is that of its kernels, not of the CPU's wait for them.
            timings["denoise_s"] = self.events[0].elapsed_time(self.events[-1]) / 1000
            steps_s = [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self.events[1:])]
            if steps_s:  # after the first step, which also fills the job's modulation table
                timings["step_s"] = statistics.median(steps_s)
        timings["text_encode_s"] = denoised - self.start - timings["denoise_s"]
        timings["decode_s"] = end - denoised
        return timings
