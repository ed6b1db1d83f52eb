"""Vary's img2img and Upscale's tiled pass in the real engine (DiffSynth pipeline, tiny random model,
CPU), the tiler under them, and the plan's choice of 2x or 1.5x. The CUDA-graph cases run on a GPU box
only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bot.engine import budget, tiling
from bot.engine.api import MAX_UPSCALED_PIXELS, GenerationRequest, SourceImageMissing
from bot.engine.budget import Plan
from bot.engine.pipeline import Engine, _dit_tile
from bot.images import save_png

from conftest import tiny_model_settings


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


@pytest.fixture
def source(tiny_engine, tmp_path) -> Path:
    """A 128x128 result on disk, as a finished job leaves it."""
    result = tiny_engine.generate(GenerationRequest("a red cat", seed=11, steps=3, width=128, height=128))
    return save_png(result.image, tmp_path / "job-1.png", {"prompt": "a red cat"})


def vary(path: Path, *, seed: int = 5, strength: float = 0.48, size: int = 128, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(
        "a red cat", seed=seed, steps=steps, width=size, height=size, strength=strength, source_path=str(path)
    )


# ---------------------------------------------------------------- Vary: img2img


def test_img2img_keeps_the_size_and_seed_and_differs_from_its_source(tiny_engine, source):
    src = np.asarray(Image.open(source).convert("RGB")).astype(int)
    a, b = pixels(tiny_engine.generate(vary(source))), pixels(tiny_engine.generate(vary(source)))
    assert a.shape == src.shape == (128, 128, 3)
    assert np.array_equal(a, b)  # same request, same pixels
    assert np.abs(a - src).mean() > 1  # a new image, not the source handed back
    other = pixels(tiny_engine.generate(vary(source, seed=6)))
    assert np.abs(a - other).mean() > 1  # the new seed matters
    text_to_image = pixels(tiny_engine.generate(GenerationRequest("a red cat", seed=5, steps=3, width=128, height=128)))
    assert not np.array_equal(a, text_to_image)  # it started from the source, not from noise alone
    assert np.isfinite(a).all() and a.std() > 10


def test_strength_sets_how_much_of_the_source_the_first_step_starts_from(tiny_engine, source, monkeypatch):
    """DiffSynth's img2img: the first latents are the encoded source noised to the strength's sigma,
    (1 - sigma) x0 + sigma n. Subtle starts nearer the source than strong."""
    pipe = tiny_engine.pipe
    with torch.no_grad():
        image = pipe.preprocess_image(Image.open(source).convert("RGB")).to(device=pipe.device, dtype=pipe.torch_dtype)
        x0 = pipe.vae_encoder(image).float()
    seen: list[torch.Tensor] = []
    inner = tiny_engine.dit_tiles.model_fn

    def recording(**kwargs):
        if kwargs.get("progress_id") == 0:
            seen.append(kwargs["latents"].detach().float().clone())
        return inner(**kwargs)

    monkeypatch.setattr(tiny_engine.dit_tiles, "model_fn", recording)
    found = {}
    for strength in (0.3, 0.48, 0.75):
        tiny_engine.generate(vary(source, strength=strength))
        sigma = float(pipe.scheduler.sigmas[0])
        first = seen[-1]
        noise = (first - (1 - sigma) * x0) / sigma  # what was added: standard normal noise if img2img ran
        assert abs(float(noise.std()) - 1) < 0.15 and abs(float(noise.mean())) < 0.15, (strength, sigma)
        found[strength] = (sigma, float(torch.corrcoef(torch.stack([first.flatten(), x0.flatten()]))[0, 1]))
    sigmas = [found[s][0] for s in (0.3, 0.48, 0.75)]
    correlations = [found[s][1] for s in (0.3, 0.48, 0.75)]
    assert sigmas == sorted(sigmas) and sigmas[-1] < 1  # lower strength, less noise; never pure noise
    assert correlations == sorted(correlations, reverse=True)


def test_img2img_reports_every_step(tiny_engine, source):
    seen = []
    tiny_engine.generate(vary(source, steps=4), on_progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(1, 5)]


def test_a_missing_source_is_its_own_error_and_the_engine_goes_on(tiny_engine, tmp_path):
    with pytest.raises(SourceImageMissing):
        tiny_engine.generate(vary(tmp_path / "gone.png"))
    (tmp_path / "not-an-image.png").write_bytes(b"not a png")
    with pytest.raises(SourceImageMissing):
        tiny_engine.generate(vary(tmp_path / "not-an-image.png"))
    ok = tiny_engine.generate(GenerationRequest("x", seed=1, steps=1, width=128, height=128))
    assert pixels(ok).std() > 0 and tiny_engine.dit_tiles.tile is None


# ---------------------------------------------------------------- Upscale: the tiled pass


def test_upscale_doubles_both_sides_in_tiles_of_the_source_size(tiny_engine, source):
    assert tiny_engine.upscale_size(128, 128) == (256, 256)
    runs = tiny_engine.dit_tiles.runs
    result = tiny_engine.generate(vary(source, strength=0.3, size=256, steps=2))
    img = pixels(result)
    assert img.shape == (256, 256, 3) and np.isfinite(img).all() and img.std() > 10
    # 256 px is 32 latents a side; tiles of the source's 16, half a tile apart: 3 x 3 tiles, every step.
    assert tiny_engine.dit_tiles.runs - runs == 9 * 2 == result.timings["dit_tile_forwards"]
    assert tiny_engine.dit_tiles.tile is None and not tiny_engine.vae_tiles.encode  # reset for the next job
    again = pixels(tiny_engine.generate(vary(source, strength=0.3, size=256, steps=2)))
    assert np.array_equal(img, again)


def test_an_upscale_encodes_and_decodes_in_tiles_that_cover_every_pixel(tiny_engine, source, monkeypatch):
    """Smaller VAE tiles than the real ones, so a 256-pixel image is tiled on both sides of the VAE."""
    monkeypatch.setattr(tiling, "VAE_DECODE_TILE", 16)
    monkeypatch.setattr(tiling, "VAE_DECODE_STRIDE", 12)
    monkeypatch.setattr(tiling, "VAE_ENCODE_TILE", 128)
    monkeypatch.setattr(tiling, "VAE_ENCODE_STRIDE", 88)
    calls: dict[str, list[int]] = {"encode": [], "decode": [], "dit": []}
    real = tiling.tiled

    def counting(fn, x, tile, stride, *, scale=1.0, align=1):
        kind = "decode" if scale > 1 else "encode" if scale < 1 else "dit"
        calls[kind].append(tiling.tile_count(*x.shape[-2:], tile, stride, align))
        return real(fn, x, tile, stride, scale=scale, align=align)

    monkeypatch.setattr(tiling, "tiled", counting)
    img = pixels(tiny_engine.generate(vary(source, strength=0.3, size=256, steps=1)))
    # 256 px: 3 x 3 encoder tiles of 128 px; 32 latents: 3 x 3 decoder tiles of 16, and 3 x 3 DiT tiles.
    assert calls == {"encode": [9], "decode": [9], "dit": [9]}
    assert np.isfinite(img).all()
    for band in (img[:, -32:], img[-32:, :], img[:, :32], img[:32, :]):  # every edge painted, none black
        assert band.mean() > 20 and band.std() > 5


def test_a_small_budget_decodes_in_tiles_without_the_black_band(tiny_engine, monkeypatch):
    """Below 16 GB every image is decoded in 512-pixel tiles. DiffSynth's own tiler (Unfold/Fold)
    left the last 128 rows and columns of a 1024x1024 image black (0/0); ours covers them."""
    req = GenerationRequest("a bowl of fruit", seed=3, steps=1, width=1024, height=1024)
    whole = pixels(tiny_engine.generate(req))
    monkeypatch.setattr(tiny_engine, "plan", dataclasses.replace(tiny_engine.plan, tiled_vae=True))
    tiled = pixels(tiny_engine.generate(req))
    assert tiled.shape == (1024, 1024, 3) and np.isfinite(tiled).all()
    for band in (tiled[:, 896:], tiled[896:, :]):
        assert band.mean() > 20 and band.std() > 5
    assert abs(tiled.mean() - whole.mean()) < 10  # the same image, give or take the seams


def test_the_plan_picks_2x_then_1_5x_then_refuses(tiny_engine, monkeypatch):
    unlimited = tiny_engine.plan
    assert unlimited.budget_gib is None
    assert tiny_engine.upscale_size(1024, 1024) == (2048, 2048)
    assert tiny_engine.upscale_size(832, 1216) == (1664, 2432)  # portrait: 4.05 MP
    assert tiny_engine.upscale_size(1536, 1536) is None  # 2x and 1.5x both past MAX_UPSCALED_PIXELS
    assert tiny_engine.upscale_size(2048, 2048) is None  # an upscaled image is not upscaled again
    monkeypatch.setattr(tiny_engine, "plan", dataclasses.replace(unlimited, budget_gib=8.0))
    assert tiny_engine.upscale_size(1024, 1024) == (2048, 2048)  # 2048^2 x 40 B = 0.16 GiB fits 0.25
    monkeypatch.setattr(budget, "UPSCALE_SPARE_GIB", 0.1)  # a budget too tight for 2x, not for 1.5x
    assert tiny_engine.upscale_size(1024, 1024) == (1536, 1536)
    monkeypatch.setattr(budget, "UPSCALE_SPARE_GIB", 0.001)
    assert tiny_engine.upscale_size(1024, 1024) is None
    assert 2048 * 2048 == MAX_UPSCALED_PIXELS


def test_the_dit_tile_is_the_source_size_or_native():
    assert _dit_tile(256, 256, (128, 128)) == (16, 16)  # an upscale: the source's size
    assert _dit_tile(2048, 2048, (1024, 1024)) == (128, 128)
    assert _dit_tile(1664, 2432, (832, 1216)) == (152, 104)  # rows, columns
    assert _dit_tile(1024, 1024, (1024, 1024)) is None  # a Vary at its size: whole
    assert _dit_tile(2048, 2048, (2048, 2048)) == (128, 128)  # a Vary of a large image: native tiles


# ---------------------------------------------------------------- the tiler


@pytest.mark.parametrize(
    "length,tile,stride,align",
    [(128, 64, 48, 1), (256, 128, 64, 2), (2048, 512, 384, 8), (1216, 512, 384, 8), (152, 104, 52, 2), (40, 64, 48, 1)],
)
def test_tiles_cover_the_whole_length(length, tile, stride, align):
    starts = tiling.starts(length, tile, stride, align)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def test_blending_reproduces_a_pointwise_function_and_a_rescale():
    x = torch.randn(1, 3, 100, 130)
    assert torch.allclose(tiling.tiled(lambda t: t * 2, x, (64, 64), (48, 48)), 2 * x, atol=1e-5)
    up = tiling.tiled(lambda t: torch.nn.functional.interpolate(t, scale_factor=8), x, (32, 32), (24, 24), scale=8)
    assert torch.allclose(up, torch.nn.functional.interpolate(x, scale_factor=8), atol=1e-5)
    y = torch.randn(1, 3, 768, 1024)
    down = tiling.tiled(lambda t: torch.nn.functional.avg_pool2d(t, 8), y, (512, 512), (384, 384), scale=1 / 8, align=8)
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(y, 8), atol=1e-5)


# ---------------------------------------------------------------- with a CUDA step graph (GPU only)


def _graph_plan(cuda_graphs: bool) -> Plan:
    return Plan(
        device=torch.device("cuda", 0),
        compute_dtype=torch.bfloat16,
        budget_gib=None,
        dit_resident_gib=None,
        text_encoders_resident=True,
        keep_resident=True,
        fp8_matmul=False,
        pinned=True,
        compile="off",
        cuda_graphs=cuda_graphs,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_img2img_and_tiles_replay_the_step_graph_as_eager_steps_paint(model_dir, tmp_path):
    """Vary's steps are text-to-image's steps from other latents, and each Upscale tile is one step at
    the tile's size: the captured graph replays them with their own inputs."""
    settings = tiny_model_settings(model_dir, device="cuda")
    eager = Engine.load(settings, plan=_graph_plan(False))
    graphed = Engine.load(settings, plan=_graph_plan(True))
    assert graphed.step_graph is not None
    src = eager.generate(GenerationRequest("a cat", seed=2, steps=3, width=128, height=128))
    path = save_png(src.image, tmp_path / "src.png", {})
    for req in (vary(path, steps=4), vary(path, strength=0.3, size=256, steps=3)):
        before = graphed.step_graph.replays
        a, b = pixels(graphed.generate(req)), pixels(eager.generate(req))
        assert np.abs(a - b).mean() < 1
        assert graphed.step_graph.replays > before
