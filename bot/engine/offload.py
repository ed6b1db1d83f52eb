"""Where each weight lives during generation, and how streamed weights reach the GPU.

DiffSynth's VRAM layers (`AutoWrappedLinear`, `AutoWrappedModule`) keep a weight either
*onloaded* (host memory, copied in for every forward) or *prepared* (on the GPU). DiffSynth
decides that per forward against free VRAM and moves whole models in and out around every
phase of every image. We decide once, at load time, from the budget: the first part of the
DiT that fits stays on the GPU for good, the rest is streamed. Streamed weights travel as
float8 from pinned memory and are cast on the GPU (half the bytes of bf16, no CPU cast).
"""

from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass, fields

import torch
from diffsynth.core.vram.layers import AutoTorchModule, AutoWrappedLinear, AutoWrappedModule

from .budget import GIB
from .fp8 import FP8
from .loading import file_mapped_ranges, is_file_backed

log = logging.getLogger("fluxbot.engine")

SMALL_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelPlacement:
    """Where one model's weights went, in bytes (as stored: float8 for the DiT)."""

    resident: int  # on the GPU for good
    streamed: int  # copied in at every use: every denoising step, for the DiT
    per_job: int  # copied in once per job (the DiT's modulation layers, under a budget)

    def describe(self) -> str:
        return f"{self.resident / GIB:.2f} GiB resident / {self.streamed / GIB:.2f} GiB streamed per step" + (
            f" / {self.per_job / GIB:.2f} GiB copied per job" if self.per_job else ""
        )


@dataclass(frozen=True)
class Placement:
    """Where each model of the pipeline went (`place` per model)."""

    dit: ModelPlacement
    text_encoder_1: ModelPlacement
    text_encoder_2: ModelPlacement
    vae_decoder: ModelPlacement

    def describe(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name).describe()}" for f in fields(self))


def managed_modules(model: torch.nn.Module) -> list[AutoTorchModule]:
    return [m for m in model.modules() if isinstance(m, AutoTorchModule)]


def _own_tensors(module: AutoTorchModule):
    """Parameters and buffers a VRAM layer moves (the wrapped module's, for AutoWrappedModule)."""
    inner = module.module if isinstance(module, AutoWrappedModule) else module
    yield from inner.parameters(recurse=isinstance(module, AutoWrappedModule))
    yield from inner.buffers(recurse=isinstance(module, AutoWrappedModule))


def nbytes(module: AutoTorchModule, dtype: torch.dtype | None = None) -> int:
    """Bytes of the layer's tensors, counting floating-point ones as `dtype` when given."""
    return sum(
        t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
        for t in _own_tensors(module)
    )


_registered: set[int] = set()


def _unregister(ptr: int) -> None:
    err = torch.cuda.cudart().cudaHostUnregister(ptr)
    if int(err) == 0:
        _registered.discard(ptr)
    else:  # e.g. during a CUDA graph capture; the address stays known as registered, as it still is
        log.warning("could not unregister page-locked host memory (CUDA error %d)", int(err))


def _page_lock(t: torch.Tensor) -> bool:
    """Page-lock the tensor's own memory in place (cudaHostRegister). PyTorch's pinned pool would
    copy it into a block rounded up to a power of two: T5's 84 MB matrices would take 128 MB each.
    The registration ends with the storage: memory freed while registered and handed out again by
    malloc made later copies fail ("CUDA error: invalid argument") once a dropped Engine's weights
    were really freed."""
    storage = t.untyped_storage()
    ptr, size = storage.data_ptr(), storage.nbytes()
    if size == 0 or ptr in _registered:
        return True
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, size, 0)
    if int(err) != 0:  # e.g. part of the range is registered already: the caller pins a copy instead
        return False
    _registered.add(ptr)
    # The storage's Python object lives exactly as long as the storage (PyTorch keeps it).
    weakref.finalize(storage, _unregister, ptr).atexit = False
    return True


def own_copy(t: torch.Tensor) -> torch.Tensor:
    """The tensor in memory of its own, exactly its size (not a view into a larger storage)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def pin(module: AutoTorchModule) -> None:
    mapped = file_mapped_ranges()
    for t in _own_tensors(module):
        if t.device.type == "cpu" and not t.is_pinned():
            if is_file_backed(t, mapped):
                # A view of the memory-mapped model file: page-locking it would lock the whole file.
                t.data = own_copy(t.data)
            if not _page_lock(t):
                t.data = t.data.pin_memory()  # fallback: a pinned copy


def to_device_nonblocking(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor copied to a CUDA device without making the CPU wait for the GPU: from
    page-locked memory, queued behind the GPU's work. (A plain `.to(device)` waits for every kernel
    queued so far.)"""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _run_streamed_linear(layer: AutoWrappedLinear, x: torch.Tensor) -> torch.Tensor:
    tensors = layer._streamer.fetch(layer)
    weight = tensors[0]
    bias = tensors[1] if len(tensors) > 1 else None
    if not (layer.keep_fp8 and weight.dtype in FP8):
        weight = weight.to(layer.computation_dtype)
        bias = None if bias is None else bias.to(layer.computation_dtype)
    return layer.linear_forward(x, weight, bias)


# The custom ops below (and in modulation.py) receive a layer's weight, not the layer: they find
# the layer by its weight's address.
# Weak: a dropped Engine's layers (and the weights they hold on the GPU) must not live on here.
_layer_by_weight: weakref.WeakValueDictionary[int, AutoWrappedLinear] = weakref.WeakValueDictionary()


