"""One benchmark configuration per process: seconds per image and peak memory at a VRAM budget.

    python benchmarks/engine_bench.py --system ours --budget 8 --weights DIR --json OUT.json
    python benchmarks/engine_bench.py --system seed-diffsynth --budget 8 ...
    python benchmarks/engine_bench.py --system ours --preset tiny-random --device cpu ...   (CI smoke run)

A card of B GB is emulated by capping PyTorch's allocator (set_per_process_memory_fraction) so
that reserved memory plus this process's CUDA context stays under the whole-process target
(8 GB card: 7.0 GiB, as nvidia-smi would show). A setup that cannot meet it fails (ok=false).
Systems:
  ours            bot.engine.Engine with the budget as [model] vram_limit_gb
  seed-diffsynth  the original article's setup on DiffSynth 2.x: DiT float8 + everything offloaded
                  to the CPU, DiffSynth's own vram_limit (= budget - 1, its 8 GB example uses 7)
  diffusers       diffusers' FluxPipeline in its fastest setup for the budget: everything bf16 on the
                  GPU when unlimited; at 24 GB float8 layerwise casting + model CPU offload; below,
                  float8 layerwise casting of the transformer + leaf-level group offloading with a
                  CUDA stream for every model (the fastest one that fits 8 GB)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
PROMPT = (
    "a weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the "
    "windows, dramatic clouds lit orange and violet, gulls in the wind, fine film grain, "
    "shot on a medium format camera, soft focus in the distance, high detail, calm mood"
)
WHOLE_PROCESS_TARGET = {8: 7.0, 12: 11.0, 24: 22.5}
EXTRA: dict = {}  # what loading measured that goes into the record as it is (the H2D cap's probe)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def host_kept_bytes(status: Path = Path("/proc/self/status")) -> int:
    """Host memory the kernel cannot take back: anonymous plus shared-memory pages (page-locked
    memory is one or the other); the model files' mapped pages (RssFile) are not counted."""
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return sum(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssShmem"))


def process_age_s() -> float:
    """Seconds since this process started (the interpreter's start and the imports included)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class HostSampler(threading.Thread):
    """The peak of `host_kept_bytes` over the run, sampled every 20 ms (loading included)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = host_kept_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, host_kept_bytes())

    def finish(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, host_kept_bytes()) / GIB


