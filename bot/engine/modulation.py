"""AdaLN modulations of every denoising step, computed once per job instead of once per step.

Each FLUX block scales and shifts its activations by `linear(silu(conditioning))`, where the
conditioning depends only on the timestep, the pooled prompt and the guidance: all known when a job
starts. These modulation layers hold 3.2 GB of the 11.9 GB DiT, yet their work is one row per step.
So at the first step of a job every layer runs once over all the steps' conditionings, and each
step reads its row. Under a VRAM budget the modulation weights then never need to be on the GPU
during the steps: they are copied in once per job (~65 ms on PCIe 5), and the space goes to the
weights every step needs, which otherwise stream over PCIe at every step.
"""

from __future__ import annotations

import types

import torch
from diffsynth.core.vram.layers import AutoWrappedLinear

from . import offload

MODULATION_NORMS = ("AdaLayerNorm", "AdaLayerNormSingle", "AdaLayerNormContinuous")


def modulation_layers(dit: torch.nn.Module) -> dict[str, AutoWrappedLinear]:
    """The `linear` of every AdaLN norm in the DiT, by qualified name."""
    return {
        f"{name}.linear": module.linear
        for name, module in dit.named_modules()
        if type(module).__name__ in MODULATION_NORMS and isinstance(getattr(module, "linear", None), AutoWrappedLinear)
    }


@torch.library.custom_op("fluxbot::modulation", mutates_args=())
def modulation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A modulation layer's forward as one opaque op: compiled blocks call it as it is, so the
    step's row can come from the table without dynamo seeing (and specialising on) the step."""
    layer = offload.layer_by_weight(weight)
    return layer._modulations.output(layer, x)


@modulation.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _direct_forward(self, x):
    # DiffSynth's weight handling: the resident weight, or (per job) a copy made for this call.
    weight, bias = self.computation()
    return self.linear_forward(x, weight, bias)


def _table_forward(self, x, *args, **kwargs):
    return modulation(x, self.weight, self.bias)


