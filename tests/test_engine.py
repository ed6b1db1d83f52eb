"""The real engine (DiffSynth loader, float8 DiT, generation loop) on the tiny random model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bot.engine import fp8, layouts, weights
from bot.engine.api import GenerationCancelled, GenerationRequest
from bot.engine.pipeline import Engine

from conftest import tiny_model_settings


def pixels(result) -> np.ndarray:
    return np.asarray(result.image)


def test_generates_an_image_of_the_requested_size(tiny_engine):
    res = tiny_engine.generate(GenerationRequest("a red cat", seed=7, steps=3, width=256, height=192))
    img = pixels(res)
    assert img.shape == (192, 256, 3)
    assert img.std() > 10, "a flat image means the pipeline produced nothing"
    assert np.isfinite(img).all()
    assert res.seconds > 0
    assert not tiny_engine.compiled  # [model] compile = "auto" is off on the CPU
    assert not tiny_engine.compiles_for(512, 512)  # nothing to compile: no size waits


def test_same_seed_same_pixels_other_seed_differs(tiny_engine):
    req = GenerationRequest("lighthouse at dusk", seed=1234, steps=3, width=128, height=128)
    a = pixels(tiny_engine.generate(req))
    b = pixels(tiny_engine.generate(req))
    c = pixels(tiny_engine.generate(GenerationRequest("lighthouse at dusk", seed=1235, steps=3, width=128, height=128)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_prompt_changes_the_image(tiny_engine):
    a = pixels(tiny_engine.generate(GenerationRequest("a photo of a cat", seed=5, steps=2, width=128, height=128)))
    b = pixels(
        tiny_engine.generate(GenerationRequest("mountains forest river", seed=5, steps=2, width=128, height=128))
    )
    assert not np.array_equal(a, b)


def test_progress_reported_once_per_step(tiny_engine):
    seen = []
    tiny_engine.generate(
        GenerationRequest("x", seed=1, steps=5, width=128, height=128), on_progress=lambda i, n: seen.append((i, n))
    )
    assert seen == [(i, 5) for i in range(1, 6)]


def test_cancel_stops_between_steps(tiny_engine):
    seen = []
    with pytest.raises(GenerationCancelled):
        tiny_engine.generate(
            GenerationRequest("x", seed=1, steps=10, width=128, height=128),
            on_progress=lambda i, n: seen.append(i),
            should_cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]
    # the engine is still usable afterwards
    assert pixels(tiny_engine.generate(GenerationRequest("x", seed=1, steps=1, width=128, height=128))).std() > 0


def test_dit_weights_are_stored_in_float8(tiny_engine):
    from diffsynth.core.vram.layers import AutoWrappedLinear

    linears = [m for m in tiny_engine.pipe.dit.modules() if isinstance(m, AutoWrappedLinear)]
    assert len(linears) > 10
    assert {m.weight.dtype for m in linears} == {torch.float8_e4m3fn}
    # text encoders and VAE are not float8
    assert all(p.dtype != torch.float8_e4m3fn for p in tiny_engine.pipe.text_encoder_2.parameters())
    assert all(p.dtype != torch.float8_e4m3fn for p in tiny_engine.pipe.vae_decoder.parameters())


def test_full_size_1024_image_is_noise_not_black(tiny_engine):
    img = pixels(tiny_engine.generate(GenerationRequest("a bowl of fruit", seed=3, steps=2, width=1024, height=1024)))
    assert img.shape == (1024, 1024, 3)
    assert 20 < img.mean() < 235 and img.std() > 10


def test_prompt_cache_serves_repeated_prompts(tiny_engine):
    before = tiny_engine.prompt_cache.hits
    req = GenerationRequest("cached prompt", seed=1, steps=1, width=128, height=128)
    a = pixels(tiny_engine.generate(req))
    b = pixels(tiny_engine.generate(req))
    assert tiny_engine.prompt_cache.hits == before + 1
    assert np.array_equal(a, b)


def test_tiny_files_use_the_real_layout(model_dir):
    from safetensors import safe_open

    files = weights.model_files(model_dir / weights.TINY_SUBDIR)
    with safe_open(str(files.dit), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in keys
    assert "model.diffusion_model.single_blocks.0.linear1.weight" in keys
    with safe_open(str(files.vae), "pt") as f:
        keys = set(f.keys())
    assert "decoder.conv_in.weight" in keys and "encoder.conv_in.weight" in keys
    assert len(files.t5) == 2


def test_missing_weights_name_each_file_and_the_fetch_command(tmp_path):
    (tmp_path / weights.FLUX_DIR).mkdir(parents=True)
    (tmp_path / weights.FLUX_DIR / "ae.safetensors").write_bytes(b"x")
    with pytest.raises(weights.MissingWeightsError) as err:
        Engine.load(tiny_model_settings(tmp_path, preset="majicflus"), config_hint="my.toml")
    msg = str(err.value)
    assert "majicflus_v134.safetensors" in msg
    assert "text_encoder/model.safetensors" in msg
    assert "text_encoder_2" in msg and "tokenizer_2" in msg
    assert "ae.safetensors" not in msg  # present, so not listed
    assert "fluxbot download --config my.toml" in msg


def _hash(state_dict) -> str:
    import hashlib

    from diffsynth.core.loader.file import convert_state_dict_keys_to_single_str

    return hashlib.md5(convert_state_dict_keys_to_single_str(state_dict, with_shape=True).encode()).hexdigest()


def _registered(name: str) -> set[str]:
    from diffsynth.configs import MODEL_CONFIGS

    return {
        c["model_hash"] for c in MODEL_CONFIGS if c["model_name"] == name and c["model_class"].startswith("diffsynth.")
    }


def test_full_size_layouts_match_diffsynth_registry():
    """The layout writers reproduce the real files' key/shape hashes, so full-size random
    models (benchmarks) load through the real model-type detection."""
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.models.flux_text_encoder_clip import FluxTextEncoderClip
    from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5
    from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder

    with torch.device("meta"):
        dit, clip, t5 = FluxDiT(), FluxTextEncoderClip(), FluxTextEncoderT5()
        enc, dec = FluxVAEEncoder(), FluxVAEDecoder()
    assert _hash(layouts.dit_to_bfl(dit.state_dict())) in _registered("flux_dit")
    assert _hash(layouts.clip_to_transformers(clip.state_dict())) in _registered("flux_text_encoder_clip")
    assert _hash(layouts.t5_to_transformers(t5.state_dict())) in _registered("flux_text_encoder_t5")
    assert _hash(layouts.vae_to_bfl(enc.state_dict(), dec.state_dict())) in _registered("flux_vae_decoder")


def test_download_asks_modelscope_for_exactly_the_needed_files(tmp_path):
    calls = []

    def fake_snapshot_download(repo, local_dir, allow_file_pattern):
        calls.append((repo, local_dir, list(allow_file_pattern)))

    missing = weights.download(tmp_path, snapshot_download=fake_snapshot_download)
    assert calls == [
        ("MAILAND/majicflus_v1", str(tmp_path / "MAILAND/majicflus_v1"), ["majicflus_v134.safetensors"]),
        (
            "black-forest-labs/FLUX.1-dev",
            str(tmp_path / "black-forest-labs/FLUX.1-dev"),
            ["ae.safetensors", "text_encoder/model.safetensors", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"],
        ),
    ]
    assert "MAILAND/majicflus_v1/majicflus_v134.safetensors" in missing  # nothing was really fetched


def streaming_cpu_plan(resident_gib: float, compile: str = "off"):
    """A CPU plan with a budget far too small for the tiny model: most layers stream."""
    from bot.engine.budget import Plan

    return Plan(
        device=torch.device("cpu"),
        compute_dtype=torch.float32,
        budget_gib=0.01,
        dit_resident_gib=resident_gib,
        text_encoders_resident=False,
        keep_resident=True,
        fp8_matmul=False,
        pinned=False,
        compile=compile,
    )


def test_the_dit_is_not_copied_into_host_memory_at_load(tiny_engine):
    """The loader hands out views of the memory-mapped float8 file instead of copies (DiffSynth's
    own `DiskMap` clones every tensor); on the CPU the weights stay those views. A layer that is
    page-locked for streaming gets memory of its own first (locking a view would lock the file)."""
    from diffsynth.core.vram.layers import AutoWrappedLinear

    from bot.engine.loading import is_file_backed
    from bot.engine.offload import own_copy

    linears = [m for m in tiny_engine.pipe.dit.modules() if isinstance(m, AutoWrappedLinear)]
    assert linears and all(is_file_backed(m.weight) and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    weight = linears[0].weight.data
    copy = own_copy(weight)
    assert not is_file_backed(copy) and torch.equal(copy.float(), weight.float())
    # T5 is stored in bf16 in its file and computed in float32 on the CPU: a cast, so a copy.
    t5 = [m for m in tiny_engine.pipe.text_encoder_2.modules() if isinstance(m, AutoWrappedLinear)]
    assert t5 and not any(is_file_backed(m.weight) for m in t5)


def test_streamed_placement_paints_the_same_pixels(model_dir, tiny_engine):
    """A budget too small for the model streams most layers (prefetching the next ones); the
    image must not change."""
    streamed = Engine.load(tiny_model_settings(model_dir), plan=streaming_cpu_plan(0.0001))
    dit = streamed.placement.dit
    resident, moved, per_job = dit.resident, dit.streamed, dit.per_job
    assert moved > resident > 0
    assert per_job > 0  # the modulation layers: copied in once per job, not every step
    assert streamed.placement.text_encoder_2.streamed > 0
    req = GenerationRequest("a streamed cat", seed=11, steps=3, width=128, height=128)
    a = pixels(streamed.generate(req))
    b = pixels(streamed.generate(req))
    c = pixels(tiny_engine.generate(req))
    assert np.array_equal(a, c) and np.array_equal(b, c)
    dit_streamer = streamed.streamers["dit"]
    assert not dit_streamer.recording and len(dit_streamer.order) > 5  # order learned, prefetching on
    assert dit_streamer.copied_bytes > 3 * moved  # every step copies the streamed part again
    assert dit_streamer.pending == {}  # flushed after each job


def fresh_dynamo():
    """Forget every compiled graph and Dynamo's counters, so a test counts only its own graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


