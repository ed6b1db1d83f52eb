"""The engine's contract with the rest of the bot, without torch or DiffSynth.

The queue (`bot.jobs`) and the Discord side import only this module: what a job asks the engine
for, what comes back, the errors it may raise, and the `ImageEngine` protocol the worker calls.
`bot.engine.pipeline.Engine` is the real implementation; tests wrap it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..params import JobParams

ProgressFn = Callable[[int, int], None]
"""Called from the engine's thread after each denoising step: (step, total)."""


@dataclass(frozen=True)
class PreviewImage:
    """A live preview as a file: a small JPEG (or WebP) of the image being painted."""

    data: bytes
    ext: str  # the file name's extension: "jpg" or "webp"
    width: int
    height: int


class Preview(Protocol):
    """A preview made on the engine's device at one step. Its pixels may still be on their way to host
    memory: `encode` waits for them, then compresses them (a few ms of CPU), so call it off the
    engine's thread."""

    def encode(self) -> PreviewImage: ...


PreviewFn = Callable[[], "Preview | None"]
"""Makes a preview of the newest step the engine has queued (GPU work, no VAE); None when there is
none yet. Valid only during the progress report it came with."""


class ProgressWithPreviews(ABC):
    """An `on_progress` that takes live previews: seeing this type, the engine hands each report a
    `PreviewFn`. A preview costs GPU work, so call it only for a report that will be shown.
    Any other `ProgressFn` is called with (step, total) alone."""

    @abstractmethod
    def __call__(self, step: int, total: int, preview: PreviewFn | None = None) -> None: ...


CancelFn = Callable[[], bool]
"""Read by the engine between steps: true stops the job (`GenerationCancelled`)."""


class GenerationCancelled(Exception):
    """Raised inside `generate` when `should_cancel` turned true between two steps."""


class GenerationOOM(RuntimeError):
    """The GPU ran out of memory; the engine freed what it could and can take the next job."""


class SourceImageMissing(FileNotFoundError):
    """A job painted from an earlier image (img2img) found that image gone or unreadable."""


UPSCALE_FACTORS = (2.0, 1.5)
"""What Upscale multiplies both sides by: the first whose result the engine's plan fits (`upscale_size`)."""

MAX_UPSCALED_PIXELS = 2048 * 2048
"""The largest image Upscale makes (4.2 megapixels: 2x of the bot's 1024x1024 and its portrait and
landscape sizes). An upscaled image is not upscaled again: each step of a tiled pass costs about one
image per 1024x1024 tile, and the result must still reach Discord under its upload limit."""


@dataclass(frozen=True, kw_only=True)
class GenerationRequest(JobParams):
    """A job's parameters plus what the engine needs beyond them (the configured guidance)."""

    guidance: float = 3.5

    @classmethod
    def of(cls, params: JobParams, *, guidance: float) -> GenerationRequest:
        return cls(**vars(params.params()), guidance=guidance)


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image  # the first of `images`
    request: GenerationRequest
    seconds: float  # the whole job's, every image of a grid together
    peak_vram_gib: float | None  # torch max_memory_allocated during this job (GPU only)
    timings: dict[str, float] = field(default_factory=dict)
    images: tuple[Image.Image, ...] = ()  # every image painted: the request's `count`, in seed order

    def __post_init__(self) -> None:
        if not self.images:
            object.__setattr__(self, "images", (self.image,))


class ImageEngine(Protocol):
    """What the GPU worker needs of an engine. `generate` blocks: the worker runs it in its thread."""

    preset: str

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """Paint the request's `count` images (one batch: a grid's seeds are `params.image_seed`).
        `on_progress` may be a `ProgressWithPreviews` (live previews)."""
        ...

    def compiles_for(self, width: int, height: int) -> bool:
        """Whether a job at this size compiles first (a minute or more before its first step)."""
        ...

    def upscale_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size Upscale paints an image of this size at: the first of `UPSCALE_FACTORS` that the
        engine's plan fits and `MAX_UPSCALED_PIXELS` allows; None when none does."""
        ...
