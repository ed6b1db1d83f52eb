"""Real float8 matmuls for linear layers whose weights are stored in float8 (Ada, Hopper).

Casting a float8 weight to bf16 before every matmul reads and writes it again; `torch._scaled_mm`
reads it as it is. The activations are quantized to float8 per row; the stored weights are plain
float8 (scale 1). Public so the benchmarks measure the engine's own arithmetic (quality.py,
kernel_micro.py), not a copy of it.
"""

from __future__ import annotations

import functools
import types

import torch
from diffsynth.core.vram.layers import AutoWrappedLinear

FP8 = (torch.float8_e4m3fn,)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
MIN_ROWS = 16  # torch._scaled_mm wants at least this many rows


def quantize_rowwise(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D activation as float8 with one float32 scale per row: (values, scales)."""
    amax = x2.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


# One fused kernel instead of five passes over the activations (they cost more than float8
# saves). Compiled lazily, on first use; inside compiled blocks dynamo inlines it.
_quantize = torch.compile(quantize_rowwise, dynamic=True, fullgraph=True)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, fast_accum: bool = False
) -> torch.Tensor:
    """x @ weight.T + bias with a real float8 matmul when the weight is stored in float8.
    `fast_accum`: the tensor cores' fast float8 accumulation (fewer promotions to fp32)."""
    if weight.dtype not in FP8:
        return torch.nn.functional.linear(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    if rows < MIN_ROWS:
        # One row (the AdaLN modulation: 3 GB of weights a step) still goes through float8: padded,
        # it reads the float8 weight once instead of casting a bf16 copy first (3x the traffic).
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, MIN_ROWS - rows))
    # Row-wise activation scales; the stored weights are plain float8 (scale 1).
    xq, scale_a = _quantize(x2)
    scale_b = torch.ones((1, weight.shape[0]), device=x.device, dtype=torch.float32)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype, use_fast_accum=fast_accum
    )
    if rows < MIN_ROWS:
        out = out[:rows]
    if bias is not None:
        out = out + bias.to(x.dtype)  # row-wise scaling takes no fused bias in some torch releases
    return out.reshape(*shape[:-1], out.shape[-1])


def fp8_compatible(module: AutoWrappedLinear) -> bool:
    """Whether `torch._scaled_mm` takes the layer's shape: both matrix dims divisible by 16."""
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _fast_cast_to(self, weight: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    # Copy in the storage dtype (float8: half of bf16) from pinned memory without blocking,
    # then cast on the GPU. DiffSynth casts on the CPU first and copies twice the bytes.
    if weight.device != torch.device(device):
        weight = weight.to(device, non_blocking=True)
    if self.keep_fp8 and weight.dtype in FP8:
        return weight
    return weight.to(dtype)


def configure_linears(model: torch.nn.Module, *, fp8_matmul: bool, fast_accum: bool = False) -> None:
    """Set up every DiffSynth linear layer of `model`: weights reach the device in their storage
    dtype, and with `fp8_matmul` the layers that fit compute in float8 (`keep_fp8`)."""
    for m in model.modules():
        if isinstance(m, AutoWrappedLinear):
            m.keep_fp8 = fp8_matmul and fp8_compatible(m) and m.preparing_dtype in FP8
            m.cast_to = types.MethodType(_fast_cast_to, m)
            if m.keep_fp8:
                # an instance attribute: called as linear_forward(x, w, b)
                m.linear_forward = functools.partial(fp8_linear, fast_accum=fast_accum)