@pytest.mark.parametrize("fused_attention", ["off", "on"])
def test_compiled_blocks_paint_the_same_image(model_dir, tiny_engine, fused_attention):
    """[model] compile = "on": the DiT blocks go through torch.compile without graph breaks, also
    with the attention-inputs op (its PyTorch path here, traced into the graph)."""
    counters = fresh_dynamo()  # the other parameter's graphs would be reused
    compiled = Engine.load(tiny_model_settings(model_dir, compile="on", fused_attention=fused_attention))
    assert compiled.compiled
    from bot.engine import attention

    installed = {b.attn.forward.__func__ is attention._joint_attention_forward for b in compiled.pipe.dit.blocks}
    assert installed == {fused_attention == "on"}
    req = GenerationRequest("compiled cat", seed=4, steps=2, width=128, height=128)
    a = pixels(compiled.generate(req)).astype(int)
    b = pixels(tiny_engine.generate(req)).astype(int)
    assert np.abs(a - b).max() <= 2  # fused kernels round differently, nothing more
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 2


def test_each_image_size_gets_its_own_compiled_graph(model_dir):
    """Compiled blocks specialise to each image size: three sizes, three graphs per block class
    (Dynamo's automatic dynamic shapes would have served the third size from a shape-generic graph
    made for the second, and the first size's later jobs too)."""
    counters = fresh_dynamo()
    engine = Engine.load(tiny_model_settings(model_dir, compile="on"))
    for width, height in ((128, 128), (192, 128), (256, 128)):  # 64, 96 and 128 image tokens
        assert engine.compiles_for(width, height)  # what the bot tells the member before the job
        engine.generate(GenerationRequest("sizes", seed=1, steps=1, width=width, height=height))
        assert not engine.compiles_for(width, height)
    assert counters["stats"]["unique_graphs"] == 3 * 2 and not counters["graph_break"]
    assert engine.compiles_for(320, 128)
    # The same tokens the other way round (portrait after landscape): the blocks' graph is reused.
    assert not engine.compiles_for(128, 192)
    engine.generate(GenerationRequest("sizes", seed=1, steps=1, width=128, height=192))
    assert counters["stats"]["unique_graphs"] == 3 * 2


