"""The engine: load FLUX (majicflus DiT in float8, CLIP/T5/VAE in bf16) once, then paint many images.

`Engine` puts the mechanisms of the other modules together in the order they must happen (files,
allocator, DiffSynth's loader, patches, placement, compilation, CUDA graph) and owns what lives as
long as the loaded models do. `Engine.generate` is blocking and meant for one worker thread; it
reports each denoising step and stops between steps when asked to (`denoise.DenoiseLoop`).

A request with `count` > 1 (a grid) paints its images in one denoising loop over a batch of latents,
one per seed, with the DiT run image by image inside each block (`batch.per_image_dit`): a block's
streamed weights cross PCIe once per step for the whole grid, and a step's GPU memory stays one
image's. The result's `images` are the grid's, in seed order.

A request with a `source_path` (Vary, Upscale) is img2img: DiffSynth's `input_image` (the source,
resized to the request's size, encoded by the VAE encoder) and `denoising_strength`. The steps are
the same denoising steps as text-to-image, on latents that start from the noised source, so they
take the same path: compiled blocks, and with a CUDA graph its replay (its inputs are the same
tensors; the modulation table is made from the scheduler's timesteps, which the strength shortened).
An image larger than the model's native size is painted in tiles (`tiling.DiTTiles`, VAE in tiles
too), each of the size the source was painted at, so an Upscale needs no more GPU memory than a job
of that size (`budget.upscale_fits` says what it does need beyond one, for `upscale_size`).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from ..params import image_seed
from . import attention, batch, fp8, graphs, hostmem, inductor, modulation, offload, patches, preview, tiling, weights
from .api import (
    MAX_UPSCALED_PIXELS,
    UPSCALE_FACTORS,
    CancelFn,
    GenerationOOM,
    GenerationRequest,
    GenerationResult,
    ProgressFn,
    SourceImageMissing,
)
from .budget import GIB, Plan, cap_allocator, upscale_fits, use_expandable_segments
from .denoise import DenoiseLoop
from .loading import MODELS, build_pipeline, model_root
from .offload import Placement
from .streaming import MIB, Streamer

log = logging.getLogger("fluxbot.engine")

NATIVE_PIXELS = 1024 * 1024
"""FLUX's own scale: an img2img job larger than this is painted in tiles of at most this many pixels."""


