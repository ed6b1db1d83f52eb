"""The engine: load FLUX (majicflus DiT in float8, CLIP/T5/VAE in bf16) once, then paint many images.

`Engine.generate` is blocking and meant for one worker thread; it reports each denoising step and
stops between steps when asked to.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import statistics
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from . import attention, graphs, inductor, modulation, offload, weights
from .api import CancelFn, GenerationCancelled, GenerationOOM, GenerationRequest, GenerationResult, ProgressFn
from .budget import GIB, Plan, make_plan
from .streaming import MIB, Streamer

log = logging.getLogger("fluxbot.engine")

MODELS = ("dit", "text_encoder_1", "text_encoder_2", "vae_decoder")  # the pipeline parts we place


def _ensure_cpu_empty_cache() -> None:
    # DiffSynth calls torch.<device>.empty_cache(); torch.cpu has none in some releases.
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None


class _PromptCache:
    """Text-encoder outputs per prompt: a Re-roll or a repeated prompt skips T5 entirely."""

    def __init__(self, size: int = 16):
        self.size = size
        self.items: OrderedDict[tuple, dict] = OrderedDict()
        self.hits = 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        return None

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _install_prompt_cache(pipe, cache: _PromptCache) -> None:
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder

    class CachedPromptEmbedder(FluxImageUnit_PromptEmbedder):
        def process(self, pipe, prompt, t5_sequence_length, positive):
            key = (prompt, t5_sequence_length)
            hit = cache.get(key)
            if hit is None:
                hit = super().process(pipe, prompt, t5_sequence_length, positive)
                cache.put(key, hit)
            return dict(hit)

    pipe.units = [CachedPromptEmbedder() if isinstance(u, FluxImageUnit_PromptEmbedder) else u for u in pipe.units]


def _install_device_guidance(pipe) -> None:
    """DiffSynth builds the guidance tensor on the CPU and copies it over with a blocking copy: the
    CPU waited there for T5 to finish on the GPU, and then the GPU waited while the CPU queued the
    job's first step (its modulation table and embedders, one small operation at a time). Made on
    the device, with the same values (float32, then cast), the CPU queues that work while T5 runs."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_EmbeddedGuidanceEmbedder

    class DeviceGuidance(FluxImageUnit_EmbeddedGuidanceEmbedder):
        def process(self, pipe, embedded_guidance, latents):
            guidance = torch.full((latents.shape[0],), float(embedded_guidance), dtype=torch.float32, device=latents.device)
            return {"guidance": guidance.to(latents.dtype)}

    pipe.units = [DeviceGuidance() if isinstance(u, FluxImageUnit_EmbeddedGuidanceEmbedder) else u for u in pipe.units]


