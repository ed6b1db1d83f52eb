"""Live previews: the clean-latent guess and its RGB map (against DiffSynth's own scheduler), the
engine making them only when asked, and the bot attaching them to progress edits (the real
discord.py client against the fake Discord, the tiny engine, a real SQLite file)."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bot.engine import preview
from bot.engine.api import GenerationRequest, ProgressWithPreviews

from botkit import ALICE, BOB, ControlledEngine, has_image, make_settings, running_bot
from ceilings import WAIT

# ---------------------------------------------------------------- the math


def test_the_clean_latent_guess_is_exact_on_diffsynths_flow_matching_path():
    """A model that predicts the true velocity (noise - x0, what FLUX is trained on) sends DiffSynth's
    FlowMatchScheduler along the straight path from the noise to x0: at every step the tap's guess
    x_t - sigma * v is x0 itself, and after the last step the latents are x0."""
    from diffsynth.diffusion import FlowMatchScheduler
    from diffsynth.diffusion.base_pipeline import BasePipeline

    scheduler = FlowMatchScheduler("FLUX.1")
    scheduler.set_timesteps(12)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(1, 16, 8, 8, generator=generator, dtype=torch.float64)
    pipe = SimpleNamespace(step=lambda scheduler, **kw: BasePipeline.step(None, scheduler, **kw))
    tap = preview.StepTap()
    tap.install(pipe)
    latents = scheduler.add_noise(x0, noise, scheduler.timesteps[0])
    for i in range(len(scheduler.timesteps)):
        latents = pipe.step(scheduler, latents=latents, progress_id=i, noise_pred=noise - x0)
        guess = tap.clean_latents()
        assert guess is not None and torch.allclose(guess.double(), x0, atol=1e-5), i
    assert torch.allclose(latents, x0, atol=1e-6)
    tap.clear()
    assert tap.clean_latents() is None and tap.preview() is None


def test_the_rgb_map_is_comfyuis_for_flux_one_row_per_channel():
    zero = torch.zeros(1, 16, 2, 2)
    pixels = preview.latents_to_pixels(zero, (2, 2))
    assert pixels.shape == (2, 2, 3) and pixels.dtype == torch.uint8
    expected = [round((b + 1) * 127.5) for b in preview.LATENT_RGB_BIAS]
    assert pixels[0, 0].tolist() == expected  # the bias alone
    channel = torch.zeros(1, 16, 1, 1)
    channel[0, 4] = 2.0  # channel 4's row: (0.0859, 0.0721, 0.0329)
    got = preview.latents_to_pixels(channel, (1, 1))[0, 0].tolist()
    want = [
        round((2 * f + b + 1) * 127.5)
        for f, b in zip(preview.LATENT_RGB_FACTORS[4], preview.LATENT_RGB_BIAS, strict=True)
    ]
    assert got == want
    assert len(preview.LATENT_RGB_FACTORS) == 16 and {len(row) for row in preview.LATENT_RGB_FACTORS} == {3}


@pytest.mark.parametrize(
    "size,expected",
    [((1024, 1024), (384, 384)), ((832, 1216), (263, 384)), ((1216, 832), (384, 263)), ((256, 256), (256, 256))],
)
def test_a_preview_is_at_most_384_px_and_keeps_the_shape(size, expected):
    assert preview.preview_size(*size) == expected


# ---------------------------------------------------------------- the engine


class Recorder(ProgressWithPreviews):
    """Takes a preview at the steps in `at` only, and records what each report brought."""

    def __init__(self, at=()):
        self.at, self.reports, self.images = set(at), [], {}

    def __call__(self, step, total, preview=None):
        self.reports.append((step, total, preview is not None))
        if step in self.at:
            made = preview()
            self.images[step] = made.encode()


def test_the_engine_previews_only_the_steps_asked_for(tiny_engine, monkeypatch):
    made = []
    real = preview.latents_to_pixels
    monkeypatch.setattr(preview, "latents_to_pixels", lambda *a, **k: made.append(1) or real(*a, **k))
    recorder = Recorder(at={2})
    result = tiny_engine.generate(GenerationRequest("x", seed=1, steps=4, width=256, height=192), on_progress=recorder)
    assert recorder.reports == [(i, 4, True) for i in range(1, 5)]  # each report could have one...
    assert len(made) == 1  # ...only the one taken was made
    image = recorder.images[2]
    assert (image.ext, image.width, image.height) == ("jpg", 256, 192)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == "JPEG" and decoded.size == (256, 192)
    assert result.image.size == (256, 192)
    plain = []  # a plain callback is told (step, total) only, as before
    tiny_engine.generate(
        GenerationRequest("x", seed=1, steps=2, width=128, height=128), on_progress=lambda i, n: plain.append((i, n))
    )
    assert plain == [(1, 2), (2, 2)] and len(made) == 1


def test_the_last_steps_preview_is_of_the_latent_the_vae_decodes(tiny_engine, monkeypatch):
    """At the last step sigma goes to 0, so x_t - sigma * v is exactly what the scheduler hands the VAE."""
    decoder = tiny_engine.pipe.vae_decoder
    forward, decoded = decoder.forward, []

    def capture(latents, *args, **kwargs):
        decoded.append(latents.detach().float().clone())
        return forward(latents, *args, **kwargs)

    monkeypatch.setattr(decoder, "forward", capture)
    guesses = []

    class LastGuess(ProgressWithPreviews):
        def __call__(self, step, total, preview=None):
            guesses.append(tiny_engine.step_tap.clean_latents())

    tiny_engine.generate(GenerationRequest("x", seed=9, steps=3, width=128, height=128), on_progress=LastGuess())
    assert len(decoded) == 1 and guesses[-1] is not None
    assert torch.allclose(guesses[-1], decoded[0], atol=2e-2, rtol=1e-2)
    assert not torch.allclose(guesses[0], decoded[0], atol=2e-2, rtol=1e-2)  # earlier guesses differ
    assert tiny_engine.step_tap.clean_latents() is None  # nothing kept after the job


# ---------------------------------------------------------------- the bot


class CountingEngine(ControlledEngine):
    """Counts the previews the engine was asked to make (each costs GPU work)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.previews_made = 0
        self._lock = threading.Lock()

    def generate(self, request, *, on_progress=None, should_cancel=None):
        if isinstance(on_progress, ProgressWithPreviews):
            inner, outer = on_progress, self

            class Counted(ProgressWithPreviews):
                def __call__(self, step, total, preview=None):
                    def counted():
                        with outer._lock:
                            outer.previews_made += 1
                        return preview()

                    inner(step, total, None if preview is None else counted)

            on_progress = Counted()
        return super().generate(request, on_progress=on_progress, should_cancel=should_cancel)