def test_blocks_with_streamed_layers_compile_too(model_dir, tiny_engine):
    """A streamed linear layer is one opaque op in the compiled graph: blocks whose weights stream
    compile without graph breaks, are not re-traced on the next job, and paint the same image."""
    req = GenerationRequest("streamed and compiled", seed=6, steps=2, width=128, height=128)
    reference = pixels(tiny_engine.generate(req)).astype(int)
    for resident_gib in (0.0001, 0.0005):  # every block streams; one block fits, the other streams
        counters = fresh_dynamo()  # graphs compiled by earlier engines would be reused
        engine = Engine.load(tiny_model_settings(model_dir), plan=streaming_cpu_plan(resident_gib, compile="on"))
        assert engine.compiled and engine.placement.dit.streamed > 0
        a = pixels(engine.generate(req)).astype(int)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2 and not counters["graph_break"]  # one per block class
        b = pixels(engine.generate(req)).astype(int)
        assert counters["stats"]["unique_graphs"] == graphs  # no re-tracing on the next job
        assert np.abs(a - b).max() == 0
        assert np.abs(a - reference).max() <= 2  # fused kernels round differently, nothing more
        assert engine.streamers["dit"].copied_bytes > 2 * engine.placement.dit.streamed  # it really streamed


def test_resident_blocks_are_spread_between_streamed_ones():
    """With a third of the blocks resident, every third block stays: the copy engine always has
    a streamed block to fetch while a resident one computes. Loose layers are kept first."""
    from bot.engine.offload import choose_resident

    sizes = [("x_embedder", 10, False)] + [(f"blocks.{i}", 100, True) for i in range(9)] + [("final", 5, False)]
    keep = choose_resident(sizes, 15 + 300)
    assert keep == {"x_embedder", "final", "blocks.1", "blocks.4", "blocks.7"}
    assert choose_resident(sizes, 0) == set()
    assert choose_resident(sizes, 10_000) == {g for g, _, _ in sizes}
    assert choose_resident(sizes, 12) == {"x_embedder"}  # too small for any block