def register_by_weight(layer: AutoWrappedLinear) -> None:
    """Make `layer_by_weight(layer.weight)` find the layer; call again after the weight moved."""
    old = getattr(layer, "_weight_address", None)
    if old is not None and _layer_by_weight.get(old) is layer:
        del _layer_by_weight[old]
    layer._weight_address = layer.weight.data_ptr()
    _layer_by_weight[layer._weight_address] = layer


def layer_by_weight(weight: torch.Tensor) -> AutoWrappedLinear:
    return _layer_by_weight[weight.data_ptr()]


@torch.library.custom_op("fluxbot::streamed_linear", mutates_args=())
def streamed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A streamed layer's forward as one opaque op: torch.compile fuses everything around it
    in the block and calls it as it is, instead of tracing the streaming code (graph breaks)."""
    return _run_streamed_linear(layer_by_weight(weight), x)


@streamed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _streamed_linear_forward(self, x, *args, **kwargs):
    return streamed_linear(x, self.weight, self.bias)


def _streamed_module_forward(self, *args, **kwargs):
    # Swap the wrapped module's tensors for their device copies for this call only. DiffSynth
    # would deep-copy the whole module on the CPU first (T5's feed-forward blocks: 250 MB each).
    tensors = self._streamer.fetch(self)
    saved = [t.data for t in self._stream_targets]
    try:
        for target, t in zip(self._stream_targets, tensors, strict=True):
            target.data = t.to(self.computation_dtype) if t.is_floating_point() else t
        return self.module(*args, **kwargs)
    finally:
        for target, data in zip(self._stream_targets, saved, strict=True):
            target.data = data


def _stream(m: AutoTorchModule, streamer) -> None:
    m._streamer = streamer
    if isinstance(m, AutoWrappedLinear):
        m._stream_sources = [m.weight] + ([m.bias] if m.bias is not None else [])
        register_by_weight(m)
        m.forward = types.MethodType(_streamed_linear_forward, m)
    else:
        m._stream_targets = list(_own_tensors(m))
        m._stream_sources = [t.data for t in m._stream_targets]
        m.forward = types.MethodType(_streamed_module_forward, m)


def _group(name: str) -> str:
    """The repeated block a layer belongs to ("single_blocks.7", "encoder.block.3"), else the
    layer's own name."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def choose_resident(sizes: list[tuple[str, int, bool]], resident_bytes: int) -> set[str]:
    """Which groups stay on the GPU. `sizes` lists (group, bytes, is_block) in execution order.

    Loose layers (embedders, final layers) come first while they fit. The blocks that fit the rest
    are spread evenly between the streamed ones: while a resident block computes, the copy engine
    fetches the next streamed one, so the transfers hide behind compute. (Resident blocks first and
    streamed ones after would leave the copy engine idle for the first part of every step.)
    """
    keep: set[str] = set()
    left = resident_bytes
    for group, size, is_block in sizes:
        if not is_block and size <= left:
            keep.add(group)
            left -= size
    blocks = [(g, size) for g, size, is_block in sizes if is_block]
    total = sum(size for _, size in blocks)
    share = min(1.0, left / total) if total else 0.0
    seen = kept = 0
    for group, size in blocks:
        seen += size
        target = share * seen
        # Keep the block when that brings the resident bytes closer to their even share.
        if kept + size <= left and abs(kept + size - target) <= abs(kept - target):
            keep.add(group)
            kept += size
    return keep


def place(
    model: torch.nn.Module,
    resident_bytes: int | None,
    streamer=None,
    *,
    pinned: bool = False,
    per_job: frozenset[int] = frozenset(),
) -> ModelPlacement:
    """Keep about `resident_bytes` of the model's layers on the GPU for good, in whole blocks spread
    through the model; stream the rest through `streamer` (from pinned host memory when `pinned`).
    `None` keeps everything resident. Layers in `per_job` (module ids) run once per job: under a
    budget they stay in host memory and are copied in when called, taking no resident space.
    Returns the bytes kept resident, streamed at every use and copied once per job.
    """
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, AutoTorchModule):
            continue
        size = nbytes(m, m.preparing_dtype if isinstance(m.preparing_dtype, torch.dtype) else None)
        small = isinstance(m, AutoWrappedModule) and size < SMALL_BYTES  # a norm: not worth a copy
        if small and isinstance(m.computation_dtype, torch.dtype):
            # Keep norms in the compute dtype: no per-call module copy, and nothing lost to float8.
            m.offload_dtype = m.onload_dtype = m.preparing_dtype = m.computation_dtype
            size = nbytes(m, m.computation_dtype)
        layers.append((_group(name), m, size, small))
    always = sum(size for _, _, size, small in layers if small)
    limited = resident_bytes is not None and streamer is not None
    if resident_bytes is None or streamer is None:
        keep = {group for group, *_ in layers}
    else:
        groups: dict[str, int] = {}
        for group, m, size, small in layers:
            groups[group] = groups.get(group, 0) + (0 if small or id(m) in per_job else size)
        sizes = [(g, size, g.rsplit(".", 1)[-1].isdigit()) for g, size in groups.items()]
        keep = choose_resident(sizes, max(0, resident_bytes - always))
    resident = streamed = once = 0
    for group, m, size, small in layers:
        m.onload()
        if limited and id(m) in per_job and not small:
            m.vram_limit = 0  # never "prepare": DiffSynth's forward copies the weight in per call
            if pinned:
                pin(m)
            once += size
        elif small or group in keep:
            m.preparing()
            m.vram_limit = None
            resident += size
        else:
            m.vram_limit = 0  # never "prepare"
            if pinned:
                pin(m)
            _stream(m, streamer)
            streamed += size
    return ModelPlacement(resident=resident, streamed=streamed, per_job=once)


def release(model: torch.nn.Module) -> None:
    """Move every layer back to host memory (used when keep_resident is off)."""
    for m in managed_modules(model):
        m.offload()
