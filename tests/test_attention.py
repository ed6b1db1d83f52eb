"""The attention inputs in one kernel (bot/engine/attention.py): DiffSynth's values, by its own modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffsynth.models import flux_dit

from bot.engine import attention
from bot.engine.api import GenerationRequest
from bot.engine.pipeline import Engine

from conftest import tiny_model_settings

HEADS, HEAD_DIM = 2, 128


def rope_table(tokens: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 40, (1, tokens, 3), generator=torch.Generator().manual_seed(seed)).float()
    return flux_dit.RoPEEmbedding(HEAD_DIM, 10000, [16, 56, 56])(ids)


def random_norms(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for name, child in module.named_modules():
        if name.startswith("norm_"):
            child.weight.data = (torch.rand(HEAD_DIM) + 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_attention_forward_returns_what_diffsynths_does(dtype):
    """The installed forward, with the op's PyTorch path (no GPU here): DiffSynth's results exactly,
    for a double block's joint attention (both outputs)."""
    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    joint = flux_dit.FluxJointAttention(dim, dim, HEADS, HEAD_DIM).to(dtype)
    random_norms(joint, dtype)
    image, text = torch.randn(1, 40, dim, dtype=dtype), torch.randn(1, 7, dim, dtype=dtype)
    freqs = rope_table(47)
    want = joint(image, text, freqs)
    joint.forward = types.MethodType(attention._joint_attention_forward, joint)
    got = joint(image, text, freqs)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_masked_attention_still_runs_diffsynths_code(monkeypatch):
    """Entity masks are not handled by the op: the installed forward hands them to DiffSynth's."""
    torch.manual_seed(1)
    dim = HEADS * HEAD_DIM
    joint = flux_dit.FluxJointAttention(dim, dim, HEADS, HEAD_DIM)
    image, text, freqs = torch.randn(1, 9, dim), torch.randn(1, 3, dim), rope_table(12)
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., :3, 3:] = float("-inf")  # text tokens may not see the image
    want = joint(image, text, freqs, mask)
    joint.forward = types.MethodType(attention._joint_attention_forward, joint)
    calls = []
    real = attention.attention_inputs
    monkeypatch.setattr(attention, "attention_inputs", lambda *a: calls.append(a) or real(*a))
    got = joint(image, text, freqs, mask)
    monkeypatch.undo()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) and calls == []
    assert not torch.equal(joint(image, text, freqs)[1], want[1])  # the mask mattered