def progress_edits(fake, inter) -> list:
    """The worker's edits of the interaction's message that show a step (not the result)."""
    return [
        e
        for e in fake.events
        if e.method == "PATCH"
        and f"/{inter.token}/messages/" in e.path
        and e.status < 400
        and "Painting: step" in ((e.json or {}).get("content") or "")
    ]


async def paint(fake, user, **options):
    inter = await fake.slash("imagine", {"prompt": "a lighthouse at dusk", **options}, user_id=user)
    final = await inter.wait_original(has_image)
    return inter, final


@pytest.fixture
def counting(tiny_engine):
    return CountingEngine(tiny_engine)


async def test_progress_edits_of_a_long_job_carry_a_preview(fake, tmp_path, model_dir, counting):
    """1024x1024 and 20 steps on the tiny model, with the bot's real 1.5 s between edits: each
    progress edit carries one preview (a 384x384 JPEG), a preview is made only for an edit that is
    sent, and the result replaces it."""
    settings = make_settings(tmp_path, model_dir, fake, generation={"width": 1024, "height": 1024})
    async with running_bot(fake, settings, counting, progress_interval=1.5) as bot:
        inter, final = await paint(fake, ALICE, steps=20)
        await bot.queue.wait_idle(WAIT)
    edits = progress_edits(fake, inter)
    assert edits, "the first step is always shown"
    for edit in edits:
        assert [f["filename"] for f in edit.files] == ["preview.jpg"], edit.json
        shown = Image.open(io.BytesIO(edit.files[0]["data"]))
        assert shown.format == "JPEG" and shown.size == (384, 384)
        assert np.asarray(shown).std() > 1  # a picture, not a blank
    assert counting.previews_made == len(edits)  # none made for a step that was not shown
    assert [a["filename"].startswith("fluxbot-") for a in final["attachments"]] == [True]  # the preview is gone


async def test_a_preview_is_made_only_for_a_step_that_is_shown(fake, tmp_path, model_dir, counting):
    """With a minute between edits, a 12-step job shows its first step only: one preview, not twelve.
    A portrait's preview has its shape."""
    settings = make_settings(tmp_path, model_dir, fake, generation={"width": 512, "height": 512})
    async with running_bot(fake, settings, counting, progress_interval=60) as bot:
        inter, _ = await paint(fake, ALICE, steps=12, size="portrait")
        await bot.queue.wait_idle(WAIT)
    [edit] = progress_edits(fake, inter)
    assert "step 1/12" in edit.json["content"] and counting.previews_made == 1
    assert Image.open(io.BytesIO(edit.files[0]["data"])).size == (263, 384)  # 416x608, scaled to fit 384


async def test_no_previews_when_the_bot_turns_them_off(fake, tmp_path, model_dir, counting):
    settings = make_settings(tmp_path, model_dir, fake, discord={"previews": False})
    async with running_bot(fake, settings, counting) as bot:
        inter, _ = await paint(fake, ALICE, steps=4)
        await bot.queue.wait_idle(WAIT)
    assert progress_edits(fake, inter)
    assert all(not e.files for e in progress_edits(fake, inter))
    assert counting.previews_made == 0


async def test_a_member_who_turned_previews_off_gets_none_and_others_still_do(fake, tmp_path, model_dir, counting):
    settings = make_settings(tmp_path, model_dir, fake)
    async with running_bot(fake, settings, counting) as bot:
        off = await fake.slash("settings", {"previews": False}, user_id=ALICE)
        await off.response()
        alice, _ = await paint(fake, ALICE, steps=4)
        assert counting.previews_made == 0
        bob, _ = await paint(fake, BOB, steps=4)
        await bot.queue.wait_idle(WAIT)
    assert progress_edits(fake, alice) and all(not e.files for e in progress_edits(fake, alice))
    assert progress_edits(fake, bob) and all(e.files for e in progress_edits(fake, bob))
    assert counting.previews_made == len(progress_edits(fake, bob))


async def test_a_cancelled_job_leaves_no_preview_behind(fake, tmp_path, model_dir, counting):
    settings = make_settings(tmp_path, model_dir, fake)
    async with running_bot(fake, settings, counting) as bot:
        inter = await fake.slash("imagine", {"prompt": "stopped halfway", "steps": 40}, user_id=ALICE)
        await inter.wait_original(lambda m: bool(m.get("attachments")))  # a preview is showing
        await (await fake.slash("cancel", {}, user_id=ALICE)).response()
        final = await inter.wait_original(lambda m: "Cancelled" in (m.get("content") or ""))
        await bot.queue.wait_idle(WAIT)
    assert final["attachments"] == []
    assert fake.messages[int(final["id"])]["attachments"] == []  # no later edit brought one back
