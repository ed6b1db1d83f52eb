"""What a member asks the painter for: the one type that carries a job's parameters.

The slash command builds a `JobParams`; the ledger row (`NewJob`, `JobRecord`), the engine's
`GenerationRequest` and the PNG metadata all extend or read this same dataclass, and the ledger's
columns for it are derived from its fields. Adding a parameter is one field here, with a default,
plus a migration that adds its column (see `bot/store/schema.py`).

A job derived from an earlier result (Vary, Upscale: the result buttons) paints from that result's
image: img2img from `source_path`, resized to width x height, at denoising `strength`. A plain job
paints from pure noise (`strength` 1, no `source_path`).

`MemberSettings` is what a member chose with /settings: the defaults their /imagine uses for what it
is not told (stored in the ledger's `member_settings` table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class JobParams:
    prompt: str
    seed: int
    steps: int = 20
    width: int = 1024
    height: int = 1024
    strength: float = 1.0  # denoising strength: 1 paints from noise, less keeps more of the source image
    source_path: str | None = None  # the image an img2img job starts from (a result on the bot's disk)
    count: int = 1  # images in the job (a grid of `count`, seeds seed, seed + 1, ...); 1: one image

    @property
    def from_image(self) -> bool:
        """Painted from an earlier image (img2img), not from noise alone."""
        return self.source_path is not None

    def params(self) -> JobParams:
        """Only the parameters, without what a subclass (ledger row, request) adds."""
        return JobParams(**{name: getattr(self, name) for name in PARAM_FIELDS})


PARAM_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobParams))


MAX_COUNT = 4
"""The most images one /imagine may ask for (a grid of four)."""


def image_seed(seed: int, index: int) -> int:
    """The seed of a grid's image `index` (0-based): seed, seed + 1, ..., wrapping within 32 bits."""
    return (seed + index) % 2**32


@dataclass(frozen=True)
class MemberSettings:
    """A member's own defaults (/settings). None: not chosen, so the bot's default applies."""

    size: str | None = None  # a size preset's name: "square", "portrait", "landscape"
    steps: int | None = None
    count: int | None = None  # 1..MAX_COUNT: images per /imagine (more than one: a grid)
    previews: bool | None = None  # live previews on progress edits

    def is_empty(self) -> bool:
        return self == MemberSettings()