INTERPRETED = textwrap.dedent("""
    import torch
    from bot.engine import attention
    from tests.test_attention import rope_table, HEADS, HEAD_DIM
    torch.manual_seed(2)
    dtype = torch.float16
    dim = HEADS * HEAD_DIM
    def weights(n):
        return [(torch.rand(HEAD_DIM) + 0.5).to(dtype) for _ in range(n)]
    cases = []
    # A double block: text (5 tokens) then image (37), each with its own norms and a bias still to
    # add (float32, as a layer may keep it); batch 2, one RoPE table.
    cases.append(([torch.randn(2, 5, 3 * dim, dtype=dtype), torch.randn(2, 37, 3 * dim, dtype=dtype)],
                  [torch.randn(3 * dim), torch.randn(3 * dim)], weights(2), weights(2), [1e-6, 1e-6], rope_table(42)))
    # q/k/v a strided slice of a wider projection, its bias added already; 33 tokens (not a whole tile).
    wide = torch.randn(1, 33, 7 * dim, dtype=dtype)
    cases.append(([wide[:, :, :3 * dim]], [None], weights(1), weights(1), [1e-5], rope_table(33, seed=3)))
    for qkvs, biases, wq, wk, eps, freqs in cases:
        assert attention._kernel_fits(qkvs, biases, wq, wk, freqs, HEADS), "the kernel did not run"
        got = attention.attention_inputs(qkvs, biases, wq, wk, eps, freqs, HEADS)
        want = attention._reference(qkvs, biases, wq, wk, eps, freqs, HEADS)
        assert got.shape == want.shape == (3, qkvs[0].shape[0], HEADS, sum(t.shape[1] for t in qkvs), HEAD_DIM)
        assert got.is_contiguous()
        # fp32 sums in another order: now and then a rounding step apart in the norm, which RoPE
        # carries into its output; never more than one step at the scale of the head's row.
        diff = (got.float() - want.float()).abs()
        row_scale = want.float().abs().amax(-1, keepdim=True)
        assert (diff <= row_scale * 2**-10).all(), diff.max()
        assert (diff > 0).float().mean() < 1e-3, (diff > 0).float().mean()
    print("kernel matches", len(cases))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernel_computes_diffsynths_values():
    """The Triton kernel itself, in Triton's CPU interpreter (no GPU here), against DiffSynth's
    arithmetic, to one rounding step: two parts with their own norms and biases at offsets, a batch
    of two, a strided input without a bias, a tile cut short. float16: the interpreter rounds to
    bfloat16 by truncating, a GPU rounds to nearest (bf16 is checked on a GPU in test_engine_cuda.py)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel matches 2" in done.stdout


def test_fused_attention_paints_the_same_pixels(model_dir, tiny_engine):
    """[model] fused_attention = "on" through the whole pipeline (DiffSynth's wrapped norms, the real
    blocks): the same image as DiffSynth's attention code."""
    engine = Engine.load(tiny_model_settings(model_dir, fused_attention="on"))
    assert engine.plan.fused_attention and not tiny_engine.plan.fused_attention
    assert all(b.attn.forward.__func__ is attention._joint_attention_forward for b in engine.pipe.dit.blocks)
    req = GenerationRequest("a fused cat", seed=9, steps=2, width=128, height=128)
    assert np.array_equal(np.asarray(engine.generate(req).image), np.asarray(tiny_engine.generate(req).image))


def wrapped_linear(linear: torch.nn.Linear, *, keep_fp8: bool = True):
    """A layer as the engine holds it (DiffSynth's AutoWrappedLinear, float32 on the CPU), marked as
    configure_linears marks a float8 layer (the arithmetic here stays plain) and prepared."""
    from diffsynth.core.vram.layers import AutoWrappedLinear

    layer = AutoWrappedLinear(
        linear,
        offload_dtype=torch.float32,
        offload_device="cpu",
        onload_dtype=torch.float32,
        onload_device="cpu",
        preparing_dtype=torch.float32,
        preparing_device="cpu",
        computation_dtype=torch.float32,
        computation_device="cpu",
    )
    layer.keep_fp8 = keep_fp8
    layer.onload()
    return layer


def test_the_projection_leaves_its_bias_to_the_kernel_only_when_it_computes_in_place():
    """`_projection` splits the bias off only for a float8 layer prepared on its device (the
    engine's resident layers); a streamed layer (its own forward), an unprepared one, one with a
    LoRA or a bf16 one runs whole, bias included."""
    from diffsynth.core.vram.layers import AutoWrappedLinear

    torch.manual_seed(4)
    layer = wrapped_linear(torch.nn.Linear(32, 48))
    x = torch.randn(2, 5, 32)
    whole = F.linear(x, layer.weight, layer.bias)
    assert layer.state == 1 and attention._projection(layer, x)[1] is None  # not prepared: runs whole
    layer.preparing()
    out, bias = attention._projection(layer, x)
    assert bias is not None and torch.equal(bias, layer.bias)
    assert torch.allclose(out + bias, whole) and not torch.allclose(out, whole)
    for change in ("streamed", "bf16", "lora"):
        other = wrapped_linear(torch.nn.Linear(32, 48), keep_fp8=change != "bf16")
        other.load_state_dict(layer.state_dict())
        other.preparing()
        if change == "streamed":
            other.forward = types.MethodType(AutoWrappedLinear.forward, other)  # as offload._stream sets one
        if change == "lora":
            other.lora_A_weights.append(torch.zeros(1, 32))
            other.lora_B_weights.append(torch.zeros(48, 1))
        out, bias = attention._projection(other, x)
        assert bias is None and torch.allclose(out, whole), change


def test_the_forward_hands_each_part_its_own_bias_and_norms(monkeypatch):
    """With float8-style projections the forward leaves the text and image biases to the op, with
    each part's own norm weights: DiffSynth's result, up to fp32 rounding (the bias is added apart
    from the matmul). Swapping the parts' biases or norms would be far off."""
    torch.manual_seed(5)
    dim = HEADS * HEAD_DIM
    joint = flux_dit.FluxJointAttention(dim, dim, HEADS, HEAD_DIM)
    random_norms(joint, torch.float32)
    for name in ("a_to_qkv", "b_to_qkv"):
        with torch.no_grad():
            getattr(joint, name).bias.normal_()  # biases that matter
        setattr(joint, name, wrapped_linear(getattr(joint, name)))
        getattr(joint, name).preparing()
    image, text, freqs = torch.randn(1, 24, dim), torch.randn(1, 6, dim), rope_table(30)
    want = joint(image, text, freqs)
    splits = []
    real = attention._projection

    def projection(layer, x):
        out, bias = real(layer, x)
        splits.append(bias is not None)
        return out, bias

    monkeypatch.setattr(attention, "_projection", projection)
    joint.forward = types.MethodType(attention._joint_attention_forward, joint)
    got = joint(image, text, freqs)
    monkeypatch.undo()
    assert splits == [True, True]  # both biases went to the op
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4), (g - w).abs().max()
