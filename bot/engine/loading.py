"""Find the model files and load them through DiffSynth's own loader.

DiffSynth detects each file's model type by its key/shape hash, so the real files, the tiny random
ones (registered with it first) and the full-size random benchmark models all load the same way.
The per-model VRAM configs only say where weights are stored and computed; where they live during
generation is decided afterwards, by `offload.place`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import weights
from .budget import Plan
from .patches import ensure_cpu_empty_cache

log = logging.getLogger("fluxbot.engine")

MODELS = ("dit", "text_encoder_1", "text_encoder_2", "vae_decoder")  # the pipeline parts we place


def model_root(model_settings, config_hint: str = "") -> Path:
    """The preset's weight folder (`model_settings` is a `bot.config.ModelSettings`); raises
    MissingWeightsError naming every absent file. The tiny random model is written on first use
    and taught to DiffSynth's loader."""
    preset = model_settings.preset
    root = weights.require(preset, model_settings.dir, config_hint)
    if preset == "tiny-random":
        from . import tiny

        tiny.write_tiny_model(root)
        tiny.register_with_diffsynth(root)
    return root


def vram_config(dtype_store, dtype_compute, device, *, stream: bool) -> dict[str, Any]:
    """A DiffSynth per-model VRAM config: stored as `dtype_store` on the CPU, computed in `dtype_compute`."""
    return dict(
        offload_dtype=dtype_store,
        offload_device="cpu",
        onload_dtype=dtype_store,
        onload_device="cpu",
        preparing_dtype=dtype_store,
        preparing_device=str(device) if stream else "cpu",
        computation_dtype=dtype_compute,
        computation_device=str(device),
    )


def build_pipeline(files: weights.ModelFiles, plan: Plan, *, t5_fp8: bool = False):
    """Load the four models through DiffSynth's own loader (model type found by key/shape hash)."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    ensure_cpu_empty_cache()
    os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    dev, cdt = plan.device, plan.compute_dtype
    on_gpu = dev.type == "cuda"
    fp8 = torch.float8_e4m3fn
    text_store = fp8 if t5_fp8 else (torch.bfloat16 if on_gpu else cdt)
    enc_store = torch.bfloat16 if on_gpu else cdt
    configs = [
        ModelConfig(path=str(files.dit), **vram_config(fp8, cdt, dev, stream=on_gpu)),
        ModelConfig(path=str(files.clip), **vram_config(enc_store, cdt, dev, stream=on_gpu)),
        ModelConfig(path=[str(p) for p in files.t5], **vram_config(text_store, cdt, dev, stream=on_gpu)),
        ModelConfig(path=str(files.vae), **vram_config(enc_store, cdt, dev, stream=on_gpu)),
    ]
    chatter = io.StringIO()  # DiffSynth prints its loading steps; keep them out of our output
    with contextlib.redirect_stdout(chatter):
        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=cdt,
            device=str(dev),
            model_configs=configs,
            tokenizer_1_config=ModelConfig(path=str(files.tokenizer)),
            tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
        )
    log.debug("diffsynth: %s", chatter.getvalue())
    for name in MODELS:
        if getattr(pipe, name) is None:
            raise RuntimeError(f"DiffSynth did not recognise the {name} file (unknown key layout)")
    return pipe