def test_streamer_prefetches_within_its_window():
    """Once the order is learnt, fetching a layer queues copies of the next ones up to the window
    (at least one), wrapping into the next step; a hit uses the queued copy."""
    from bot.engine.streaming import Streamer

    class Layer:
        def __init__(self, n):
            self._stream_sources = [torch.full((n,), float(n))]

    layers = [Layer(25), Layer(25), Layer(25), Layer(100)]  # 100, 100, 100 and 400 bytes
    streamer = Streamer(torch.device("cpu"), window=250, wrap=True)
    for layer in layers + layers[:1]:  # one pass records the order; the second starts prefetching
        (t,) = streamer.fetch(layer)
        assert torch.equal(t, layer._stream_sources[0])
    assert not streamer.recording
    assert set(streamer.pending) == {id(layers[1]), id(layers[2])} and streamer.pending_bytes == 200
    streamer.fetch(layers[1])  # a hit: the window moves on but layer 3 (400 B) does not fit beside layer 2
    assert set(streamer.pending) == {id(layers[2])} and streamer.pending_bytes == 100
    streamer.fetch(layers[2])  # nothing pending: the big layer goes alone
    assert set(streamer.pending) == {id(layers[3])} and streamer.pending_bytes == 400
    copied = streamer.copied_bytes
    streamer.fetch(layers[3])  # a hit; the window wraps round to the first layers of the next step
    assert streamer.copied_bytes == copied + 200 and set(streamer.pending) == {id(layers[0]), id(layers[1])}
    streamer.flush()
    assert streamer.pending == {} and streamer.pending_bytes == 0


def test_the_h2d_cap_is_refused_off_the_gpu():
    """`Streamer.cap_rate` emulates a slower PCIe link for benchmarks: meaningless on the CPU."""
    from bot.engine.streaming import Streamer

    with pytest.raises(ValueError, match="CUDA"):
        Streamer(torch.device("cpu")).cap_rate(13.0)