class Engine:
    """One loaded model set. Build with `Engine.load(model_settings)`."""

    def __init__(self, pipe, plan: Plan, root: Path, preset: str):
        self.pipe = pipe
        self.plan = plan
        self.root = root
        self.preset = preset
        self.prompt_cache = patches.PromptCache()
        self._lock = threading.Lock()
        patches.install_prompt_cache(pipe, self.prompt_cache)
        patches.install_device_guidance(pipe)
        self.step_tap = preview.StepTap()  # what live previews are made from (`ProgressWithPreviews`)
        self.step_tap.install(pipe)
        patches.cache_image_ids(pipe.dit)
        if plan.fused_attention:
            attention.install(pipe.dit)
        self.modulations = modulation.Modulations(pipe.dit)
        patches.keep_models_in_place(pipe)
        self.vae_tiles = patches.VaeTiles()  # per job: on for every job under a small budget, and for large ones
        self.vae_tiles.decode = plan.tiled_vae
        patches.tile_vae(pipe, self.vae_tiles)
        self.batch = batch.BatchSeeds()  # per job: a grid's seeds (one batch of latents)
        batch.install_noise(pipe, self.batch)
        batch.install_decode(pipe)  # outside the tiled VAE: each image of a batch is tiled on its own
        for name in MODELS:
            fp8.configure_linears(
                getattr(pipe, name), fp8_matmul=plan.fp8_matmul and name == "dit", fast_accum=plan.fast_accum
            )
        self.streamers = {
            # Windows: more than the largest streamed block (a double block is 340 MB in float8);
            # T5's feed-forward modules are 250 MB each in bf16.
            "dit": Streamer(plan.device, window=384 * MIB, wrap=True),  # wraps into the next step
            "text_encoder_2": Streamer(plan.device, window=512 * MIB, wrap=False),
            "text_encoder_1": Streamer(plan.device, window=512 * MIB, wrap=False),
        }
        batch.install_model_fn(pipe, self.streamers["dit"])  # innermost: the graph and the tiler wrap it
        if self._graph_planned():
            # The graph reads one modulation table filled by one matmul: join those weights now,
            # as they move to the GPU (after placement, old and new copies would meet there).
            self.modulations.join_weights(self.device)
        self.placement = self._place()
        self.compiled = self._maybe_compile()
        self.step_graph = self._maybe_graph()
        self.token_counts_run: set[int] = set()  # image token counts painted since loading
        # Large img2img jobs run the DiT once per tile: inside the modulation table (one row per
        # step for every tile), outside the step graph (one replay per tile).
        self.dit_tiles = tiling.DiTTiles(pipe.model_fn, pipe.dit)
        pipe.model_fn = self.dit_tiles
        modulation.install(pipe, self.modulations)  # outside the graph: it fills the table per job

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_settings, *, config_hint: str = "", plan: Plan | None = None) -> Engine:
        """Load the models `model_settings` (a `bot.config.ModelSettings`) names, under `plan`
        (default: the one `make_plan` makes for this machine)."""
        preset = model_settings.preset
        root = model_root(model_settings, config_hint)
        plan, host = hostmem.check(model_settings, root, plan)
        log.info("loading %s from %s (%s)", preset, root, plan.describe())
        log.info("host memory: %s", host.describe())
        use_expandable_segments(plan)
        restore = cap_allocator(plan)
        t0 = time.perf_counter()
        try:
            pipe = build_pipeline(weights.model_files(root), plan, t5_fp8=model_settings.t5_fp8)
            engine = cls(pipe, plan, root, preset)
        except BaseException:
            restore()
            raise
        log.info("model loaded in %.1f s", time.perf_counter() - t0)
        return engine

    def _place(self) -> Placement:
        """Place every model's layers for the plan (resident, streamed, copied per job)."""
        plan, pipe = self.plan, self.pipe
        dit_bytes = None if plan.dit_resident_gib is None else int(plan.dit_resident_gib * GIB)
        text_bytes = None if plan.text_encoders_resident else 0
        placement = Placement(
            dit=offload.place(
                pipe.dit,
                dit_bytes,
                self.streamers["dit"],
                pinned=plan.pinned,
                per_job=frozenset(map(id, self.modulations.layers)),
            ),
            text_encoder_1=offload.place(
                pipe.text_encoder_1, text_bytes, self.streamers["text_encoder_1"], pinned=plan.pinned
            ),
            # With t5_in_ram off, T5 streams from the model file's pages (the page cache), not RAM of its own.
            text_encoder_2=offload.place(
                pipe.text_encoder_2, text_bytes, self.streamers["text_encoder_2"], pinned=plan.pinned and plan.t5_in_ram
            ),
            vae_decoder=offload.place(pipe.vae_decoder, None),
        )
        self.modulations.register()
        if plan.device.type == "cuda" and log.isEnabledFor(logging.INFO):
            log.info("placement: %s", placement.describe())
        return placement

    def _maybe_compile(self) -> bool:
        """torch.compile the DiT blocks (one graph per block class and placement, shared by those
        blocks). A streamed linear layer is one opaque op in the graph (`offload.streamed_linear`),
        so blocks with streamed weights compile too; only a block with a streamed non-linear
        module (none in FLUX) would stay eager."""
        mode = self.plan.compile
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return False
        blocks = list(self.pipe.dit.blocks) + list(self.pipe.dit.single_blocks)
        compilable = [b for b in blocks if not any(hasattr(m, "_stream_targets") for m in b.modules())]
        if not compilable:
            if mode == "on":
                log.warning('[model] compile = "on" ignored: every DiT block streams a non-linear module')
            return False
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        # One graph per image size (the bot has three): with Dynamo's automatic dynamic shapes the
        # second size compiled a shape-generic graph that later jobs of every size then ran, the
        # default size 1.6 ms a step slower after one portrait job (0.4 ms with this; gpu45).
        torch._dynamo.config.automatic_dynamic_shapes = False
        inductor.configure(tuning=self.preset != "tiny-random")  # tuning a smoke test's kernels buys nothing
        for block in compilable:
            block.compile()
        log.info(
            "%d of %d DiT blocks will be compiled on first use (the first image is slower)",
            len(compilable),
            len(blocks),
        )
        return True

    def _graph_planned(self) -> bool:
        """The plan asks for a CUDA graph and it can stay valid: the whole DiT on the GPU for good
        (no budget, so nothing streamed or copied in per job; keep_resident on)."""
        plan = self.plan
        return plan.cuda_graphs and self.device.type == "cuda" and plan.dit_resident_gib is None and plan.keep_resident

    def _maybe_graph(self) -> graphs.StepGraph | None:
        """Replay denoising steps as a CUDA graph when the plan asks for it and it can stay valid."""
        if not self._graph_planned():
            if self.plan.cuda_graphs and self.device.type == "cuda":
                log.info("CUDA graphs off: part of the DiT moves during a job (budget too small or keep_resident off)")
            return None
        mods = self.modulations
        if not mods.joined:
            log.info("CUDA graphs off: the modulation layers differ in device, dtype or width")
            return None
        step_graph = graphs.StepGraph(self.pipe.model_fn, can_replay=lambda: mods.step >= 0 or not mods.enabled)
        self.pipe.model_fn = step_graph
        return step_graph

    def compiles_for(self, width: int, height: int) -> bool:
        """Whether a job at this size compiles the blocks first (its first step then takes a minute
        or more on an H100): compiled blocks and an image token count not painted since loading.
        The blocks see tokens, not sides: portrait and landscape share one compiled graph."""
        return self.compiled and _image_tokens(width, height) not in self.token_counts_run

    def upscale_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size Upscale paints an image of width x height at: 2x each side if the plan fits it
        (the tiles cost what a job at the source's size does; only the whole image held on the GPU
        while the VAE works grows: `budget.upscale_fits`), else 1.5x; None when neither fits the plan
        or `MAX_UPSCALED_PIXELS`."""
        for factor in UPSCALE_FACTORS:
            w, h = _round16(width * factor), _round16(height * factor)
            if w * h <= MAX_UPSCALED_PIXELS and upscale_fits(self.plan, w, h):
                return w, h
        return None

    def warm_up(self, width: int, height: int) -> float:
        """Run a short generation so compilation happens now, not in a member's first job."""
        t0 = time.perf_counter()
        self.generate(GenerationRequest("warm-up", seed=0, steps=2, width=width, height=height))
        return time.perf_counter() - t0

    def _release(self) -> None:
        for name in MODELS:
            offload.release(getattr(self.pipe, name))
        self.free_memory()

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        request: GenerationRequest,
        *,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """Paint one image, or a grid's `count` in one batch. Blocking; call from a worker thread. Same
        request -> same pixels. An `on_progress` that is a `ProgressWithPreviews` can have a live
        preview made of a step (of the whole grid, for a batch)."""
        with self._lock:
            cuda = self.device.type == "cuda"
            # With the DiT all on the GPU nothing is copied in during a step: the CPU may queue ahead.
            loop = DenoiseLoop(
                self.device,
                on_progress=on_progress,
                should_cancel=should_cancel,
                queue_ahead=self.placement.dit.streamed == 0,
                preview=self.step_tap.preview,
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            tile_runs = self.dit_tiles.runs
            images, tile = self._paint(request, loop)
            seconds, timings = loop.finish()
            self.token_counts_run.add(_image_tokens(request.width, request.height))
            if tile is not None:  # the blocks ran at the tile's size
                self.token_counts_run.add((tile[0] // 2) * (tile[1] // 2))
                timings["dit_tile_forwards"] = float(self.dit_tiles.runs - tile_runs)
            peak = torch.cuda.max_memory_allocated(self.device) / GIB if cuda else None
            return GenerationResult(
                image=images[0],
                images=tuple(images),
                request=request,
                seconds=seconds,
                peak_vram_gib=peak,
                timings=timings,
            )

    def _paint(self, req: GenerationRequest, loop: DenoiseLoop) -> tuple[list[Image.Image], tuple[int, int] | None]:
        """The pipeline's call for one job: the models placed for it (keep_resident off) and
        released after it, the job's state dropped, a GPU out of memory turned into GenerationOOM.
        Returns the images (one, or a grid's) and the DiT's tile (latent rows, columns; None: painted whole)."""
        if req.count > 1 and req.source_path is not None:
            raise ValueError("a grid paints from noise: count > 1 with a source image is not a job")
        if not self.plan.keep_resident:
            self.placement = self._place()
        tile = None
        try:
            img2img = {}
            if req.source_path is not None:
                source = _source_image(req.source_path)
                tile = _dit_tile(req.width, req.height, source.size)
                if source.size != (req.width, req.height):
                    source = source.resize((req.width, req.height), Image.Resampling.LANCZOS)
                img2img = {"input_image": source, "denoising_strength": req.strength}
            self.dit_tiles.tile = tile
            if req.count > 1:
                self.batch.seeds = tuple(image_seed(req.seed, i) for i in range(req.count))
            self.vae_tiles.decode = self.vae_tiles.encode = self.plan.tiled_vae or tile is not None
            image = self.pipe(
                prompt=req.prompt,
                seed=req.seed,
                height=req.height,
                width=req.width,
                num_inference_steps=req.steps,
                embedded_guidance=req.guidance,
                progress_bar_cmd=loop,
                **img2img,
            )
            return list(batch.iter_images(image)), tile
        except torch.cuda.OutOfMemoryError as exc:
            if self.step_graph is not None:
                self.step_graph.reset()  # its memory pool goes back; the next job captures again
            self.free_memory()
            budget = "unlimited" if self.plan.budget_gib is None else f"{self.plan.budget_gib:g} GiB"
            raise GenerationOOM(
                f"the GPU ran out of memory at {req.width}x{req.height} (budget {budget}): {str(exc).splitlines()[0]}"
            ) from None
        finally:
            self.dit_tiles.tile = None
            self.batch.seeds = None
            self.vae_tiles.decode, self.vae_tiles.encode = self.plan.tiled_vae, False
            self.modulations.clear()
            self.step_tap.clear()
            for streamer in self.streamers.values():
                streamer.flush()
            if not self.plan.keep_resident:
                self._release()


def _image_tokens(width: int, height: int) -> int:
    """The DiT's image tokens: 8x8-pixel latents in 2x2 patches."""
    return (width // 16) * (height // 16)


def _round16(value: float) -> int:
    return max(16, round(value / 16) * 16)


def _source_image(path: str) -> Image.Image:
    """The image an img2img job starts from, as RGB; SourceImageMissing when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:  # gone, unreadable, not an image (PIL's errors are OSErrors)
        raise SourceImageMissing(f"the image this job starts from cannot be read ({type(exc).__name__})") from exc


def _dit_tile(width: int, height: int, source: tuple[int, int]) -> tuple[int, int] | None:
    """The DiT's tile (latent rows, columns) for an img2img job of width x height from an image of
    `source` size, or None to paint it whole. An upscale is tiled at the source's size (the size its
    own job was painted at: those compiled graphs serve again); any other job larger than
    NATIVE_PIXELS at the largest tile of its shape that NATIVE_PIXELS allows."""
    pixels = width * height
    if source[0] * source[1] < pixels and source[0] * source[1] <= NATIVE_PIXELS:
        tile_w, tile_h = source
    elif pixels > NATIVE_PIXELS:
        shrink = math.sqrt(NATIVE_PIXELS / pixels)
        tile_w, tile_h = max(16, int(width * shrink) // 16 * 16), max(16, int(height * shrink) // 16 * 16)
    else:
        return None
    return tile_h // tiling.LATENT_SCALE // 2 * 2, tile_w // tiling.LATENT_SCALE // 2 * 2
