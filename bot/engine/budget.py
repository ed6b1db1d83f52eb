"""Turn the configured VRAM budget into a concrete plan for this machine, and hold PyTorch's
allocator to it (the plan's cap is only kept if the allocator cannot reserve past it)."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fluxbot.engine")

GIB = 1024**3

# What a card of N GB needs beside resident DiT weights at 1024x1024 (docs/benchmarks.md):
# ~1 GiB the card itself keeps (nvidia-smi shows ~7 GiB usable on an 8 GB card), the CUDA
# context (0.7 GiB), and at most ~1.2 GiB measured for one denoising step's activations,
# streamed layers in flight (two windows), the VAE weights, the tiled VAE decode and T5 streaming;
# the rest is allocator slack.
HEADROOM_GIB = 3.25
# Of a budget of N GiB, what PyTorch's allocator may reserve: less the ~1 GiB the card keeps and the
# CUDA context (measured 0.68 GiB on an H100, torch 2.11 + CUDA 13). Its cached blocks otherwise
# grow until the card is full, and at an emulated card's cap they overshot it by 11 MB
# (docs/benchmarks.md, 8 GB). With the cap, allocations past it first free cached blocks.
CARD_KEEPS_GIB = 1.0
CONTEXT_GIB = 0.75
# What a step needs with nothing of the DiT resident (activations, streamed layers in flight, the
# tiled VAE, T5's stream window): the cap never goes below it, so a budget under ~3.25 GiB is not
# kept but still runs.
MIN_ALLOCATOR_CAP_GIB = 1.5
# Below this budget the VAE decodes in tiles (about a quarter of the activation memory).
TILED_VAE_BELOW_GIB = 16.0
# Below this budget the text encoders are streamed layer by layer instead of resident.
TEXT_ENCODERS_RESIDENT_FROM_GIB = 30.0
# Upscale (a tiled img2img pass, bot/engine/tiling.py): each tile's activations are a plain job's, so
# what it needs beyond one is the whole image held on the GPU a few times over while it is encoded and
# decoded: the source's pixels (compute dtype, and a scaled copy), the decoder's float32 blend and its
# weights, the decoded image and its conversion to 8 bits; latents are 1/64 of that. Counted
# generously per output pixel, it must fit what HEADROOM_GIB leaves unused by a 1024x1024 step (3.25
# - 1.0 for the card - 0.75 context - 1.2 step measured: 0.3 GiB; 0.25 counted). Not measured yet:
# benchmarks/derive_bench.py records Upscale's peak at a budget.
UPSCALE_BYTES_PER_PIXEL = 40
UPSCALE_SPARE_GIB = 0.25


@dataclass(frozen=True)
class Plan:
    device: torch.device
    compute_dtype: torch.dtype
    budget_gib: float | None  # whole-process GPU memory we aim to stay under (None: no limit)
    dit_resident_gib: float | None  # how much of the DiT may sit on the GPU (None: all of it)
    text_encoders_resident: bool
    keep_resident: bool  # keep weights on the GPU between jobs
    fp8_matmul: bool  # real float8 matmuls (Ada/Hopper) instead of cast-to-bf16
    pinned: bool  # stream offloaded weights from pinned host memory
    tiled_vae: bool = False  # decode in overlapping tiles to bound activation memory
    compile: str = "off"  # compile the DiT blocks ("auto": on a GPU)
    fast_accum: bool = False  # float8 matmuls accumulate the fast way (Hopper/Ada)
    cuda_graphs: bool = False  # replay denoising steps as a CUDA graph (DiT all resident)
    allocator_cap_gib: float | None = None  # the most PyTorch's allocator may reserve (None: the card)
    fused_attention: bool = False  # q/k norm, RoPE and SDPA's layout in one Triton kernel
    # A streamed T5 held in page-locked RAM of its own (fast) or read from the model file's pages in
    # the page cache, which the kernel may reclaim (a 16 GB-RAM PC); `hostmem.settle` decides "auto".
    t5_in_ram: bool = True

    def describe(self) -> str:
        budget = "unlimited" if self.budget_gib is None else f"{self.budget_gib:g} GiB"
        return (
            f"device={self.device} dtype={str(self.compute_dtype).replace('torch.', '')} budget={budget} "
            f"dit_resident={'all' if self.dit_resident_gib is None else f'{self.dit_resident_gib:.1f} GiB'} "
            f"text_encoders_resident={self.text_encoders_resident} keep_resident={self.keep_resident} "
            f"fp8_matmul={self.fp8_matmul} fast_accum={self.fast_accum} pinned={self.pinned} tiled_vae={self.tiled_vae} compile={self.compile} "
            f"cuda_graphs={self.cuda_graphs} fused_attention={self.fused_attention} t5_in_ram={self.t5_in_ram} "
            f"allocator_cap={'none' if self.allocator_cap_gib is None else f'{self.allocator_cap_gib:.2f} GiB'}"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.warning("no CUDA GPU found: running on the CPU (very slow for the real model; fine for tiny-random)")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"[model] device = {device!r} but no CUDA GPU is available to torch {torch.__version__}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def fp8_matmul_supported(device: torch.device) -> bool:
    """torch._scaled_mm needs compute capability 8.9 (Ada) or 9.x (Hopper) and newer."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def kernel_build_missing() -> list[str]:
    """What this machine lacks for Triton to build GPU kernels, which torch.compile, the float8
    activation quantizer and the attention kernel all need: a C compiler, found as Triton finds
    one ($CC, gcc, clang), and Python's C headers (Triton builds a small extension module)."""
    missing = []
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler (gcc or clang)")
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as Triton reads it (Debian)
    if not (Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h").exists():
        missing.append("Python's C headers (Python.h)")
    return missing


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def make_plan(model_settings, device: torch.device | None = None) -> Plan:
    """`model_settings` is a `bot.config.ModelSettings`."""
    device = device or resolve_device(model_settings.device)
    if device.type != "cuda":
        # CPU: bf16 convolutions are ~150x slower than fp32 here; weights stay float8 in storage.
        return Plan(
            device,
            torch.float32,
            None,
            None,
            True,
            keep_resident=_switch(model_settings.keep_resident, True),
            fp8_matmul=False,
            pinned=False,
            tiled_vae=False,
            compile=model_settings.compile,
            fused_attention=_switch(model_settings.fused_attention, False),
        )

    total_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    missing = kernel_build_missing()
    if missing:
        # Without them the first compiled call would fail mid-job; run the plain kernels instead.
        log.warning(
            "GPU kernels cannot be built here: %s missing (Debian/Ubuntu: apt install gcc python3-dev). "
            "Running without torch.compile, float8 matmuls and the attention kernel, so each step is "
            "slower (torch.compile alone halved it on an H100)",
            " and ".join(missing),
        )
    budget = model_settings.vram_limit_gb
    budget = total_gib if budget is None else min(float(budget), total_gib)
    unlimited = model_settings.vram_limit_gb is None and total_gib >= 40
    fp8_ok = fp8_matmul_supported(device)
    fp8 = _switch(model_settings.fp8_matmul, fp8_ok)
    if fp8 and not fp8_ok:
        log.warning('[model] fp8_matmul = "on" but this GPU lacks float8 matmuls (needs Ada or Hopper): using bf16')
        fp8 = False
    fp8 = fp8 and not missing  # its activation quantizer is a compiled kernel
    return Plan(
        device=device,
        compute_dtype=torch.bfloat16,
        budget_gib=None if unlimited else budget,
        dit_resident_gib=None if unlimited else max(0.0, budget - HEADROOM_GIB),
        text_encoders_resident=unlimited or budget >= TEXT_ENCODERS_RESIDENT_FROM_GIB,
        keep_resident=_switch(model_settings.keep_resident, True),
        fp8_matmul=fp8,
        pinned=True,
        tiled_vae=not unlimited and budget < TILED_VAE_BELOW_GIB,
        compile="off" if missing else model_settings.compile,
        # Measured: 8% faster per step, error vs bf16 unchanged (docs/benchmarks.md, quality).
        fast_accum=fp8 and _switch(model_settings.fast_accum, True),
        # A graph needs the whole DiT on the GPU for good; under any budget the modulation weights are
        # copied in per job, so "auto" means unlimited.
        cuda_graphs=_switch(model_settings.cuda_graphs, unlimited),
        allocator_cap_gib=None
        if unlimited or budget >= total_gib
        else max(MIN_ALLOCATOR_CAP_GIB, budget - CARD_KEEPS_GIB - CONTEXT_GIB),
        fused_attention=not missing and _fused_attention(model_settings.fused_attention, device),
    )


def upscale_fits(plan: Plan, width: int, height: int) -> bool:
    """Whether an Upscale to width x height keeps within the plan's budget (always, without one)."""
    if plan.budget_gib is None:  # unlimited, or the CPU
        return True
    return width * height * UPSCALE_BYTES_PER_PIXEL <= UPSCALE_SPARE_GIB * GIB


def _fused_attention(value: str, device: torch.device) -> bool:
    from . import attention

    available = attention.kernel_available(device)
    if value == "on" and not available:
        log.warning(
            '[model] fused_attention = "on" but it needs Triton and an Ampere or newer card: '
            "DiffSynth's attention code runs"
        )
    return _switch(value, available) and available


def use_expandable_segments(plan: Plan) -> None:
    """Grow allocator segments in place instead of caching fixed blocks: under a budget the reserved
    memory stays near what is really allocated (measured: 6.13 of 6.33 GiB). A
    PYTORCH_CUDA_ALLOC_CONF set by the user is left as it is."""
    if plan.device.type == "cuda" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.10
        (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")


# Per CUDA device: (the allocator fraction someone else set, the one the last Engine.load set).
_allocator_fractions: dict[int, tuple[float, float]] = {}


def cap_allocator(plan: Plan) -> Callable[[], None]:
    """Cap PyTorch's allocator at the plan's `allocator_cap_gib`, never above a cap someone else set
    (a benchmark emulating a smaller card); a plan without a cap undoes an earlier Engine's. Returns
    what puts the previous fraction back (for a load that fails)."""
    if plan.device.type != "cuda":
        return lambda: None
    device = plan.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    current = get(device) if get is not None else 1.0
    outside, ours = _allocator_fractions.get(index, (1.0, None))
    if current != ours:
        outside = current  # not ours: set by someone else, or nothing set yet
    want = outside
    if plan.allocator_cap_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        want = min(outside, plan.allocator_cap_gib * GIB / total)
    if want != current:
        torch.cuda.set_per_process_memory_fraction(want, device)
        if get is not None:
            # PyTorch keeps the fraction as a byte count and gives back bytes / total, not what was
            # set: remember what it reads back, or the next load takes our cap for someone else's.
            want = get(device)
    previous = _allocator_fractions.get(index)
    _allocator_fractions[index] = (outside, want)

    def restore() -> None:
        if want != current:
            torch.cuda.set_per_process_memory_fraction(current, device)
        if previous is None:
            _allocator_fractions.pop(index, None)
        else:
            _allocator_fractions[index] = previous

    return restore