def test_t5_fp8_stores_the_text_encoder_in_float8(model_dir, tiny_engine, monkeypatch):
    """[model] t5_fp8 = true (opt-in): T5's matrices, feed-forward blocks included, are stored in
    float8 (only norms stay in the compute dtype); the image changes only slightly."""
    from bot.engine import offload

    monkeypatch.setattr(offload, "SMALL_BYTES", 1024)  # the tiny model's blocks are all "small" otherwise
    small = Engine.load(tiny_model_settings(model_dir, t5_fp8=True))
    t5 = small.pipe.text_encoder_2
    matrices = {n: p.dtype for n, p in t5.named_parameters() if p.dim() == 2 and p.numel() >= 32 * 32}
    assert any("DenseReluDense" in n for n in matrices) and set(matrices.values()) == {torch.float8_e4m3fn}
    req = GenerationRequest("a float8 cat", seed=8, steps=2, width=128, height=128)
    a = pixels(small.generate(req)).astype(int)
    b = pixels(tiny_engine.generate(req)).astype(int)
    assert a.std() > 10 and np.abs(a - b).mean() < 40


def test_keep_resident_off_releases_and_replaces_between_jobs(model_dir, tiny_engine):
    """[model] keep_resident = "off" (e.g. a GPU shared with games): every job places the model and
    gives the memory back afterwards; the pixels do not change."""
    from diffsynth.core.vram.layers import AutoTorchModule

    engine = Engine.load(tiny_model_settings(model_dir, keep_resident="off"))
    assert not engine.plan.keep_resident
    req = GenerationRequest("a shy cat", seed=9, steps=2, width=128, height=128)
    a = pixels(engine.generate(req))
    states = {m.state for m in engine.pipe.dit.modules() if isinstance(m, AutoTorchModule)}
    assert states == {0}  # released after the job
    b = pixels(engine.generate(req))
    assert np.array_equal(a, b) and np.array_equal(a, pixels(tiny_engine.generate(req)))


def card_plan(monkeypatch, capability, total_gib, **settings):
    """The plan `make_plan` makes for a CUDA card of this compute capability and memory (the card
    faked, the rest of the machine as it is); settings default to an 8 GB budget."""
    from bot.engine import budget

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: SimpleNamespace(total_memory=int(total_gib * budget.GIB)),
    )
    model = tiny_model_settings(Path("unused"), **{"vram_limit_gb": 8.0, **settings})
    return budget.make_plan(model, torch.device("cuda", 0))


def test_plan_follows_the_card(monkeypatch):
    """What the engine decides from the card: float8 matmuls (and their fast accumulation) on Ada
    and Hopper only, the DiT share that fits the budget, T5 streamed below 30 GB."""

    from bot.engine import budget

    monkeypatch.setattr(budget, "kernel_build_missing", lambda: [])  # a machine that builds GPU kernels

    def plan_for(capability, total_gib, **settings):
        return card_plan(monkeypatch, capability, total_gib, **settings)

    hopper = plan_for((9, 0), 80)
    assert (hopper.fp8_matmul, hopper.fast_accum) == (True, True)
    assert hopper.dit_resident_gib == 8 - budget.HEADROOM_GIB and hopper.budget_gib == 8
    assert not hopper.text_encoders_resident and hopper.tiled_vae
    # PyTorch may reserve what the whole process may take (7 GiB of an 8 GB card) less the context.
    assert hopper.allocator_cap_gib == 8 - budget.CARD_KEEPS_GIB - budget.CONTEXT_GIB == 6.25
    # A budget too small to keep: the cap still leaves what a step needs with the DiT all streamed.
    assert plan_for((9, 0), 80, vram_limit_gb=2.5).allocator_cap_gib == budget.MIN_ALLOCATOR_CAP_GIB
    assert plan_for((9, 0), 80, fast_accum="off").fast_accum is False
    assert plan_for((9, 0), 80, fp8_matmul="off").fast_accum is False  # nothing to accumulate
    turing = plan_for((7, 5), 11)
    assert (turing.fp8_matmul, turing.fast_accum) == (False, False)
    assert turing.budget_gib == 8
    unlimited = plan_for((8, 9), 48, vram_limit_gb=None)
    assert unlimited.budget_gib is None and unlimited.dit_resident_gib is None and unlimited.text_encoders_resident
    assert unlimited.allocator_cap_gib is None
    assert plan_for((8, 9), 24, vram_limit_gb=24).allocator_cap_gib is None  # the whole card: its own limit
    # CUDA graphs need the whole DiT resident for good: on without a budget only, forced either way.
    assert unlimited.cuda_graphs and not plan_for((8, 9), 24, vram_limit_gb=None).cuda_graphs
    assert not hopper.cuda_graphs and not plan_for((8, 9), 80, vram_limit_gb=24).cuda_graphs
    assert plan_for((9, 0), 80, cuda_graphs="on").cuda_graphs
    assert not plan_for((9, 0), 80, vram_limit_gb=None, cuda_graphs="off").cuda_graphs
    # The one-kernel attention inputs: on Ampere and newer wherever Triton is (every budget), unless
    # switched off; not on Turing (no bf16 in hardware), even when asked for.
    from bot.engine import attention

    assert hopper.fused_attention == plan_for((8, 6), 12).fused_attention == attention.kernel_available()
    assert not turing.fused_attention and not plan_for((7, 5), 11, fused_attention="on").fused_attention
    assert not plan_for((9, 0), 80, fused_attention="off").fused_attention
    monkeypatch.setattr(attention, "triton", None)
    assert not plan_for((9, 0), 80, fused_attention="on").fused_attention  # no Triton: a warning, not a crash


