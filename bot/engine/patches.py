"""Changes to a loaded DiffSynth FLUX pipeline, for a process that paints many images in a row.

DiffSynth recomputes what jobs share (the text encoders' output for a repeated prompt, the image
position ids), makes the CPU wait for the GPU in small blocking copies, moves whole models around
every phase and decodes the whole latent at once. Each patch here changes one of those on the loaded
pipeline, leaving DiffSynth's own files alone. (Placement, streaming and the modulation table patch
the models too: offload.py, modulation.py.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def ensure_cpu_empty_cache() -> None:
    """DiffSynth calls torch.<device>.empty_cache(); torch.cpu has none in some releases."""
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None


class PromptCache:
    """Text-encoder outputs per prompt: a Re-roll or a repeated prompt skips T5 entirely."""

    def __init__(self, size: int = 16):
        self.size = size
        self.items: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self.hits = 0

    def get(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        return None

    def put(self, key: tuple[Any, ...], value: dict[str, Any]) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def install_prompt_cache(pipe, cache: PromptCache) -> None:
    """Serve the prompt embedder's output from `cache` for a prompt seen before."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder

    class CachedPromptEmbedder(FluxImageUnit_PromptEmbedder):
        def process(self, pipe, prompt, t5_sequence_length, positive):
            key = (prompt, t5_sequence_length)
            hit = cache.get(key)
            if hit is None:
                hit = super().process(pipe, prompt, t5_sequence_length, positive)
                cache.put(key, hit)
            return dict(hit)

    pipe.units = [CachedPromptEmbedder() if isinstance(u, FluxImageUnit_PromptEmbedder) else u for u in pipe.units]


def install_device_guidance(pipe) -> None:
    """DiffSynth builds the guidance tensor on the CPU and copies it over with a blocking copy: the
    CPU waited there for T5 to finish on the GPU, and then the GPU waited while the CPU queued the
    job's first step (its modulation table and embedders, one small operation at a time). Made on
    the device, with the same values (float32, then cast), the CPU queues that work while T5 runs."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_EmbeddedGuidanceEmbedder

    class DeviceGuidance(FluxImageUnit_EmbeddedGuidanceEmbedder):
        def process(self, pipe, embedded_guidance, latents):
            # One value for a whole batch (a grid's images share it): the conditioning stays one row.
            guidance = torch.full((1,), float(embedded_guidance), dtype=torch.float32, device=latents.device)
            return {"guidance": guidance.to(latents.dtype)}

    pipe.units = [DeviceGuidance() if isinstance(u, FluxImageUnit_EmbeddedGuidanceEmbedder) else u for u in pipe.units]


def keep_models_in_place(pipe) -> None:
    """The pipeline would move whole models in and out around every phase; placement is ours."""
    pipe.load_models_to_device = lambda names: None


def cache_image_ids(dit) -> None:
    """DiffSynth builds the image position ids on the CPU and copies them to the GPU at every
    step; that blocking copy made the CPU wait for the GPU each step. They depend on the shape only."""
    prepare = dit.prepare_image_ids
    cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def cached(latents):
        key = (tuple(latents.shape), latents.device, latents.dtype)
        if key not in cache:
            cache.clear()  # one image size at a time is the common case; keep memory flat
            cache[key] = prepare(latents)
        return cache[key]

    dit.prepare_image_ids = cached


class VaeTiles:
    """Whether the VAE works in tiles for the job being painted (`Engine` sets it per job): a budget
    under `budget.TILED_VAE_BELOW_GIB` decodes every image so; an image larger than the model's native
    size (Upscale) is encoded and decoded so at any budget."""

    def __init__(self) -> None:
        self.decode = False
        self.encode = False


def tile_vae(pipe, tiles: VaeTiles) -> None:
    """Decode 512x512-pixel tiles, and encode 512x512-pixel tiles, with overlap instead of the whole
    image at once, when `tiles` says so (`tiling.tiled`: the tiles cover the whole image; DiffSynth's
    own VAE tiler left the last 128 rows and columns of a 1024x1024 image black)."""
    from . import tiling

    decode = pipe.vae_decoder.forward

    def tiled_decode(sample, **kwargs):
        if not tiles.decode:
            return decode(sample, **kwargs)
        size, stride = (tiling.VAE_DECODE_TILE,) * 2, (tiling.VAE_DECODE_STRIDE,) * 2
        return tiling.tiled(lambda t: decode(t), sample, size, stride, scale=tiling.LATENT_SCALE)

    pipe.vae_decoder.forward = tiled_decode
    if pipe.vae_encoder is None:
        return
    encode = pipe.vae_encoder.forward

    def tiled_encode(sample, **kwargs):
        if not tiles.encode:
            return encode(sample, **kwargs)
        size, stride = (tiling.VAE_ENCODE_TILE,) * 2, (tiling.VAE_ENCODE_STRIDE,) * 2
        return tiling.tiled(
            lambda t: encode(t), sample, size, stride, scale=1 / tiling.LATENT_SCALE, align=tiling.LATENT_SCALE
        )

    pipe.vae_encoder.forward = tiled_encode
