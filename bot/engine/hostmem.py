"""Host memory: what the plan keeps there, what the machine has, and where a streamed T5 lives.

Counted is memory the kernel cannot take back: anonymous and page-locked pages (`RssAnon` +
`RssShmem`). Weights read from the model files' memory-mapped pages are page cache: under pressure
the kernel drops them and reads them again from disk (`loading.MappedDiskMap`). What lives where
follows `offload.place`: layers resident on the GPU keep no host copy; streamed layers are copied
into page-locked memory of their own, except a T5 with `t5_in_ram` off, which streams from the file.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .budget import GIB, Plan
from .weights import ModelFiles

log = logging.getLogger("fluxbot.engine")

# Torch, CUDA's host side, DiffSynth, the tokenizers and the prompt cache: 1.37 GiB anonymous after
# an unlimited load, ~1.5 while painting (H200, 2026-12-03, docs/benchmarks.md).
RUNTIME_GIB = 1.5
# Left for the rest of the machine when "auto" decides whether T5 may take RAM of its own.
SPARE_GIB = 1.0

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_INT_ITEMSIZE = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_NAMES = {"float8_e4m3fn": "F8_E4M3", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class HostMemoryShort(RuntimeError):
    """The plan needs more host memory than the machine has available (one line, with what helps)."""


@dataclass(frozen=True)
class FileTensors:
    """What a model's safetensors files hold, from their headers (no tensor is read)."""

    float_numel: int  # elements of floating-point tensors (cast to the storage dtype at load)
    other_bytes: int  # integer tensors, kept as they are
    float_dtypes: frozenset[str]  # the files' floating dtypes, safetensors' names ("BF16")

    def stored_bytes(self, dtype_name: str) -> int:
        return self.float_numel * _ITEMSIZE[dtype_name] + self.other_bytes

    def maps_as(self, dtype_name: str) -> bool:
        """Whether loading keeps these tensors as views of the file (no cast to another dtype)."""
        return self.float_dtypes <= {dtype_name}


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def file_tensors(paths: Iterable[Path], prefix: str = "") -> FileTensors:
    float_numel = other = 0
    dtypes: set[str] = set()
    for path in paths:
        for name, info in read_header(path).items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            numel = 1
            for side in info["shape"]:
                numel *= side
            if info["dtype"] in _ITEMSIZE:
                float_numel += numel
                dtypes.add(info["dtype"])
            else:
                other += numel * _INT_ITEMSIZE.get(info["dtype"], 8)
    return FileTensors(float_numel, other, frozenset(dtypes))


@dataclass(frozen=True)
class ModelSizes:
    dit: FileTensors
    clip: FileTensors
    t5: FileTensors
    vae_encoder: FileTensors

    @classmethod
    def from_files(cls, files: ModelFiles) -> ModelSizes:
        return cls(
            dit=file_tensors([files.dit]),
            clip=file_tensors([files.clip]),
            t5=file_tensors(files.t5),
            vae_encoder=file_tensors([files.vae], prefix="encoder."),  # BFL's ae layout
        )


@dataclass(frozen=True)
class HostMemoryPlan:
    kept: tuple[tuple[str, int], ...]  # anonymous or page-locked: what the process needs
    mapped: tuple[tuple[str, int], ...]  # read from the model files' pages (page cache)
    t5_in_ram: bool

    @property
    def needed(self) -> int:
        return sum(size for _, size in self.kept)

    def describe(self) -> str:
        def parts(items: tuple[tuple[str, int], ...]) -> str:
            return ", ".join(f"{what} {size / GIB:.1f}" for what, size in items)

        text = f"about {self.needed / GIB:.1f} GiB of host memory ({parts(self.kept)})"
        if self.mapped:
            text += f"; read from the model files, reclaimable: {parts(self.mapped)} GiB"
        return text


def _dtype_name(dtype) -> str:
    return _TORCH_NAMES[str(dtype).replace("torch.", "")]


