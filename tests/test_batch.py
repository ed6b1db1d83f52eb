"""A grid painted as one batch (#16 item 3) by the real engine on the tiny random model: image i of the
batch is the image a single job with image i's seed paints; one loop of steps; streamed weights fetched
once per step for the whole batch; the blocks compiled for one image serve it; previews of the grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_engine import fresh_dynamo, streaming_cpu_plan
from test_previews import Recorder

from bot.engine.api import GenerationRequest
from bot.engine.pipeline import Engine
from bot.engine.streaming import Streamer
from bot.params import image_seed

from conftest import tiny_model_settings


def grid_request(count: int, **kw) -> GenerationRequest:
    return GenerationRequest(
        "four lighthouses", **{"seed": 41, "steps": 3, "width": 128, "height": 128, **kw}, count=count
    )


def singles(engine, request: GenerationRequest) -> list[np.ndarray]:
    """What single jobs with each of the grid's seeds paint."""
    return [
        np.asarray(engine.generate(dataclasses.replace(request, seed=image_seed(request.seed, i), count=1)).image)
        for i in range(request.count)
    ]


@pytest.mark.parametrize("count", [2, 4])
def test_each_image_of_a_batch_is_the_single_job_of_its_seed(tiny_engine, count):
    request = grid_request(count)
    steps = []
    result = tiny_engine.generate(request, on_progress=lambda i, n: steps.append((i, n)))
    assert len(result.images) == count and result.image is result.images[0]
    assert {im.size for im in result.images} == {(128, 128)}
    assert steps == [(i, 3) for i in range(1, 4)]  # one loop of steps for the whole batch
    for got, want in zip(result.images, singles(tiny_engine, request), strict=True):
        assert np.array_equal(np.asarray(got), want)
    assert len({np.asarray(im).tobytes() for im in result.images}) == count  # each its own seed


def test_a_batch_fetches_each_streamed_weight_once_per_step(model_dir):
    """Under a budget too small for the model most layers stream: a batch of three copies what one
    image copies (each block's weights held while the three images pass), and paints the singles' pixels."""
    engine = Engine.load(tiny_model_settings(model_dir), plan=streaming_cpu_plan(0.0001))
    streamer = engine.streamers["dit"]
    assert engine.placement.dit.streamed > 0
    one = GenerationRequest("four lighthouses", seed=41, steps=3, width=128, height=128)
    engine.generate(one)  # learns the order (the first job's copies differ: no prefetching yet)
    before = streamer.copied_bytes
    engine.generate(one)
    single = streamer.copied_bytes - before
    before = streamer.copied_bytes
    result = engine.generate(grid_request(3))
    batch = streamer.copied_bytes - before
    assert single > 3 * engine.placement.dit.streamed  # every step streams
    assert batch == single  # not three times as much
    assert streamer.held is None and streamer.pending == {}
    for got, want in zip(result.images, singles(engine, grid_request(3)), strict=True):
        assert np.array_equal(np.asarray(got), want)


def test_a_batch_reuses_the_blocks_compiled_for_one_image(model_dir):
    counters = fresh_dynamo()
    engine = Engine.load(tiny_model_settings(model_dir, compile="on"))
    engine.generate(GenerationRequest("compiled", seed=1, steps=2, width=128, height=128))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    engine.generate(grid_request(4, steps=2))
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    assert not engine.compiles_for(128, 128)


def test_a_batch_preview_shows_the_whole_grid(tiny_engine):
    recorder = Recorder(at={2})
    tiny_engine.generate(grid_request(4, steps=3, width=128, height=96), on_progress=recorder)
    shot = recorder.images[2]
    assert (shot.width, shot.height) == (256, 192)  # 2x2 of 128x96
    recorder = Recorder(at={1})
    tiny_engine.generate(grid_request(3, steps=2), on_progress=recorder)
    assert (recorder.images[1].width, recorder.images[1].height) == (384, 128)  # one row of three


def test_a_grid_from_a_source_image_is_refused(tiny_engine, tmp_path):
    source = tmp_path / "s.png"
    tiny_engine.generate(GenerationRequest("x", seed=1, steps=1, width=128, height=128)).image.save(source)
    with pytest.raises(ValueError, match="count > 1 with a source image"):
        tiny_engine.generate(grid_request(2, source_path=str(source), strength=0.5))


def test_a_held_layer_is_copied_once_and_counted_when_the_hold_ends():
    class Layer:
        def __init__(self, n):
            self._stream_sources = [torch.full((n,), float(n))]

    a, b = Layer(25), Layer(50)
    streamer = Streamer(torch.device("cpu"), window=10_000)
    with streamer.holding():
        first = streamer.fetch(a)
        assert streamer.fetch(a) is first and streamer.copied_bytes == 100
        streamer.fetch(b)
        streamer.fetch(b)
        assert streamer.copied_bytes == 300 and streamer.held_bytes == 300
    assert streamer.held is None
    again = streamer.fetch(a)  # outside a hold: copied again (and b prefetched: the order is known now)
    assert again is not first and streamer.copied_bytes == 300 + 100 + 200