class Engine:
    """One loaded model set. Build with `Engine.load(model_settings)`."""

    def __init__(self, pipe, plan: Plan, root: Path, preset: str):
        self.pipe = pipe
        self.plan = plan
        self.root = root
        self.preset = preset
        self.prompt_cache = _PromptCache()
        self._lock = threading.Lock()
        self.placement: dict[str, tuple[int, int, int]] = {}  # model -> resident, streamed per step, per job
        _install_prompt_cache(pipe, self.prompt_cache)
        _install_device_guidance(pipe)
        _cache_image_ids(pipe.dit)
        if plan.fused_attention:
            attention.install(pipe.dit)
        self.modulations = modulation.Modulations(pipe.dit)
        # The pipeline would move whole models in and out around every phase; placement is ours.
        pipe.load_models_to_device = lambda names: None
        if plan.tiled_vae:
            _tile_vae_decoder(pipe.vae_decoder)
        for name in MODELS:
            offload.configure_linears(getattr(pipe, name), fp8_matmul=plan.fp8_matmul and name == "dit",
                                      fast_accum=plan.fast_accum)
        self.streamers = {
            # Windows: more than the largest streamed block (a double block is 340 MB in float8);
            # T5's feed-forward modules are 250 MB each in bf16.
            "dit": Streamer(plan.device, window=384 * MIB, wrap=True),  # wraps into the next step
            "text_encoder_2": Streamer(plan.device, window=512 * MIB, wrap=False),
            "text_encoder_1": Streamer(plan.device, window=512 * MIB, wrap=False),
        }
        if self._graph_planned():
            # The graph reads one modulation table filled by one matmul: join those weights now,
            # as they move to the GPU (after placement, old and new copies would meet there).
            self.modulations.join_weights(self.device)
        self._place()
        self.compiled = self._maybe_compile()
        self.step_graph = self._maybe_graph()
        self.token_counts_run: set[int] = set()  # image token counts painted since loading
        modulation.install(pipe, self.modulations)  # outside the graph: it fills the table per job

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_settings, *, config_hint: str = "", plan: Plan | None = None) -> "Engine":
        preset = model_settings.preset
        root = weights.require(preset, model_settings.dir, config_hint)
        if preset == "tiny-random":
            from . import tiny
            tiny.write_tiny_model(root)
            tiny.register_with_diffsynth(root)
        plan = plan or make_plan(model_settings)
        log.info("loading %s from %s (%s)", preset, root, plan.describe())
        if plan.device.type == "cuda" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            # Grow allocator segments in place instead of caching fixed blocks: under a budget the
            # reserved memory stays near what is really allocated (measured: 6.13 of 6.33 GiB).
            setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.10
            (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
        restore = _cap_allocator(plan)
        t0 = time.perf_counter()
        try:
            pipe = build_pipeline(weights.model_files(root), plan, t5_fp8=model_settings.t5_fp8)
            engine = cls(pipe, plan, root, preset)
        except BaseException:
            restore()
            raise
        log.info("model loaded in %.1f s", time.perf_counter() - t0)
        return engine

    def _place(self) -> None:
        plan, pipe = self.plan, self.pipe
        dit_bytes = None if plan.dit_resident_gib is None else int(plan.dit_resident_gib * GIB)
        text_bytes = None if plan.text_encoders_resident else 0
        self.placement = {
            "dit": offload.place(pipe.dit, dit_bytes, self.streamers["dit"], pinned=plan.pinned,
                                 per_job=frozenset(map(id, self.modulations.layers))),
            "text_encoder_1": offload.place(pipe.text_encoder_1, text_bytes, self.streamers["text_encoder_1"],
                                            pinned=plan.pinned),
            "text_encoder_2": offload.place(pipe.text_encoder_2, text_bytes, self.streamers["text_encoder_2"],
                                            pinned=plan.pinned),
            "vae_decoder": offload.place(pipe.vae_decoder, None),
        }
        self.modulations.register()
        if plan.device.type == "cuda" and log.isEnabledFor(logging.INFO):
            parts = ", ".join(f"{k} {r / GIB:.2f} GiB resident / {s / GIB:.2f} GiB streamed per step"
                              + (f" / {j / GIB:.2f} GiB copied per job" if j else "")
                              for k, (r, s, j) in self.placement.items())
            log.info("placement: %s", parts)

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
                log.warning("[model] compile = \"on\" ignored: every DiT block streams a non-linear module")
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
        log.info("%d of %d DiT blocks will be compiled on first use (the first image is slower)",
                 len(compilable), len(blocks))
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
    def generate(self, request: GenerationRequest, *, on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None) -> GenerationResult:
        """Paint one image. Blocking; call from a worker thread. Same request -> same pixels."""
        with self._lock:
            return self._generate(request, on_progress, should_cancel)

    def _generate(self, req: GenerationRequest, on_progress, should_cancel) -> GenerationResult:
        cuda = self.device.type == "cuda"
        timings: dict[str, float] = {}
        marks = {"start": time.perf_counter()}
        events: list[torch.cuda.Event] = []  # GPU: denoising starts, then each step ends

        # Progress is honest: a step is reported once the GPU finished it. With the DiT all on the
        # GPU, the CPU queues step i+1 before waiting for step i, so the GPU never idles between
        # steps; with streamed layers it waits at once (the CPU must not run far ahead of copies).
        lag = cuda and self.placement["dit"][1] == 0

        def report(i, n):
            if on_progress is not None:
                on_progress(i, n)

        def timed_event() -> torch.cuda.Event:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def steps(timesteps):
            n = len(timesteps)
            marks["denoise"] = time.perf_counter()
            if cuda:  # GPU-side times: the CPU runs ahead of the GPU, so its clock would blur phases
                events.append(timed_event())
            queued = None  # (event, step) not yet reported
            # One copy for all steps: DiffSynth moves each step's timestep to the GPU with a
            # blocking copy, which would make the CPU wait for the GPU at every step.
            for i, t in enumerate(offload.to_device_nonblocking(timesteps, self.device)):
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled(f"cancelled before step {i + 1}/{n}")
                yield t
                if not cuda:
                    report(i + 1, n)
                    continue
                done = timed_event()
                events.append(done)
                if queued is not None:
                    queued[0].synchronize()
                    report(queued[1], n)
                queued = (done, i + 1)
                if not lag:
                    done.synchronize()
                    report(i + 1, n)
                    queued = None
            if queued is not None:
                queued[0].synchronize()
                report(queued[1], n)
            marks["decode"] = time.perf_counter()

        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if not self.plan.keep_resident:
            self._place()
        try:
            image = self.pipe(
                prompt=req.prompt, seed=req.seed, height=req.height, width=req.width,
                num_inference_steps=req.steps, embedded_guidance=req.guidance,
                progress_bar_cmd=steps,
            )
        except torch.cuda.OutOfMemoryError as exc:
            if self.step_graph is not None:
                self.step_graph.reset()  # its memory pool goes back; the next job captures again
            self.free_memory()
            budget = "unlimited" if self.plan.budget_gib is None else f"{self.plan.budget_gib:g} GiB"
            raise GenerationOOM(f"the GPU ran out of memory at {req.width}x{req.height} (budget {budget}): "
                                f"{str(exc).splitlines()[0]}") from None
        finally:
            self.modulations.clear()
            for streamer in self.streamers.values():
                streamer.flush()
            if not self.plan.keep_resident:
                self._release()
        if cuda:
            torch.cuda.synchronize(self.device)
        self.token_counts_run.add(_image_tokens(req.width, req.height))
        end = time.perf_counter()
        if "denoise" in marks:
            denoised = marks.get("decode", end)
            timings["denoise_s"] = denoised - marks["denoise"]
            if len(events) > 1:
                # From the GPU's clock: the text encoders' queued work is not counted as denoising,
                # and a step's time is that of its kernels, not of the CPU's wait for them.
                timings["denoise_s"] = events[0].elapsed_time(events[-1]) / 1000
                steps_s = [a.elapsed_time(b) / 1000 for a, b in zip(events[1:], events[2:])]
                if steps_s:  # after the first step, which also fills the job's modulation table
                    timings["step_s"] = statistics.median(steps_s)
            timings["text_encode_s"] = denoised - marks["start"] - timings["denoise_s"]
            timings["decode_s"] = end - denoised
        peak = torch.cuda.max_memory_allocated(self.device) / GIB if cuda else None
        return GenerationResult(image=image, request=req, seconds=end - marks["start"],
                                peak_vram_gib=peak, timings=timings)


def _image_tokens(width: int, height: int) -> int:
    """The DiT's image tokens: 8x8-pixel latents in 2x2 patches."""
    return (width // 16) * (height // 16)


# Per CUDA device: (the allocator fraction someone else set, the one the last Engine.load set).
_allocator_fractions: dict[int, tuple[float, float]] = {}


def _cap_allocator(plan: Plan) -> Callable[[], None]:
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


def _cache_image_ids(dit) -> None:
    """DiffSynth builds the image position ids on the CPU and copies them to the GPU at every
    step; that blocking copy made the CPU wait for the GPU each step. They depend on the shape only."""
    prepare = dit.prepare_image_ids
    cache: dict[tuple, torch.Tensor] = {}

    def cached(latents):
        key = (tuple(latents.shape), latents.device, latents.dtype)
        if key not in cache:
            cache.clear()  # one image size at a time is the common case; keep memory flat
            cache[key] = prepare(latents)
        return cache[key]

    dit.prepare_image_ids = cached


def _tile_vae_decoder(decoder) -> None:
    """Decode 512x512-pixel tiles with overlap instead of the whole latent at once."""
    forward = decoder.forward
    inside = threading.local()

    def tiled_forward(sample, **kwargs):
        if getattr(inside, "active", False):  # DiffSynth's tiler calls forward again for each tile
            return forward(sample)
        inside.active = True
        try:
            kwargs.update(tiled=True, tile_size=64, tile_stride=48)
            return forward(sample, **kwargs)
        finally:
            inside.active = False

    decoder.forward = tiled_forward


def _vram(dtype_store, dtype_compute, device, *, stream: bool) -> dict:
    """A DiffSynth per-model VRAM config: stored as `dtype_store` on the CPU, computed in `dtype_compute`."""
    return dict(
        offload_dtype=dtype_store, offload_device="cpu",
        onload_dtype=dtype_store, onload_device="cpu",
        preparing_dtype=dtype_store, preparing_device=str(device) if stream else "cpu",
        computation_dtype=dtype_compute, computation_device=str(device),
    )


def build_pipeline(files: weights.ModelFiles, plan: Plan, *, t5_fp8: bool = False):
    """Load the four models through DiffSynth's own loader (model type found by key/shape hash)."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    _ensure_cpu_empty_cache()
    os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    dev, cdt = plan.device, plan.compute_dtype
    on_gpu = dev.type == "cuda"
    fp8 = torch.float8_e4m3fn
    text_store = fp8 if t5_fp8 else (torch.bfloat16 if on_gpu else cdt)
    enc_store = torch.bfloat16 if on_gpu else cdt
    configs = [
        ModelConfig(path=str(files.dit), **_vram(fp8, cdt, dev, stream=on_gpu)),
        ModelConfig(path=str(files.clip), **_vram(enc_store, cdt, dev, stream=on_gpu)),
        ModelConfig(path=[str(p) for p in files.t5], **_vram(text_store, cdt, dev, stream=on_gpu)),
        ModelConfig(path=str(files.vae), **_vram(enc_store, cdt, dev, stream=on_gpu)),
    ]
    chatter = io.StringIO()  # DiffSynth prints its loading steps; keep them out of our output
    with contextlib.redirect_stdout(chatter):
        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=cdt, device=str(dev), model_configs=configs,
            tokenizer_1_config=ModelConfig(path=str(files.tokenizer)),
            tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
        )
    log.debug("diffsynth: %s", chatter.getvalue())
    for name in MODELS:
        if getattr(pipe, name) is None:
            raise RuntimeError(f"DiffSynth did not recognise the {name} file (unknown key layout)")
    return pipe
