"""Find the model files and load them through DiffSynth's own loader.

DiffSynth detects each file's model type by its key/shape hash, so the real files, the tiny random
ones (registered with it first) and the full-size random benchmark models all load the same way.
The per-model VRAM configs only say where weights are stored and computed; where they live during
generation is decided afterwards, by `offload.place`.

Weights are not read into host memory at load. DiffSynth's `DiskMap` copies every tensor out of the
file (`clone`), so all four models sat in anonymous memory at once (21.3 GiB measured) before
placement moved them; `MappedDiskMap` hands out the safetensors file's memory-mapped tensors as
they are. Placement then copies each layer straight to where it lives (the GPU, or page-locked host
memory for streamed layers), and a model streamed from the file (T5 with `t5_in_ram` off) is read
from the page cache, which the kernel may reclaim.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffsynth.core.loader import model as diffsynth_loader
from diffsynth.core.vram.disk_map import DiskMap

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


class MappedDiskMap(DiskMap):
    """DiffSynth's lazy state dict, without the copy: a tensor whose file dtype is the one asked
    for stays a view of the memory-mapped file (file-backed pages); only a cast makes a copy."""

    def __getitem__(self, name):
        if self.rename_dict is not None:
            name = self.rename_dict[name]
        param = self.files[self.name_map[name]].get_tensor(name)
        if self.torch_dtype is not None and isinstance(param, torch.Tensor) and param.is_floating_point():
            param = param.to(self.torch_dtype)  # a no-op when the file holds this dtype already
        return param


@contextlib.contextmanager
def mapped_loading() -> Iterator[None]:
    """Make DiffSynth's model loader use `MappedDiskMap` (it names `DiskMap` in its own module)."""
    original = diffsynth_loader.DiskMap
    diffsynth_loader.DiskMap = MappedDiskMap
    try:
        yield
    finally:
        diffsynth_loader.DiskMap = original


def file_mapped_ranges(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """The address ranges this process has mapped from regular files (a safetensors file opened by
    the loader is one), sorted; empty where /proc is not there to read."""
    ranges = []
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
            continue  # anonymous memory, the heap, the stack, device memory (CUDA's /dev/nvidia*)
        start, end = fields[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def is_file_backed(t: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> bool:
    """Whether the tensor's memory is a file's mapped pages, such as a view of a memory-mapped
    safetensors file (safetensors hands those out with a storage of the tensor's own size, so the
    storage cannot tell). `ranges` from `file_mapped_ranges`, read once for many tensors."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    if ranges is None:
        ranges = file_mapped_ranges()
    address = t.data_ptr()
    index = bisect.bisect_right(ranges, (address, 1 << 64))  # the last range starting at or before it
    return index > 0 and ranges[index - 1][0] <= address < ranges[index - 1][1]


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
    with contextlib.redirect_stdout(chatter), mapped_loading():
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