def test_without_a_c_compiler_the_gpu_runs_plain_kernels(monkeypatch, caplog, kernel_toolchain):
    """Triton builds its launchers with a C compiler and Python's headers. Where either is missing
    (a slim container), a GPU plan turns off what needs Triton, with the fix in a warning, instead
    of failing at the first compiled call mid-job."""
    import shutil

    from bot.engine import budget

    settings = dict(compile="on", fp8_matmul="on", fused_attention="auto")
    assert budget.kernel_build_missing() == []
    assert card_plan(monkeypatch, (9, 0), 80, **settings).compile == "on"

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert budget.kernel_build_missing() == ["a C compiler (gcc or clang)"]
    with caplog.at_level("WARNING", logger="fluxbot.engine"):
        plan = card_plan(monkeypatch, (9, 0), 80, **settings)
    assert (plan.compile, plan.fp8_matmul, plan.fast_accum, plan.fused_attention) == ("off", False, False, False)
    assert plan.budget_gib == 8  # the rest of the plan is the card's as before
    assert "apt install gcc python3-dev" in caplog.text and "a C compiler" in caplog.text
    monkeypatch.setenv("CC", "cc-of-my-choice")  # Triton takes $CC as it is
    assert budget.kernel_build_missing() == []

    kernel_toolchain.unlink()
    assert budget.kernel_build_missing() == ["Python's C headers (Python.h)"]


def test_the_allocator_cap_never_rises_above_anothers(monkeypatch):
    """The engine lowers PyTorch's allocator fraction to its cap, never raises a lower one someone
    else set (a benchmark emulating a card), and an Engine without a cap, or a failed load, puts
    back what was there before."""
    from bot.engine import budget
    from bot.engine.budget import GIB, Plan

    total = 85_017_624_576  # an H100's bytes: fractions of it do not come out whole
    card = {"allowed": total}
    # As PyTorch does: it keeps the allowed bytes and reads back bytes / total, not the fraction set.
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: card["allowed"] / total)
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, device=None: card.__setitem__("allowed", int(fraction * total)),
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=total))
    monkeypatch.setattr(budget, "_allocator_fractions", {})

    def cap(gib):
        return budget.cap_allocator(
            Plan(torch.device("cuda", 0), torch.bfloat16, 8.0, 4.75, False, True, True, True, allocator_cap_gib=gib)
        )

    def allowed_gib():
        return pytest.approx(card["allowed"] / GIB, abs=1e-6)

    cap(6.25)
    assert allowed_gib() == 6.25
    cap(None)
    assert card["allowed"] == total  # ours undone
    torch.cuda.set_per_process_memory_fraction(6.323 * GIB / total)  # a harness caps the card
    cap(22.25)
    assert allowed_gib() == 6.323  # not raised
    cap(6.25)
    assert allowed_gib() == 6.25  # lowered
    cap(None)
    assert allowed_gib() == 6.323  # theirs back, not the whole card
    cap(1.3)  # a cap PyTorch reads back rounded (as 0.5 GiB did on an H100: its total is another)
    assert allowed_gib() == 1.3
    cap(None)
    assert allowed_gib() == 6.323  # theirs back: our rounded cap not taken for someone else's
    restore = cap(2.0)
    assert allowed_gib() == 2.0
    restore()  # the load failed
    assert allowed_gib() == 6.323
    cap(None)
    assert allowed_gib() == 6.323


