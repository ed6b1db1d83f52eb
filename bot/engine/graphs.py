"""A denoising step's DiT forward, captured once as a CUDA graph and replayed at every step.

With the whole DiT on the GPU a step is many hundreds of kernels, each launched from Python; a CUDA
graph launches the whole step at once and frees the CPU. Measured on an H100: about 1 ms of a 97 ms
step (docs/benchmarks.md, lever J), since the GPU rarely waited for the CPU there (a slower host CPU
would likely gain more; not measured). The graph's memory pool keeps one step's activations: +0.6 GiB
at 1024x1024.

Only the plain text-to-image call is captured; a call that uses any other DiffSynth feature, or
that the `can_replay` check refuses (a negative-prompt pass), runs as before. Inputs are copied
into buffers the graph reads; everything else the step reads (weights, the modulation row) stays
at one address for the engine's life.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("fluxbot.engine")

# The tensors `model_fn_flux_image` reads in a text-to-image step: the graph's inputs.
GRAPHED = ("latents", "timestep", "prompt_emb", "pooled_prompt_emb", "guidance", "text_ids", "image_ids")
# Tensors the pipeline passes that the DiT does not read.
UNREAD = ("noise", "input_latents")
# Switches that change what a step runs: with any of them set the step runs eagerly.
FEATURES = (
    "tiled",
    "tea_cache",
    "controlnet",
    "controlnet_conditionings",
    "step1x_connector",
    "ipadapter_kwargs_list",
    "use_gradient_checkpointing",
    "use_gradient_checkpointing_offload",
)


class StepGraph:
    """Wraps the pipeline's `model_fn`. The first call with new input shapes runs eagerly (it
    compiles the blocks for them); the next one with the same shapes captures the graph; later
    ones copy their inputs in and replay it. One graph at a time: a new image size recaptures."""

    def __init__(self, model_fn: Callable, can_replay: Callable[[], bool] = lambda: True):
        self.model_fn = model_fn
        self.can_replay = can_replay
        self.key: tuple | None = None  # the inputs the captured graph is for
        self.seen: tuple | None = None  # the inputs of the last eager call
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.output: torch.Tensor | None = None
        self.disabled = False  # a capture failed: run eagerly from now on
        self.replays = 0

    def _key(self, kwargs: dict) -> tuple | None:
        """What the graph depends on, or None when this call cannot be replayed."""
        if self.disabled or not self.can_replay():
            return None
        if any(kwargs.get(name) for name in FEATURES):
            return None
        key: list[object] = [id(kwargs.get("dit"))]
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if name not in GRAPHED and name not in UNREAD:
                    return None  # an input the graph would not refresh
                if value.device.type != "cuda":
                    return None
            elif name in GRAPHED and value is not None:
                return None
        for name in GRAPHED:
            value = kwargs.get(name)
            key.append(None if value is None else (name, tuple(value.shape), value.dtype, value.device))
        return tuple(key)

    def __call__(self, **kwargs):
        key = self._key(kwargs)
        if key is None:
            return self.model_fn(**kwargs)
        if key != self.key:
            if key != self.seen:
                self.seen = key  # warm-up: compile and run once before capturing
                return self.model_fn(**kwargs)
            if not self._capture(key, kwargs):
                return self.model_fn(**kwargs)
        graph, output = self.graph, self.output
        assert graph is not None and output is not None  # captured for this key
        for name, buffer in self.inputs.items():
            buffer.copy_(kwargs[name])
        graph.replay()
        self.replays += 1
        return output.clone()  # the next replay overwrites `output`

    def _capture(self, key: tuple, kwargs: dict) -> bool:
        self.reset()
        inputs = {name: kwargs[name].clone() for name in GRAPHED if isinstance(kwargs.get(name), torch.Tensor)}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.model_fn(**{**kwargs, **inputs})
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # an op that cannot be captured: keep painting without graphs
            self.disabled = True
            log.warning(
                "CUDA graph capture failed, denoising steps run without it: %s",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return False
        self.graph, self.inputs, self.output, self.key = graph, inputs, output, key
        return True

    def reset(self) -> None:
        """Drop the captured graph and its memory pool (weights moved, or memory is short)."""
        self.graph, self.inputs, self.output, self.key, self.seen = None, {}, None, None, None
