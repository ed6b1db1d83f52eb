"""Image files: PNGs that carry their parameters, and re-encoding under an upload limit."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .params import PARAM_FIELDS, JobParams


def png_metadata(params: JobParams, model: str, **extra: object) -> dict[str, object]:
    """The parameters an image carries in its PNG text chunks, so it can be painted again: every
    field of `JobParams` (width and height as one `size`), the model, then `extra`. Not the source
    image's path (a file on the bot's disk: `extra` names the job it came from), and the denoising
    strength only for an image painted from another one."""
    fields: dict[str, object] = {name: getattr(params, name) for name in PARAM_FIELDS}
    width, height = fields.pop("width"), fields.pop("height")
    fields.pop("source_path")
    if not params.from_image:
        fields.pop("strength")
    if params.count == 1:
        fields.pop("count")
    return {**fields, "size": f"{width}x{height}", "model": model, **extra, "generator": "fluxbot"}


def png_bytes(image: Image.Image, metadata: dict[str, object]) -> bytes:
    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: Path, metadata: dict[str, object]) -> Path:
    """Write atomically: a crash never leaves half a file where a finished image is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(png_bytes(image, metadata))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a bad folder leaves no half file behind
        raise
    return path


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows) of a grid of `count` images: 1x2, 1x3 in a row, four as 2x2."""
    return (2, 2) if count == 4 else (count, 1)


def grid_image(images: list[Image.Image]) -> Image.Image:
    """The images side by side at full size (2x2 for four), in order, left to right, top to bottom."""
    columns, rows = grid_shape(len(images))
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def grid_part_path(result_path: str | Path, index: int) -> Path:
    """Where image `index` (1-based) of the grid saved at `result_path` is kept: beside it."""
    path = Path(result_path)
    return path.with_name(f"{path.stem}-{index}{path.suffix}")


def fit_upload(png: bytes, limit: int) -> tuple[bytes, str]:
    """Return (data, extension) no larger than `limit` bytes: the PNG if it fits, else WebP/JPEG."""
    if len(png) <= limit:
        return png, "png"
    with Image.open(io.BytesIO(png)) as img:
        rgb = img.convert("RGB")
    for quality in (95, 90, 85, 75, 60, 45):
        for fmt, ext in (("WEBP", "webp"), ("JPEG", "jpg")):
            buf = io.BytesIO()
            rgb.save(buf, format=fmt, quality=quality)
            if buf.tell() <= limit:
                return buf.getvalue(), ext
    scale = 0.75
    while scale > 0.1:
        small = rgb.resize((max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale))))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=80)
        if buf.tell() <= limit:
            return buf.getvalue(), "jpg"
        scale *= 0.75
    raise ValueError(f"cannot fit the image under {limit} bytes")