def test_modulations_are_computed_once_per_job(model_dir, tiny_engine):
    """Every AdaLN modulation layer runs once at a job's first step, over all the steps'
    conditionings; each step reads its row. Computing them step by step paints the same image."""
    engine = Engine.load(tiny_model_settings(model_dir))
    mods = engine.modulations
    dit = engine.pipe.dit
    assert len(mods.layers) == 2 * len(dit.blocks) + len(dit.single_blocks) + 1  # + the final norm
    rows_seen: list[int] = []
    for layer in mods.layers:
        direct = layer._direct_forward
        layer._direct_forward = lambda x, direct=direct: (rows_seen.append(x.shape[0]), direct(x))[1]
    live = []
    req = GenerationRequest("a modulated cat", seed=12, steps=4, width=128, height=128)
    a = pixels(engine.generate(req, on_progress=lambda i, n: live.append(mods.ready)))
    assert rows_seen == [4] * len(mods.layers)  # one call per layer, all four steps at once
    assert live == [True] * 4 and not mods.ready and mods.rows is None  # used during the job, dropped after it
    rows_seen.clear()
    mods.enabled = False  # the step-by-step way, for comparison
    b = pixels(engine.generate(req))
    assert rows_seen == [1] * (4 * len(mods.layers))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert np.abs(a.astype(int) - pixels(tiny_engine.generate(req)).astype(int)).max() <= 2
    # The CUDA-graph layout (the weights joined into one matrix, the outputs into one table, each
    # step's row copied into a fixed buffer) reads the same numbers: the same pixels.
    mods.enabled = True
    before = {id(m): (m.weight.detach().clone(), m.bias.detach().clone()) for m in mods.layers}
    assert mods.join_weights()
    for m in mods.layers:
        assert m.weight.untyped_storage().data_ptr() == mods.weight.untyped_storage().data_ptr()
        assert m.bias.untyped_storage().data_ptr() == mods.bias.untyped_storage().data_ptr()
        assert torch.equal(m.weight, before[id(m)][0]) and torch.equal(m.bias, before[id(m)][1])
    seen: list = []
    c = pixels(engine.generate(req, on_progress=lambda i, n: seen.append((mods.table is not None, mods.rows is None))))
    assert np.array_equal(a, c) and seen == [(True, True)] * 4
    width = sum(m.weight.shape[0] for m in mods.layers)
    assert mods.weight.shape[0] == width and mods.current.shape == (1, width)
    last = mods.layers[-1]
    offset, w = mods.slices[id(last)]
    assert offset + w == width


