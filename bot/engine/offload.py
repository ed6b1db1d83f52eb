"""Where each weight lives during generation, and how streamed weights reach the GPU.

DiffSynth's VRAM layers (`AutoWrappedLinear`, `AutoWrappedModule`) keep a weight either
*onloaded* (host memory, copied in for every forward) or *prepared* (on the GPU). DiffSynth
decides that per forward against free VRAM and moves whole models in and out around every
phase of every image. We decide once, at load time, from the budget: the first part of the
DiT that fits stays on the GPU for good, the rest is streamed. Streamed weights travel as
float8 from pinned memory and are cast on the GPU (half the bytes of bf16, no CPU cast).
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from diffsynth.core.vram.layers import AutoTorchModule, AutoWrappedLinear, AutoWrappedModule

log = logging.getLogger("fluxbot.engine")

FP8 = (torch.float8_e4m3fn,)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
SMALL_BYTES = 1 << 20


def managed_modules(model: torch.nn.Module) -> list[AutoTorchModule]:
    return [m for m in model.modules() if isinstance(m, AutoTorchModule)]


def _own_tensors(module: AutoTorchModule):
    """Parameters and buffers a VRAM layer moves (the wrapped module's, for AutoWrappedModule)."""
    inner = module.module if isinstance(module, AutoWrappedModule) else module
    yield from inner.parameters(recurse=isinstance(module, AutoWrappedModule))
    yield from inner.buffers(recurse=isinstance(module, AutoWrappedModule))


def nbytes(module: AutoTorchModule, dtype: torch.dtype | None = None) -> int:
    """Bytes of the layer's tensors, counting floating-point ones as `dtype` when given."""
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in _own_tensors(module))


_registered: set[int] = set()


def _page_lock(t: torch.Tensor) -> bool:
    """Page-lock the tensor's own memory in place (cudaHostRegister). PyTorch's pinned pool would
    copy it into a block rounded up to a power of two: T5's 84 MB matrices would take 128 MB each."""
    storage = t.untyped_storage()
    ptr, size = storage.data_ptr(), storage.nbytes()
    if size == 0 or ptr in _registered:
        return True
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, size, 0)
    if int(err) != 0:  # e.g. part of the range is registered already: the caller pins a copy instead
        return False
    _registered.add(ptr)
    return True


def pin(module: AutoTorchModule) -> None:
    for t in _own_tensors(module):
        if t.device.type == "cpu" and not t.is_pinned():
            if not _page_lock(t):
                t.data = t.data.pin_memory()  # fallback: a pinned copy


def _fast_cast_to(self, weight: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    # Copy in the storage dtype (float8: half of bf16) from pinned memory without blocking,
    # then cast on the GPU. DiffSynth casts on the CPU first and copies twice the bytes.
    if weight.device != torch.device(device):
        weight = weight.to(device, non_blocking=True)
    if self.keep_fp8 and weight.dtype in FP8:
        return weight
    return weight.to(dtype)


def _quantize_rowwise(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x2.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


@functools.cache
def _quantizer():
    """One fused kernel instead of five passes over the activations (they cost more than fp8 saves)."""
    try:
        return torch.compile(_quantize_rowwise, dynamic=True, fullgraph=True)
    except Exception:  # no compiler backend: correct, just slower
        log.warning("torch.compile unavailable: float8 activation quantization runs unfused")
        return _quantize_rowwise


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with a real float8 matmul when the weight is stored in float8."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if weight.dtype not in FP8 or x2.shape[0] < 16:
        # Tiny inputs (the timestep/guidance embedders) gain nothing from float8.
        w = weight if weight.dtype not in FP8 else weight.to(x.dtype)
        b = bias if bias is None or bias.dtype not in FP8 else bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, b)
    # Row-wise activation scales; the stored weights are plain float8 (scale 1).
    xq, scale_a = _quantizer()(x2)
    scale_b = torch.ones((1, weight.shape[0]), device=x.device, dtype=torch.float32)
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)  # row-wise scaling takes no fused bias in some torch releases
    return out.reshape(*shape[:-1], out.shape[-1])


def _fp8_ok(module: AutoWrappedLinear) -> bool:
    # _scaled_mm wants both matrix dims divisible by 16.
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def configure_linears(model: torch.nn.Module, *, fp8_matmul: bool) -> None:
    for m in managed_modules(model):
        if isinstance(m, AutoWrappedLinear):
            m.keep_fp8 = fp8_matmul and _fp8_ok(m) and m.preparing_dtype in FP8
            m.cast_to = types.MethodType(_fast_cast_to, m)
            if m.keep_fp8:
                m.linear_forward = fp8_linear  # an instance attribute: called as linear_forward(x, w, b)


def _streamed_linear_forward(self, x, *args, **kwargs):
    tensors = self._streamer.fetch(self)
    weight = tensors[0]
    bias = tensors[1] if len(tensors) > 1 else None
    if not (self.keep_fp8 and weight.dtype in FP8):
        weight = weight.to(self.computation_dtype)
        bias = None if bias is None else bias.to(self.computation_dtype)
    return self.linear_forward(x, weight, bias)


def _streamed_module_forward(self, *args, **kwargs):
    # Swap the wrapped module's tensors for their device copies for this call only. DiffSynth
    # would deep-copy the whole module on the CPU first (T5's feed-forward blocks: 250 MB each).
    tensors = self._streamer.fetch(self)
    saved = [t.data for t in self._stream_targets]
    try:
        for target, t in zip(self._stream_targets, tensors):
            target.data = t.to(self.computation_dtype) if t.is_floating_point() else t
        return self.module(*args, **kwargs)
    finally:
        for target, data in zip(self._stream_targets, saved):
            target.data = data


def _stream(m: AutoTorchModule, streamer) -> None:
    m._streamer = streamer
    if isinstance(m, AutoWrappedLinear):
        m._stream_sources = [m.weight] + ([m.bias] if m.bias is not None else [])
        m.forward = types.MethodType(_streamed_linear_forward, m)
    else:
        m._stream_targets = list(_own_tensors(m))
        m._stream_sources = [t.data for t in m._stream_targets]
        m.forward = types.MethodType(_streamed_module_forward, m)


def place(model: torch.nn.Module, resident_bytes: int | None, streamer=None, *,
          pinned: bool = False) -> tuple[int, int]:
    """Put the first `resident_bytes` of the model's layers on the GPU for good; stream the rest
    through `streamer` (from pinned host memory when `pinned`). `None` keeps everything resident.
    Returns (resident bytes, streamed bytes).
    """
    resident = streamed = 0
    for m in managed_modules(model):
        size = nbytes(m, m.preparing_dtype if isinstance(m.preparing_dtype, torch.dtype) else None)
        small = isinstance(m, AutoWrappedModule) and size < SMALL_BYTES  # a norm: not worth a copy
        if small and isinstance(m.computation_dtype, torch.dtype):
            # Keep norms in the compute dtype: no per-call module copy, and nothing lost to float8.
            m.offload_dtype = m.onload_dtype = m.preparing_dtype = m.computation_dtype
            size = nbytes(m, m.computation_dtype)
        m.onload()
        if resident_bytes is None or resident + size <= resident_bytes or streamer is None or small:
            m.preparing()
            m.vram_limit = None
            resident += size
        else:
            m.vram_limit = 0  # never "prepare"
            if pinned:
                pin(m)
            _stream(m, streamer)
            streamed += size
    return resident, streamed


def release(model: torch.nn.Module) -> None:
    """Move every layer back to host memory (used when keep_resident is off)."""
    for m in managed_modules(model):
        m.offload()
