"""Tiled passes: a function run over overlapping tiles of an image-shaped tensor, the results blended.

Upscale paints an image larger than the model's native size without more GPU memory than a plain job:
the VAE encodes and decodes it in tiles, and each denoising step runs the DiT once per tile of the
source's size (the size the job it came from was painted at: its compiled graphs serve again). Every
tile's activations are those of a job of that size; only the whole image's pixels and latents (a few
bytes a pixel: `budget.upscale_fits`) are held at once.

DiffSynth has tilers too (`tiled=True` on the pipeline call), but one `tile_size` serves the DiT
(latents), the VAE encoder (pixels) and the decoder (latents), and its VAE tiler (`Unfold`/`Fold`)
leaves the last rows and columns out whenever (side - tile) is not a multiple of the stride: they
come back as 0/0 (NaN, black pixels). Here the tiles always cover the whole tensor (the last one ends
at its edge) and neighbours cross-fade linearly over the part they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# The VAE in tiles (sizes of the tile the model sees): the decoder reads latents (64 = 512 pixels),
# the encoder pixels. Overlap: a quarter of a tile, enough for the convolutions' reach to fade out.
VAE_DECODE_TILE, VAE_DECODE_STRIDE = 64, 48
VAE_ENCODE_TILE, VAE_ENCODE_STRIDE = 512, 384
LATENT_SCALE = 8  # pixels per latent along each side (FLUX's VAE)


def starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Where tiles of `tile` begin so that they cover [0, length): spread evenly, at most `stride`
    apart, each a multiple of `align`, the last ending at `length` (one tile when it fits whole)."""
    if tile >= length:
        return [0]
    span = length - tile
    if span % align:
        raise ValueError(f"cannot align tiles of {tile} to {align} over {length}")
    count = math.ceil(span / stride) + 1
    out = [round(i * span / (count - 1) / align) * align for i in range(count)]
    out[-1] = span
    return sorted(set(out))


def _weights(size: int, lead: int, tail: int) -> torch.Tensor:
    """One tile's weights along an axis: rising over the `lead` it shares with the tile before,
    falling over the `tail` it shares with the next; two neighbours' weights sum to 1 there."""
    w = torch.ones(size, dtype=torch.float32)
    if lead > 0:
        w[:lead] = (torch.arange(lead, dtype=torch.float32) + 0.5) / lead
    if tail > 0:
        fall = (torch.arange(tail, 0, -1, dtype=torch.float32) - 0.5) / tail
        w[size - tail :] = torch.minimum(w[size - tail :], fall)
    return w


def _overlaps(offsets: list[int], tile: int) -> list[tuple[int, int]]:
    """(shared with the previous tile, shared with the next) for each tile along an axis."""
    out = []
    for i, start in enumerate(offsets):
        lead = offsets[i - 1] + tile - start if i > 0 else 0
        tail = start + tile - offsets[i + 1] if i + 1 < len(offsets) else 0
        out.append((max(0, lead), max(0, tail)))
    return out


def tile_count(height: int, width: int, tile: tuple[int, int], stride: tuple[int, int], align: int = 1) -> int:
    """How many tiles `tiled` runs over a tensor of this height and width."""
    th, tw = min(tile[0], height), min(tile[1], width)
    return len(starts(height, th, stride[0], align)) * len(starts(width, tw, stride[1], align))


@torch.no_grad()
def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: tuple[int, int],
    stride: tuple[int, int],
    *,
    scale: float = 1.0,
    align: int = 1,
) -> torch.Tensor:
    """`fn` over overlapping tiles of `x` (..., H, W), blended into one output. `fn` maps a tile of
    h x w to (..., h * scale, w * scale); `align` keeps tile offsets multiples of it (a pixel offset
    must land on a whole latent: 8 for the VAE encoder). The blend is kept in float32 on x's device."""
    height, width = x.shape[-2:]
    th, tw = min(tile[0], height), min(tile[1], width)
    ys, xs = starts(height, th, stride[0], align), starts(width, tw, stride[1], align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    out_h, out_w = round(height * scale), round(width * scale)
    y_weights = [_weights(round(th * scale), round(a * scale), round(b * scale)) for a, b in _overlaps(ys, th)]
    x_weights = [_weights(round(tw * scale), round(a * scale), round(b * scale)) for a, b in _overlaps(xs, tw)]
    out: torch.Tensor | None = None
    dtype = x.dtype
    total = torch.zeros((out_h, out_w), dtype=torch.float32, device=x.device)
    for y, wy in zip(ys, y_weights, strict=True):
        for x0, wx in zip(xs, x_weights, strict=True):
            piece = fn(x[..., y : y + th, x0 : x0 + tw])
            if out is None:
                dtype = piece.dtype
                out = torch.zeros((*piece.shape[:-2], out_h, out_w), dtype=torch.float32, device=x.device)
            weight = (wy[:, None] * wx[None, :]).to(x.device)
            oy, ox = round(y * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * weight
            total[oy : oy + ph, ox : ox + pw] += weight
            del piece
    assert out is not None  # at least one tile ran
    return (out / total).to(dtype)


class DiTTiles:
    """The pipeline's model function, once per tile of `tile` (latent rows, columns) when the latents
    are larger, the tiles' predictions blended (half a tile apart: an image twice a tile's size on
    each side is 3 x 3 tiles). `None`: the whole latent at once. Each tile gets its own position ids,
    as DiffSynth's own tiled DiT does: it is painted as an image of its own, which a low-strength
    img2img pass over a coherent source keeps coherent. Installed between the modulation table (one
    per step: every tile of a step reads the same row) and the CUDA step graph (each tile is one
    replay of the graph captured at the tile's size)."""

    def __init__(self, model_fn: Callable[..., torch.Tensor], dit: torch.nn.Module):
        self.model_fn = model_fn
        self.dit = dit
        self.tile: tuple[int, int] | None = None
        self.runs = 0  # tile forwards run since loading (for tests and benchmarks)

    def __call__(self, **kwargs):
        tile, latents = self.tile, kwargs.get("latents")
        if tile is None or latents is None or (latents.shape[-2] <= tile[0] and latents.shape[-1] <= tile[1]):
            return self.model_fn(**kwargs)

        def one(piece: torch.Tensor) -> torch.Tensor:
            piece = piece.contiguous()
            self.runs += 1
            return self.model_fn(**{**kwargs, "latents": piece, "image_ids": self.dit.prepare_image_ids(piece)})

        stride = (max(2, tile[0] // 2 // 2 * 2), max(2, tile[1] // 2 // 2 * 2))
        return tiled(one, latents, tile, stride, align=2)