def test_joined_modulation_weights_fill_the_table_in_one_float8_matmul(model_dir, monkeypatch):
    """For a CUDA graph the modulation layers' weights become views of one matrix, and a job's
    whole table is one float8 matmul: the same numbers as each layer's own float8 matmul."""
    engine = Engine.load(tiny_model_settings(model_dir))
    mods = engine.modulations
    fp8.configure_linears(engine.pipe.dit, fp8_matmul=True)  # as on an Ada or Hopper card
    assert all(m.keep_fp8 for m in mods.layers)
    x = torch.nn.functional.silu(torch.randn(5, mods.layers[0].in_features, generator=torch.Generator().manual_seed(3)))
    want = torch.cat([m._direct_forward(x) for m in mods.layers], dim=-1)
    assert mods.join_weights()
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (calls.append(a[1].shape), scaled_mm(*a, **k))[1])
    got = mods._joined_forward(x)
    assert calls == [(mods.layers[0].in_features, sum(m.out_features for m in mods.layers))]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_is_made_on_the_device_with_diffsynths_values(tiny_engine):
    """The engine's guidance unit (no blocking copy) gives the tensor DiffSynth's own unit gives:
    the same values, dtype and device, for guidance values that do and do not round; for a batch
    (a grid) one value for all its images, so the conditioning stays one row (engine/batch.py)."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_EmbeddedGuidanceEmbedder

    ours = [u for u in tiny_engine.pipe.units if isinstance(u, FluxImageUnit_EmbeddedGuidanceEmbedder)]
    assert len(ours) == 1 and type(ours[0]) is not FluxImageUnit_EmbeddedGuidanceEmbedder
    for dtype in (torch.float32, torch.bfloat16):
        for value in (3.5, 3.3, 1.0, 10.123456789):
            one = torch.zeros(1, 16, 8, 8, dtype=dtype)
            want = FluxImageUnit_EmbeddedGuidanceEmbedder().process(tiny_engine.pipe, value, one)["guidance"]
            got = ours[0].process(tiny_engine.pipe, value, one)["guidance"]
            assert got.dtype == want.dtype == dtype and got.device == want.device
            assert torch.equal(got, want)
            batch = torch.zeros(3, 16, 8, 8, dtype=dtype)
            assert torch.equal(ours[0].process(tiny_engine.pipe, value, batch)["guidance"], want)


@pytest.fixture
def inductor_state(monkeypatch):
    """configure() changes process-wide Inductor state: put it back after the test."""
    import torch._inductor.config as config
    from torch._inductor import decomposition
    from torch._inductor.choices import InductorChoices

    monkeypatch.setattr(
        InductorChoices, "should_use_persistent_reduction", InductorChoices.__dict__["should_use_persistent_reduction"]
    )
    monkeypatch.setitem(
        decomposition.decompositions,
        torch.ops.aten.gelu.default,
        decomposition.decompositions[torch.ops.aten.gelu.default],
    )
    with config.patch(
        split_reductions=config.split_reductions, coordinate_descent_tuning=config.coordinate_descent_tuning
    ):
        yield
    decomposition.fast_random_decomps.cache_clear()


def test_inductor_compiles_tanh_gelu_through_sigmoid(inductor_state):
    """The compiled DiT's GELU (bot/engine/inductor.py) is the same function as torch's, and
    Inductor's decomposition table really holds it after configure()."""
    from torch._inductor.decomposition import select_decomp_table

    from bot.engine import inductor

    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    for approximate in ("tanh", "none"):
        want = torch.nn.functional.gelu(x, approximate=approximate)
        assert torch.allclose(inductor.gelu_as_sigmoid(x, approximate), want, rtol=0, atol=1e-12)
    inductor.configure()
    assert select_decomp_table()[torch.ops.aten.gelu.default] is inductor.gelu_as_sigmoid


def test_inductor_keeps_rows_up_to_16384_in_one_pass(inductor_state):
    """After configure(), Inductor's heuristic keeps a row-wise (inner) reduction of up to 16384
    elements persistent (the 15360-wide rows of FLUX's single blocks) and nothing wider; other
    reductions keep Inductor's own rule; reductions are not split; a second configure() does not
    wrap the rule twice."""
    import sympy
    import torch._inductor.config as config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from bot.engine import inductor

    inductor.configure()
    inductor.configure()
    rule = InductorChoices.should_use_persistent_reduction
    assert rule._fluxbot_limit == inductor.PERSISTENT_ROW_LIMIT == 16384
    assert not hasattr(rule._fluxbot_default, "_fluxbot_limit")  # Inductor's own, not ours again
    assert config.split_reductions is False and config.coordinate_descent_tuning is True

    class Kernel:  # what the rule reads of a kernel's reduction
        def __init__(self, numel, hint, strict_rblock=None):
            self.reduction_numel, self.hint = sympy.Integer(numel), hint
            self.numel, self.strict_rblock = sympy.Integer(4608 * numel), strict_rblock

        def get_reduction_hint(self, *args):
            return self.hint

        def strict_sum_rblock(self):
            return self.strict_rblock

        def has_strict_sum_multirow_reduction(self):
            return False

    sizevars = SimpleNamespace(
        statically_known_leq=lambda a, b: a <= b,
        statically_known_geq=lambda a, b: a >= b,
        optimization_hint=lambda expr: int(expr),
    )
    with V.set_graph_handler(SimpleNamespace(sizevars=sizevars)):
        persistent = {n: rule(Kernel(n, ReductionHint.INNER), False) for n in (128, 3072, 12288, 15360, 16384, 16385)}
        outer = rule(Kernel(15360, ReductionHint.OUTER), False)
        strict = rule(Kernel(3072, ReductionHint.INNER, strict_rblock=64), False)  # strict numerics: Inductor's "no"
        cooperative = rule(Kernel(3072, ReductionHint.INNER), True)
    assert persistent == {128: True, 3072: True, 12288: True, 15360: True, 16384: True, 16385: False}
    assert outer is False and strict is False and cooperative is False
