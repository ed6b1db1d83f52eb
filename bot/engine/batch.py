"""A grid's images painted in one denoising loop: latents of batch `count`, one set of weights per step.

A job with `count` > 1 starts from one noise per image (image i from its own seed, `params.image_seed`)
stacked into one batch of latents, and the pipeline runs one loop of steps over the batch. Inside a
step the DiT runs image by image within each block (`per_image_dit`): a block's weights are fetched
once and held while every image passes through it (`Streamer.holding`), so under a VRAM budget the
streamed weights cross PCIe once per step for the whole grid, not once per image, while the
activations on the GPU stay those of one image (a true batch of four would need about four times a
step's activation memory, which an 8 GB card does not have). Each block call is the single image's
call, so the blocks compiled for one image serve the grid with no new compile. The text encoders run
once, the VAE decodes image by image.

Image i of a grid is the image a single job with image i's seed paints: the same noise, the same
block calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .graphs import FEATURES
from .streaming import Streamer

# model_fn_flux_image's inputs that switch on a feature `per_image_dit` does not have: the step
# graph's list, and those that add tokens or conditions. A batch with any of them set is refused
# (the bot never sets them; a caller of the engine must paint one image).
UNSUPPORTED = (
    *FEATURES,
    "fill_condition",
    "kontext_latents",
    "entity_prompt_emb",
    "flex_condition",
    "step1x_llm_embedding",
    "step1x_reference_latents",
    "id_emb",
)


class BatchSeeds:
    """The seeds of the batch being painted (`Engine` sets them per job); None: one image."""

    def __init__(self) -> None:
        self.seeds: tuple[int, ...] | None = None


def install_noise(pipe: Any, batch: BatchSeeds) -> None:
    """Make a batch's starting noise: each image's from its own seed, as DiffSynth makes one."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_NoiseInitializer

    class BatchNoise(FluxImageUnit_NoiseInitializer):
        def process(self, pipe, height, width, seed, rand_device):
            if batch.seeds is None:
                return super().process(pipe, height, width, seed, rand_device)
            shape = (1, 16, height // 8, width // 8)
            return {
                "noise": torch.cat([pipe.generate_noise(shape, seed=s, rand_device=rand_device) for s in batch.seeds])
            }

    pipe.units = [BatchNoise() if isinstance(u, FluxImageUnit_NoiseInitializer) else u for u in pipe.units]


def install_model_fn(pipe: Any, streamer: Streamer) -> None:
    """Wrap the pipeline's model function (innermost: the step graph and the tiler wrap this): a
    batch of latents goes through `per_image_dit`, one image through DiffSynth's own function."""
    model_fn = pipe.model_fn

    def model_fn_for_batches(**kwargs):
        latents = kwargs.get("latents")
        if latents is None or latents.shape[0] == 1:
            return model_fn(**kwargs)
        used = [name for name in UNSUPPORTED if kwargs.get(name)]
        if used:
            raise ValueError(f"a batch paints plain text-to-image only; set here: {', '.join(used)}")
        return per_image_dit(
            kwargs["dit"],
            latents,
            timestep=kwargs["timestep"],
            prompt_emb=kwargs["prompt_emb"],
            pooled_prompt_emb=kwargs["pooled_prompt_emb"],
            guidance=kwargs.get("guidance"),
            text_ids=kwargs["text_ids"],
            streamer=streamer,
        )

    pipe.model_fn = model_fn_for_batches


def install_decode(pipe: Any) -> None:
    """Decode a batch image by image (the VAE's activations stay one image's) and turn it into one
    PIL image per latent: DiffSynth's conversion averages over the batch."""
    decode = pipe.vae_decoder.forward

    def decode_each(sample, **kwargs):
        if sample.shape[0] == 1:
            return decode(sample, **kwargs)
        return torch.cat([decode(sample[i : i + 1], **kwargs) for i in range(sample.shape[0])])

    pipe.vae_decoder.forward = decode_each
    to_image = pipe.vae_output_to_image

    def to_images(vae_output, *args, **kwargs):
        if vae_output.shape[0] == 1:
            return to_image(vae_output, *args, **kwargs)
        return [to_image(vae_output[i : i + 1], *args, **kwargs) for i in range(vae_output.shape[0])]

    pipe.vae_output_to_image = to_images


def per_image_dit(
    dit: Any,
    latents: torch.Tensor,
    *,
    timestep: torch.Tensor,
    prompt_emb: torch.Tensor,
    pooled_prompt_emb: torch.Tensor,
    guidance: torch.Tensor | None,
    text_ids: torch.Tensor,
    streamer: Streamer,
) -> torch.Tensor:
    """`model_fn_flux_image`'s plain text-to-image path for a batch of latents that share one prompt,
    timestep and guidance: the conditioning, positions and text embedding made once, then each
    block run for each image in turn while its (streamed) weights are held."""
    count = latents.shape[0]
    dtype = latents.dtype
    conditioning = dit.time_embedder(timestep, dtype) + dit.pooled_text_embedder(pooled_prompt_emb)
    if dit.guidance_embedder is not None and guidance is not None:
        conditioning = conditioning + dit.guidance_embedder(guidance * 1000, dtype)
    height, width = latents.shape[-2:]
    image_ids = dit.prepare_image_ids(latents[:1])  # the same positions for every image
    rotary = dit.pos_embedder(torch.cat((text_ids, image_ids), dim=1))
    text = dit.context_embedder(prompt_emb)
    images = [dit.x_embedder(dit.patchify(latents[i : i + 1])) for i in range(count)]
    texts = [text] * count  # each image's text tokens diverge from the first block on
    for block in dit.blocks:
        with streamer.holding():
            for i in range(count):
                images[i], texts[i] = block(images[i], texts[i], conditioning, rotary, None, ipadapter_kwargs_list=None)
    joint = [torch.cat([texts[i], images[i]], dim=1) for i in range(count)]
    for block in dit.single_blocks:
        with streamer.holding():
            for i in range(count):
                joint[i], texts[i] = block(joint[i], texts[i], conditioning, rotary, None, ipadapter_kwargs_list=None)
    out = []
    for i in range(count):
        hidden = joint[i][:, text.shape[1] :]
        hidden = dit.final_proj_out(dit.final_norm_out(hidden, conditioning))
        out.append(dit.unpatchify(hidden, height, width))
    return torch.cat(out)


def iter_images(image: Any) -> Iterator[Any]:
    """The pipeline's output as images: a list for a batch, one image otherwise."""
    yield from image if isinstance(image, list) else [image]