def context_gib(device) -> float:
    """CUDA context + library handles: whole-device used minus what PyTorch reserved."""
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(1, 2, 64, 128, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / GIB


def nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi reports it (torch does not expose it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def write_record(path: Path, rec: dict) -> None:
    """A benchmark's record: written as JSON (folders made) and printed on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), flush=True)


def ours_engine(budget: float | None, root: Path, device: str, preset: str):
    """Our engine for a run, with the levers under trial switched from the environment so one
    script measures each of them: FP8_MATMUL, COMPILE, FAST_ACCUM, CUDA_GRAPHS, FUSED_ATTENTION,
    T5_IN_RAM (auto/on/off), T5_FP8 (1: T5 stored in float8), HEADROOM_GIB (the budget's headroom),
    STREAM_WINDOW_MIB (the DiT's prefetch window), H2D_GBPS (caps the streamers' host->GPU rate, as
    a home card's slower link would: `Streamer.cap_rate`). Also used by profile_step.py and
    size_switch.py."""
    from bot.config import ModelSettings
    from bot.engine import budget as budget_mod
    from bot.engine.pipeline import Engine

    if "HEADROOM_GIB" in os.environ:
        budget_mod.HEADROOM_GIB = float(os.environ["HEADROOM_GIB"])
    engine = Engine.load(
        ModelSettings(
            preset=preset,
            dir=root,
            vram_limit_gb=None if budget is None else float(budget),
            device=device,
            **{
                name: os.environ.get(name.upper(), "auto")
                for name in ("fp8_matmul", "compile", "fast_accum", "cuda_graphs", "fused_attention", "t5_in_ram")
            },
            t5_fp8=os.environ.get("T5_FP8", "0") == "1",
        )
    )
    if "STREAM_WINDOW_MIB" in os.environ:
        engine.streamers["dit"].window = int(float(os.environ["STREAM_WINDOW_MIB"]) * 2**20)
    if os.environ.get("H2D_GBPS"):
        first, *rest = engine.streamers.values()
        EXTRA["h2d_cap"] = first.cap_rate(float(os.environ["H2D_GBPS"]))
        for streamer in rest:
            streamer.cap_like(first)
    return engine


def seed_vram_limit(budget: int | None, setup: str) -> float | None:
    """DiffSynth's `vram_limit` for the article's setup: budget - 1 (its 8 GB example uses 7), or
    the GB that `setup` names ("vram_limit=5"), for a budget where the default does not fit."""
    if setup in ("", "auto"):
        return None if budget is None else budget - 1.0
    try:
        if setup.startswith("vram_limit="):
            return float(setup.split("=", 1)[1])
    except ValueError:
        pass
    raise SystemExit(f"seed-diffsynth setups: auto or vram_limit=GB, not {setup!r}")


def load(system: str, budget: int | None, root: Path, device: str, preset: str, setup: str = "auto"):
    if system == "ours":
        from bot.engine import budget as budget_mod

        engine = ours_engine(budget, root, device, preset)

        def run(seed, steps, width, height):
            from bot.engine.api import GenerationRequest

            # A new prompt per image: the prompt cache must not flatter the timings.
            streamed = engine.streamers["dit"].copied_bytes
            r = engine.generate(
                GenerationRequest(f"{PROMPT}, take {seed}", seed=seed, steps=steps, width=width, height=height)
            )
            replays = engine.step_graph.replays if engine.step_graph is not None else 0
            per_step = (engine.streamers["dit"].copied_bytes - streamed) / steps / GIB
            return r.image, {**r.timings, "graph_replays": replays, "dit_streamed_gib_per_step": per_step}

        dit = engine.placement.dit
        graphed = "replayed" if engine.step_graph is not None else "none"
        return run, (
            f"{engine.plan.describe()} step_graph={graphed} headroom={budget_mod.HEADROOM_GIB:g} "
            f"window={engine.streamers['dit'].window / 2**20:g}MiB "
            f"dit_placed={dit.resident / GIB:.2f}+{dit.streamed / GIB:.2f}streamed+{dit.per_job / GIB:.2f}per_job "
            f"alloc_conf={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}"
        )

    if system == "seed-diffsynth":
        from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

        from bot.engine import weights
        from bot.engine.patches import ensure_cpu_empty_cache

        ensure_cpu_empty_cache()
        vram_limit = seed_vram_limit(budget, setup)
        files = weights.model_files(weights.preset_root(preset, root))
        if preset == "tiny-random":
            from bot.engine import tiny

            tiny.write_tiny_model(files.root)
            tiny.register_with_diffsynth(files.root)
        fp8, bf16 = torch.float8_e4m3fn, (torch.bfloat16 if device != "cpu" else torch.float32)

        def off(store: torch.dtype) -> dict:
            return dict(
                offload_dtype=store,
                offload_device="cpu",
                onload_dtype=store,
                onload_device="cpu",
                preparing_dtype=store,
                preparing_device=device,
                computation_dtype=bf16,
                computation_device=device,
            )

        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=bf16,
            device=device,
            model_configs=[
                ModelConfig(path=str(files.dit), **off(fp8)),
                ModelConfig(path=str(files.clip), **off(bf16)),
                ModelConfig(path=[str(p) for p in files.t5], **off(bf16)),
                ModelConfig(path=str(files.vae), **off(bf16)),
            ],
            tokenizer_1_config=ModelConfig(path=str(files.tokenizer)),
            tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
            vram_limit=None if device == "cpu" else vram_limit,
        )

        def run(seed, steps, width, height):
            marks = {}

            def bar(ts):
                marks["denoise"] = time.perf_counter()
                yield from ts
                marks["decode"] = time.perf_counter()

            t0 = time.perf_counter()
            img = pipe(
                prompt=f"{PROMPT}, take {seed}",
                seed=seed,
                num_inference_steps=steps,
                width=width,
                height=height,
                progress_bar_cmd=bar,
            )
            end = time.perf_counter()
            return img, {
                "text_encode_s": marks["denoise"] - t0,
                "denoise_s": marks["decode"] - marks["denoise"],
                "decode_s": end - marks["decode"],
            }

        return run, f"DiffSynth vram_limit={vram_limit}"
    if system == "diffusers":
        return load_diffusers(budget, root, device, preset, setup)
    raise SystemExit(f"unknown system {system}")


@torch.no_grad()
def _fill_random(module: torch.nn.Module, device: str) -> None:
    """Random weights, drawn on the GPU (fast) and copied to where the module lives."""
    gen = torch.Generator("cuda").manual_seed(0)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            continue
        src = torch.empty(p.shape, device="cuda", dtype=torch.float32)
        if p.dim() <= 1:
            src.fill_(1.0) if "norm" in name and name.endswith("weight") else src.normal_(0, 0.02, generator=gen)
        else:
            src.normal_(0, 1.0 / max(1, p[0].numel()) ** 0.5, generator=gen)
        p.data.copy_(src.to(p.dtype))
        del src
    # to_empty() leaves integer buffers (CLIP's position ids) as garbage: rebuild them.
    for name, buf in module.named_buffers():
        if not buf.is_floating_point() and name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))


@dataclass(frozen=True)
class DiffusersSetup:
    """One of diffusers' documented ways to run FLUX on a card of a budget (its memory guide:
    model CPU offload, sequential CPU offload, group offloading at leaf or block level, with or
    without a CUDA stream and record_stream, low_cpu_mem_usage; float8 layerwise casting of the
    transformer; VAE tiling). Named on the command line, e.g. `group-block1-stream-rs+tiledvae`."""

    name: str
    placement: str  # resident | transformer-resident | model-offload | sequential-offload | group
    fp8: bool = True  # float8 layerwise casting of the transformer (storage fp8, compute bf16)
    level: str = "leaf_level"  # group offloading: leaf_level or block_level
    blocks_per_group: int | None = None
    stream: bool = False
    record_stream: bool = False
    low_cpu_mem: bool = False
    tiled_vae: bool = False

    def describe(self) -> str:
        what = {
            "resident": "everything on the GPU",
            "transformer-resident": "transformer, CLIP and VAE on the GPU, T5 leaf-level group offload with a CUDA stream",
            "model-offload": "model CPU offload",
            "sequential-offload": "sequential CPU offload",
        }.get(self.placement)
        if what is None:
            what = (
                ("leaf-level" if self.level == "leaf_level" else f"block-level ({self.blocks_per_group} per group)")
                + " group offload of every model"
                + (" with a CUDA stream" if self.stream else " without a stream")
                + (" (record_stream)" if self.record_stream else "")
                + (" (low_cpu_mem_usage)" if self.low_cpu_mem else "")
            )
        return (
            f"{self.name}: "
            + ("fp8 layerwise casting + " if self.fp8 else "bf16, ")
            + what
            + (" + VAE tiling" if self.tiled_vae else "")
        )


DIFFUSERS_AUTO = {None: "resident-bf16", 24: "model-offload", 12: "group-leaf-stream", 8: "group-leaf-stream"}
"""What `--setup auto` runs per budget (the setups the earlier side-by-side runs used)."""


def diffusers_setup(name: str, budget: int | None) -> DiffusersSetup:
    """The setup a name stands for: resident-bf16, resident-fp8, transformer-resident,
    model-offload, sequential-offload, group-leaf|group-blockN [-stream [-rs]] [-lowcpu]; any of
    them + "+tiledvae". Raises SystemExit on a name that is none of these."""
    if name == "auto":
        name = DIFFUSERS_AUTO.get(budget, "group-leaf-stream")
    base, _, extra = name.partition("+")
    if extra not in ("", "tiledvae"):
        raise SystemExit(f"unknown diffusers setup option {extra!r} (only +tiledvae)")
    tiled = extra == "tiledvae"
    fixed = {
        "resident-bf16": dict(placement="resident", fp8=False),
        "resident-fp8": dict(placement="resident"),
        "transformer-resident": dict(placement="transformer-resident", stream=True),
        "model-offload": dict(placement="model-offload"),
        "sequential-offload": dict(placement="sequential-offload"),
    }
    if base in fixed:
        return DiffusersSetup(name, tiled_vae=tiled, **fixed[base])  # type: ignore[arg-type]
    m = re.fullmatch(r"group-(leaf|block(\d+))(-stream)?(-rs)?(-lowcpu)?", base)
    if m is None or (m.group(4) and not m.group(3)):
        raise SystemExit(f"unknown diffusers setup {name!r} (see diffusers_setup's docstring)")
    return DiffusersSetup(
        name,
        placement="group",
        level="leaf_level" if m.group(1) == "leaf" else "block_level",
        blocks_per_group=int(m.group(2)) if m.group(2) else None,
        stream=bool(m.group(3)),
        record_stream=bool(m.group(4)),
        low_cpu_mem=bool(m.group(5)),
        tiled_vae=tiled,
    )


def load_diffusers(budget, root: Path, device: str, preset: str, setup_name: str = "auto"):
    """FluxPipeline from components built in memory with full-size shapes and random weights."""
    from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from bot.engine import weights

    files = weights.model_files(weights.preset_root(preset, root))
    bf16 = torch.bfloat16
    chosen = diffusers_setup(setup_name, budget)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                vocab_size=49408,
                max_position_embeddings=77,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
        )
        t5 = T5EncoderModel(FluxTextEncoderT5().config)
    models = []
    for m in (transformer, vae, clip, t5):
        # Built on the host: a bf16 transformer alone (22 GiB) would not fit a capped budget before
        # its cast to float8; models that live on the GPU move there afterwards.
        m = m.to_empty(device="cpu").to(bf16)
        _fill_random(m, device)
        models.append(m.eval())
    transformer, vae, clip, t5 = models
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=clip,
        tokenizer=CLIPTokenizer.from_pretrained(str(files.tokenizer)),
        text_encoder_2=t5,
        tokenizer_2=T5TokenizerFast.from_pretrained(str(files.tokenizer_2)),
        transformer=transformer,
    )
    apply_diffusers_setup(pipe, chosen, device)
    setup = chosen.describe()

    @torch.no_grad()  # as FluxPipeline.__call__ is: without it encode_prompt's autograd graph keeps every
    # onloaded T5 weight on the GPU while its embeddings live (gpu49, gpu61: every offload setup out of memory)
    def run(seed, steps, width, height):
        t0 = time.perf_counter()
        # text encoding timed separately: diffusers encodes inside __call__
        pe, ppe, _ = pipe.encode_prompt(
            prompt=f"{PROMPT}, take {seed}", prompt_2=None, max_sequence_length=512, device=torch.device(device)
        )
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = pipe(
            prompt_embeds=pe,
            pooled_prompt_embeds=ppe,
            num_inference_steps=steps,
            width=width,
            height=height,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        )
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        latents = pipe._unpack_latents(out.images, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        img = pipe.vae.decode(latents.to(bf16), return_dict=False)[0]
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        return img, {"text_encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2}

    return run, f"diffusers {__import__('diffusers').__version__}: {setup}"


def apply_diffusers_setup(pipe, chosen: DiffusersSetup, device: str) -> None:
    """Place the pipeline's models as `chosen` says, with diffusers' own API for each option."""
    from diffusers.hooks import apply_group_offloading

    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    if chosen.fp8:
        pipe.transformer.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=bf16)
    if chosen.tiled_vae:
        pipe.vae.enable_tiling()
    on, off = torch.device(device), torch.device("cpu")
    if chosen.placement == "resident":
        pipe.to(device)
    elif chosen.placement == "transformer-resident":
        for m in (pipe.transformer, pipe.text_encoder, pipe.vae):
            m.to(device)
        apply_group_offloading(
            pipe.text_encoder_2, onload_device=on, offload_device=off, offload_type="leaf_level", use_stream=True
        )
    elif chosen.placement == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif chosen.placement == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        for m in (pipe.transformer, pipe.text_encoder_2, pipe.text_encoder, pipe.vae):
            apply_group_offloading(
                m,
                onload_device=on,
                offload_device=off,
                offload_type=chosen.level,
                num_blocks_per_group=chosen.blocks_per_group,
                use_stream=chosen.stream,
                record_stream=chosen.record_stream,
                low_cpu_mem_usage=chosen.low_cpu_mem,
            )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", default="ours", choices=["ours", "seed-diffsynth", "diffusers"])
    ap.add_argument("--budget", default="none", help="8, 12, 24 or none")
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--preset", default="majicflus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument(
        "--setup",
        default="auto",
        help="a peer's setup: seed-diffsynth vram_limit=GB; diffusers one of diffusers_setup's names",
    )
    ap.add_argument(
        "--no-cap",
        action="store_true",
        help="do not cap the allocator: measure the time of a setup that does not fit the budget",
    )
    a = ap.parse_args()
    budget = None if a.budget == "none" else int(a.budget)
    cuda = a.device.startswith("cuda")
    rec = {
        "system": a.system,
        "setup_name": a.setup,
        "budget_gb": budget,
        "ok": False,
        "allocator_capped": not a.no_cap,
        "steps": a.steps,
        "size": a.size,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name() if cuda else "cpu",
    }
    try:
        import diffsynth

        rec["diffsynth"] = getattr(diffsynth, "__version__", None) or __import__("importlib.metadata").metadata.version(
            "diffsynth"
        )
    except Exception:
        pass
    ctx = 0.0
    if cuda:
        ctx = context_gib(a.device)
        rec["context_gib"] = round(ctx, 3)
        rec["driver"] = nvidia_driver()
        if budget is not None and not a.no_cap:
            total = torch.cuda.get_device_properties(a.device).total_memory
            cap = (WHOLE_PROCESS_TARGET[budget] - ctx) * GIB
            torch.cuda.set_per_process_memory_fraction(cap / total)
            rec["allocator_cap_gib"] = round(cap / GIB, 3)
    if a.system == "ours":  # where `fluxbot run` keeps compiled kernels, unless the caller chose
        from bot.cli import compile_cache_env
        from bot.config import ModelSettings

        os.environ.update(compile_cache_env(ModelSettings(), os.environ))
        rec["compile_cache"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    times, steps_s, details = [], [], []
    host = HostSampler()
    host.start()
    try:
        t0 = time.perf_counter()
        run, setup = load(a.system, budget, a.weights, a.device, a.preset, a.setup)
        rec["setup"] = setup
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        for i in range(a.warmup + a.images):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            img, timing = run(1000 + i, a.steps, a.size, a.size)
            if cuda:
                torch.cuda.synchronize()
            el = time.perf_counter() - t
            print(f"  image {i} ({'warm-up' if i < a.warmup else 'timed'}): {el:.2f} s {timing}", flush=True)
            if i == 0:  # from the process's start: imports, load, compile and the image itself
                rec["first_image_s"] = round(process_age_s(), 2)
            if i < a.warmup:  # compile, autotune and graph capture land here: a restart's wait
                rec.setdefault("warmup_s", []).append(round(el, 2))
            else:
                times.append(el)
                steps_s.append(timing["denoise_s"] / a.steps)
                details.append(timing)
        rec.update(
            ok=True,
            sec_per_image=round(statistics.median(times), 3),
            sec_per_step=round(statistics.median(steps_s), 4),
            text_encode_s=round(statistics.median(d["text_encode_s"] for d in details), 3),
            vae_s=round(statistics.median(d["decode_s"] for d in details), 3),
            images=len(times),
        )
        rec.update(EXTRA)
        if all("dit_streamed_gib_per_step" in d for d in details):  # ours: what crossed PCIe per step
            rec["dit_streamed_gib_per_step"] = round(
                statistics.median(d["dit_streamed_gib_per_step"] for d in details), 3
            )
        if all("step_s" in d for d in details):  # ours: GPU time of a step after the first
            rec["sec_per_step_steady"] = round(statistics.median(d["step_s"] for d in details), 4)
    except Exception as exc:  # a budget the setup cannot meet is a result, not a crash
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        traceback.print_exc()
    if cuda:
        rec["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        rec["peak_process_gib"] = round(rec["peak_reserved_gib"] + ctx, 3)
        stats = torch.cuda.memory_stats()
        # Allocations that failed under the cap and were retried after freeing the cache (each one
        # waits for the GPU): a setup living at its cap pays for it here.
        rec["alloc_retries"] = stats.get("num_alloc_retries", 0)
        if budget is not None and rec["peak_process_gib"] > WHOLE_PROCESS_TARGET[budget] + 1e-6:
            rec["ok"] = False
            rec.setdefault(
                "error",
                f"whole-process peak {rec['peak_process_gib']} GiB over the {WHOLE_PROCESS_TARGET[budget]} GiB target",
            )
    else:
        rec.update(peak_vram_gib=None, peak_reserved_gib=None, peak_process_gib=None)
    rec["peak_host_gib"] = round(host_peak_gib(), 3)
    rec["peak_host_anon_gib"] = round(host.finish(), 3)
    write_record(a.json, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