def plan_host_memory(plan: Plan, sizes: ModelSizes, *, t5_fp8: bool, t5_in_ram: bool) -> HostMemoryPlan:
    """Where each model's weights live in host memory under `plan` (storage dtypes as
    `loading.build_pipeline` chooses them)."""
    gpu = plan.device.type == "cuda"
    enc = "BF16" if gpu else _dtype_name(plan.compute_dtype)
    text = "F8_E4M3" if t5_fp8 else enc
    kept: list[tuple[str, int]] = [("runtime", int(RUNTIME_GIB * GIB))]
    mapped: list[tuple[str, int]] = []

    def home(what: str, tensors: FileTensors, dtype: str, *, may_map: bool = True) -> None:
        size = tensors.stored_bytes(dtype)
        (mapped if may_map and tensors.maps_as(dtype) else kept).append((what, size))

    if not gpu:  # everything is computed where it is stored
        home("DiT", sizes.dit, "F8_E4M3")
        home("CLIP", sizes.clip, enc)
        home("T5", sizes.t5, text)
        home("VAE encoder", sizes.vae_encoder, enc)
        return HostMemoryPlan(tuple(kept), tuple(mapped), t5_in_ram=True)

    dit = sizes.dit.stored_bytes("F8_E4M3")
    if not plan.keep_resident:  # moved back to host memory between jobs
        kept.append(("DiT between jobs", dit))
    elif plan.dit_resident_gib is not None:
        kept.append(("DiT, streamed part", max(0, dit - int(plan.dit_resident_gib * GIB))))
    if not plan.text_encoders_resident or not plan.keep_resident:
        kept.append(("CLIP", sizes.clip.stored_bytes(enc)))
        t5_streamed = not plan.text_encoders_resident and plan.keep_resident
        home("T5", sizes.t5, text, may_map=t5_streamed and not t5_in_ram)
    home("VAE encoder", sizes.vae_encoder, enc)  # not placed: DiffSynth moves it in when img2img needs it
    return HostMemoryPlan(tuple(kept), tuple(mapped), t5_in_ram=all(what != "T5" for what, _ in mapped))


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, lowered by a container's
    limit (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`) less what the group uses. None
    where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        (cgroup / "memory.max", cgroup / "memory.current"),
        (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory" / "memory.usage_in_bytes"),
    ):
        try:
            limit = limit_file.read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
                found.append(max(0, int(limit) - int(usage_file.read_text().strip())))
                break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def settle(
    plan: Plan, sizes: ModelSizes, t5_in_ram: str, *, t5_fp8: bool, available: int | None
) -> tuple[Plan, HostMemoryPlan]:
    """Decide `t5_in_ram` ("auto": in RAM while it fits beside everything else with SPARE_GIB to
    spare) and check the plan fits `available` bytes; raise HostMemoryShort, naming what helps,
    when it does not."""
    t5_streamed = plan.device.type == "cuda" and not plan.text_encoders_resident and plan.keep_resident
    text = "F8_E4M3" if t5_fp8 else "BF16"
    can_map = t5_streamed and sizes.t5.maps_as(text)
    if t5_in_ram == "off" and not can_map and t5_streamed:
        log.warning(
            '[model] t5_in_ram = "off" has no effect: T5 is cast to another dtype at load (t5_fp8, or '
            "a file not stored in bf16), so its copy is in RAM anyway"
        )
    in_ram = True
    if can_map and t5_in_ram == "off":
        in_ram = False
    elif can_map and t5_in_ram == "auto" and available is not None:
        with_t5 = plan_host_memory(plan, sizes, t5_fp8=t5_fp8, t5_in_ram=True)
        in_ram = with_t5.needed + SPARE_GIB * GIB <= available
    host = plan_host_memory(plan, sizes, t5_fp8=t5_fp8, t5_in_ram=in_ram)
    plan = replace(plan, t5_in_ram=host.t5_in_ram)
    if available is not None and host.needed > available:
        raise HostMemoryShort(_short_message(plan, host, sizes, available, can_map=can_map, t5_fp8=t5_fp8))
    return plan, host


def _short_message(
    plan: Plan, host: HostMemoryPlan, sizes: ModelSizes, available: int, *, can_map: bool, t5_fp8: bool
) -> str:
    helps = []
    t5_kept = dict(host.kept).get("T5")
    if t5_kept and can_map:
        helps.append(f'[model] t5_in_ram = "off" (T5 read from its file instead: {t5_kept / GIB:.1f} GiB less)')
    if t5_kept and not t5_fp8:
        helps.append("[model] t5_fp8 = true (T5 in float8: half its size)")
    if dict(host.kept).get("DiT, streamed part"):
        helps.append("a larger [model] vram_limit_gb, if the card has it (more of the DiT on the GPU)")
    if not plan.keep_resident:
        helps.append('[model] keep_resident = "on" (weights stay on the GPU between jobs)')
    return (
        f"not enough host memory: the model plan needs {host.describe()}, and this machine has "
        f"{available / GIB:.1f} GiB available" + (f". What helps: {'; '.join(helps)}" if helps else "")
    )


def check(model_settings, root: Path, plan: Plan | None = None) -> tuple[Plan, HostMemoryPlan]:
    """The plan for `model_settings` (a `bot.config.ModelSettings`) with its files under `root`,
    settled against this machine's available memory (raises HostMemoryShort)."""
    from .budget import make_plan
    from .weights import model_files

    plan = plan or make_plan(model_settings)
    return settle(
        plan,
        ModelSizes.from_files(model_files(root)),
        model_settings.t5_in_ram,
        t5_fp8=model_settings.t5_fp8,
        available=available_bytes(),
    )