class Modulations:
    """The modulation table of the job being painted, and the hooks that fill and read it.

    `rows` holds each layer's outputs for every step; a step's forward pass reads its row. With a
    CUDA graph (graphs.py, `join_weights`), the graph can only read memory at the address it was
    captured with: the layers' outputs then form one `table`, and before each step its row is
    copied into `current`, a buffer that stays put for the engine's life. The weights are joined
    too (each layer's weight becomes a view of one matrix), so the table is one float8 matmul
    instead of 115 small ones launched from Python while the GPU waited (a job's first step took
    38 ms more than the others, now 16-24 ms: docs/benchmarks.md, lever M).
    (Only with a graph: under a VRAM budget the weights are copied in per job, layer by layer,
    and the one large table cost an extra allocator segment on 8 GB cards.)
    """

    def __init__(self, dit: torch.nn.Module):
        self.dit = dit
        self.layers = list(modulation_layers(dit).values())
        self.enabled = True
        self.rows: dict[int, torch.Tensor] | None = None  # id(layer) -> (steps, width)
        # After join_weights (for a CUDA graph): every layer's weight and bias as one matrix,
        # the job's outputs as one table, and the fixed buffer a step reads its row from.
        self.weight: torch.Tensor | None = None  # (sum of the layers' widths, dim)
        self.bias: torch.Tensor | None = None
        self.table: torch.Tensor | None = None  # (steps, sum of the layers' widths)
        self.current: torch.Tensor | None = None  # (1, same), the row of this step
        self.slices: dict[int, tuple[int, int]] = {}  # id(layer) -> (offset, width) in a row
        self.key: tuple | None = None  # the pooled prompt and guidance the table was made for
        self.step = -1
        for layer in self.layers:
            layer._modulations = self
            layer._direct_forward = types.MethodType(_direct_forward, layer)
            layer.forward = types.MethodType(_table_forward, layer)

    def register(self) -> None:
        """Map each layer's current weight address to it (call again after weights move)."""
        for layer in self.layers:
            offload.register_by_weight(layer)

    @property
    def joined(self) -> bool:
        return self.weight is not None

    @torch.no_grad()
    def join_weights(self, device: torch.device | None = None) -> bool:
        """Make every layer's weight and bias a view of one matrix on `device` (default: where the
        weights are). Call it before the layers are placed, so the old copies (on the CPU) never
        share the GPU with the new one; the layers must stay put from then on (a resident DiT kept
        for good). False, changing nothing, where the layers differ in device, dtype or input
        width, or one has no bias."""
        first = self.layers[0].weight if self.layers else None
        if first is None or any(
            layer.bias is None
            or (layer.weight.device, layer.weight.dtype, layer.weight.shape[1])
            != (first.device, first.dtype, first.shape[1])
            for layer in self.layers
        ):
            return False
        device = first.device if device is None else torch.device(device)
        if device.type == "cuda" and any(torch.device(layer.preparing_device) != device for layer in self.layers):
            return False  # placement would move the views apart again: each layer to its own copy
        total = sum(layer.weight.shape[0] for layer in self.layers)
        weight = torch.empty((total, first.shape[1]), dtype=first.dtype, device=device)
        bias = torch.empty(total, dtype=self.layers[0].bias.dtype, device=device)
        offset = 0
        for layer in self.layers:  # one layer at a time: each old copy is freed as it moves
            width = layer.weight.shape[0]
            weight[offset : offset + width].copy_(layer.weight.data)
            bias[offset : offset + width].copy_(layer.bias.data)
            layer.weight.data = weight[offset : offset + width]
            layer.bias.data = bias[offset : offset + width]
            if device.type == "cuda":
                layer.state = 2  # DiffSynth's "prepared" (on the GPU): placement leaves it there
            self.slices[id(layer)] = (offset, width)
            offset += width
        self.weight, self.bias = weight, bias
        self.register()
        return True

    def _joined_forward(self, x: torch.Tensor) -> torch.Tensor:
        """All layers' outputs side by side: one float8 matmul where the layers compute in float8,
        else layer by layer into the table (a whole bf16 copy of the weights would be 6 GB)."""
        assert self.weight is not None, "join_weights first"
        template = self.layers[0]
        if all(getattr(layer, "keep_fp8", False) for layer in self.layers):
            return template.linear_forward(x, self.weight, self.bias)
        table = x.new_empty((x.shape[0], self.weight.shape[0]))
        for layer in self.layers:
            offset, width = self.slices[id(layer)]
            table[:, offset : offset + width] = layer._direct_forward(x)
        return table

    @property
    def ready(self) -> bool:
        """The job's table is filled."""
        return self.key is not None

    @torch.no_grad()
    def prepare(
        self,
        timesteps: torch.Tensor,
        pooled_prompt_emb: torch.Tensor,
        guidance: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        """Every step's conditioning (as `model_fn_flux_image` computes it), then each modulation
        layer once over all of them."""
        if not self.enabled:
            return
        dit = self.dit
        ts = offload.to_device_nonblocking(timesteps, pooled_prompt_emb.device).to(dtype)
        conditioning = dit.time_embedder(ts, dtype) + dit.pooled_text_embedder(pooled_prompt_emb)
        if dit.guidance_embedder is not None and guidance is not None:
            conditioning = conditioning + dit.guidance_embedder(guidance * 1000, dtype)
        x = torch.nn.functional.silu(conditioning)
        self.clear()
        if self.joined:
            self.table = self._joined_forward(x)
            row = (1, self.table.shape[1])
            if self.current is None or (self.current.shape, self.current.dtype, self.current.device) != (
                row,
                self.table.dtype,
                self.table.device,
            ):
                self.current = self.table.new_empty(row)
        else:
            self.rows = {id(layer): layer._direct_forward(x) for layer in self.layers}
        self.key = (id(pooled_prompt_emb), id(guidance))

    def use(self, step: int, pooled_prompt_emb: torch.Tensor, guidance: torch.Tensor | None) -> None:
        """Set the step the next forward pass is for; a pass with other inputs (a negative
        prompt, say) computes its modulations directly."""
        self.step = step if self.ready and self.key == (id(pooled_prompt_emb), id(guidance)) else -1
        if self.step >= 0 and self.table is not None:
            assert self.current is not None  # made with the table
            self.current.copy_(self.table[step : step + 1])

    def output(self, layer: AutoWrappedLinear, x: torch.Tensor) -> torch.Tensor:
        if self.step < 0 or x.shape[0] != 1:
            return layer._direct_forward(x)
        # Copies: the compiled graph may reuse its outputs' memory.
        if self.table is None:
            assert self.rows is not None  # step >= 0: the job's table is filled
            return self.rows[id(layer)][self.step : self.step + 1].clone()
        assert self.current is not None  # made with the table
        offset, width = self.slices[id(layer)]
        return self.current[:, offset : offset + width].clone()

    def clear(self) -> None:
        """Drop the job's table (`current` stays: a captured graph reads it)."""
        self.rows = None
        self.table = None
        self.key = None
        self.step = -1


def install(pipe, modulations: Modulations) -> None:
    """Wrap the pipeline's model function: fill the table at a job's first step, then tell the
    layers which step each forward pass is for."""
    model_fn = pipe.model_fn

    def model_fn_with_table(**kwargs):
        step = kwargs.get("progress_id", 0)
        pooled, guidance, latents = kwargs.get("pooled_prompt_emb"), kwargs.get("guidance"), kwargs.get("latents")
        if step == 0 and pooled is not None and latents is not None:
            modulations.prepare(pipe.scheduler.timesteps, pooled, guidance, latents.dtype)
        modulations.use(step, pooled, guidance)
        return model_fn(**kwargs)

    pipe.model_fn = model_fn_with_table
