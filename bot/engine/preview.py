"""Live previews: what the image being painted looks like at a step, without the VAE.

At each step FLUX's DiT predicts a velocity `v` for the latents `x_t`, and DiffSynth's
`FlowMatchScheduler.step` moves them by `v * (sigma_next - sigma)`: a straight line that reaches the
clean latent at sigma 0. So the model's current guess of the clean latent is

    x0 = x_t - sigma * v

(`StepTap` keeps `x_t`, `v` and `sigma` of the newest step by wrapping the pipeline's `step`).
FLUX's 16 latent channels map to RGB closely enough for a preview by one fixed linear map with a
bias, the one ComfyUI uses for FLUX (see `LATENT_RGB_FACTORS`); DiffSynth's latents are in the same
space as ComfyUI's (the VAE's output after its shift 0.1159 and scale 0.3611). The map, the resize to
at most `MAX_SIDE` pixels and the conversion to bytes run on the engine's device: a few small
kernels, then a copy of ~0.4 MB to page-locked memory that does not make the engine's thread wait.
The JPEG is encoded later, off that thread (`TensorPreview.encode`).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from ..images import grid_shape
from .api import PreviewImage

# ComfyUI, comfy/latent_formats.py, class Flux: `latent_rgb_factors` (one row per latent channel:
# its weight in R, G, B) and `latent_rgb_factors_bias`; ComfyUI's Latent2RGBPreviewer applies them to
# the denoised latent, then maps [-1, 1] to [0, 255] (latent_preview.py). Published numbers, copied.
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
LATENT_RGB_BIAS: tuple[float, float, float] = (-0.0329, -0.0718, -0.0851)

MAX_SIDE = 384
"""A preview's longer side at most, in pixels (never larger than the image itself)."""
JPEG_QUALITY = 75
LATENT_SCALE = 8  # pixels per latent pixel (FLUX's VAE)


def preview_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The preview's (width, height) for an image: its shape, the longer side at most `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class _Weights:
    """The map as a 1x1 convolution, kept per device (made once, not per preview)."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._by_device:
            weight = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32).T.reshape(3, 16, 1, 1)
            bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
            self._by_device[device] = (weight.to(device), bias.to(device))
        return self._by_device[device]


_WEIGHTS = _Weights()


def as_grid(latents: torch.Tensor) -> torch.Tensor:
    """A batch's (n, 16, h, w) latents laid out as its grid will be (`images.grid_shape`): (1, 16, rows*h, columns*w)."""
    count = latents.shape[0]
    if count == 1:
        return latents
    columns, rows = grid_shape(count)
    h, w = latents.shape[-2:]
    grid = latents.new_zeros((1, latents.shape[1], rows * h, columns * w))
    for i in range(count):
        row, column = divmod(i, columns)
        grid[0, :, row * h : (row + 1) * h, column * w : (column + 1) * w] = latents[i]
    return grid


def clean_latents(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """The model's guess of the finished latent at this step: x0 = x_t - sigma * v (float32)."""
    return latents.float() - sigma * velocity.float()


@torch.no_grad()
def latents_to_pixels(x0: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 16, h, w) clean latents -> (height, width, 3) uint8 RGB of `size` = (width, height), on x0's device."""
    weight, bias = _WEIGHTS.on(x0.device)
    rgb = torch.nn.functional.conv2d(x0.float(), weight, bias)  # the linear map, per latent pixel
    width, height = size
    if (height, width) != tuple(rgb.shape[-2:]):
        shrinking = height < rgb.shape[-2] or width < rgb.shape[-1]
        rgb = torch.nn.functional.interpolate(
            rgb, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
        )
    pixels = ((rgb[0] + 1.0) * 127.5).clamp_(0, 255).round_().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous()


class TensorPreview:
    """One preview's pixels, copied from the device to page-locked memory without waiting; `encode`
    (on any thread) waits for that copy and compresses them."""

    def __init__(self, pixels: torch.Tensor, *, fmt: str = "jpeg", quality: int = JPEG_QUALITY):
        self.fmt, self.quality = fmt, quality
        self._ready: torch.cuda.Event | None = None
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            self._host = host
        else:
            self._host = pixels.cpu()

    def encode(self) -> PreviewImage:
        if self._ready is not None:
            self._ready.synchronize()
        image = Image.fromarray(self._host.numpy(), "RGB")
        return encode_image(image, fmt=self.fmt, quality=self.quality)


def encode_image(image: Image.Image, *, fmt: str = "jpeg", quality: int = JPEG_QUALITY) -> PreviewImage:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
        ext = "jpg"
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
        ext = "webp"
    else:
        raise ValueError(f"preview format must be 'jpeg' or 'webp', got {fmt!r}")
    return PreviewImage(data=buf.getvalue(), ext=ext, width=image.width, height=image.height)


class StepTap:
    """Keeps what the pipeline's newest denoising step saw (x_t, the predicted velocity, sigma), so a
    preview can be made of it on demand. Install once per pipeline; `clear` after each job."""

    def __init__(self) -> None:
        self._latents: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None
        self._sigma = 0.0

    def install(self, pipe: Any) -> None:
        """Wrap `pipe.step` (DiffSynth's `BasePipeline.step`: scheduler, latents, progress_id, noise_pred)."""
        step = pipe.step

        def tapped_step(scheduler: Any, latents: torch.Tensor, progress_id: int, noise_pred: torch.Tensor, **kwargs):
            self.record(latents, noise_pred, float(scheduler.sigmas[progress_id]))
            return step(scheduler, latents=latents, progress_id=progress_id, noise_pred=noise_pred, **kwargs)

        pipe.step = tapped_step

    def record(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> None:
        """References only: nothing is computed or copied at a step that is not previewed."""
        self._latents, self._velocity, self._sigma = latents, velocity, sigma

    def clean_latents(self) -> torch.Tensor | None:
        if self._latents is None or self._velocity is None:
            return None
        return clean_latents(self._latents, self._velocity, self._sigma)

    @torch.no_grad()
    def preview(self, max_side: int = MAX_SIDE) -> TensorPreview | None:
        """A preview of the newest step recorded (its GPU work is queued behind that step's); of a
        batch, the whole grid in one preview."""
        x0 = self.clean_latents()
        if x0 is None:
            return None
        x0 = as_grid(x0)
        h, w = x0.shape[-2:]
        return TensorPreview(latents_to_pixels(x0, preview_size(w * LATENT_SCALE, h * LATENT_SCALE, max_side)))

    def clear(self) -> None:
        self._latents = self._velocity = None
