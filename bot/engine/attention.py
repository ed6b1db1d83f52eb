"""A FLUX block's attention inputs in one GPU kernel: q/k RMSNorm, RoPE and the layout SDPA reads.

DiffSynth writes these as a dozen small operations (view, chunk, RMSNorm, concat, a RoPE built
from 2x2 rotation matrices, a cast). In a double block, where text and image tokens have norms of
their own and are joined before RoPE, Inductor fuses them into several kernels that read the rows
again: 159 us a block on an H100 at 1024x1024 (benchmarks/attention_micro.py). Here one Triton
kernel reads a tile of tokens of one head, normalises q and k, rotates them and writes q, k and v
side by side for SDPA, rounding where DiffSynth's code rounds, so the values match it to the last
bit but at a few elements (its fp32 sums add in another order): under 1 in 1,000, off by at most one
rounding step of their row's largest value (tests/test_attention.py, tests/test_engine_cuda.py).

`install(dit)` swaps in the double blocks' attention forward that calls `attention_inputs`;
DiffSynth's own forward still runs for the inputs this one does not handle (attention masks,
IP-adapter). Without Triton or a CUDA tensor the op runs DiffSynth's arithmetic in PyTorch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("fluxbot.engine")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack Triton: the PyTorch path serves
    triton = None

# Tokens per program and its warps: 8 x 4 moved 2.4 TB/s on an H100, 16 x 4 1.9, 32 x 8 1.2
# (benchmarks/attention_micro.py, docs/raw/gpu40_attention_micro.json).
BLOCK_TOKENS = 8
NUM_WARPS = 4
# Ampere and newer: bf16 arithmetic in hardware (the engine computes in bf16 on a GPU). Turing and
# older would need Triton's emulation, not tried.
MIN_CAPABILITY = (8, 0)
# Triton's CPU interpreter (tests): run the kernel on CPU tensors too.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _load(ptrs, bias_ptrs, mask, HAS_BIAS: tl.constexpr):
        """A [BLOCK, D] tile of the projection, its bias added and rounded as `out + bias` rounds."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if HAS_BIAS:  # through fp32: a float8 bias straight to bf16 needs sm_90 in older Triton
            bias = tl.load(bias_ptrs).to(tl.float32).to(x.dtype).to(tl.float32)
            x = (x.to(tl.float32) + bias[None, :]).to(x.dtype)
        return x

    @triton.jit
    def _norm_rope(x, w_ptr, f00, f01, f10, f11, eps, D: tl.constexpr, BLOCK: tl.constexpr):
        """RMSNorm then RoPE for a [BLOCK, D] tile, rounding where DiffSynth's code does."""
        dtype = x.dtype
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        n = (x * rstd[:, None]).to(dtype).to(tl.float32)  # RMSNorm's cast back
        w = tl.load(w_ptr + tl.arange(0, D)).to(tl.float32)
        n = (n * w[None, :]).to(dtype).to(tl.float32)  # times the weight, in dtype
        x0, x1 = tl.split(tl.reshape(n, [BLOCK, D // 2, 2]))
        o0 = f00 * x0 + f01 * x1
        o1 = f10 * x0 + f11 * x1
        return tl.reshape(tl.join(o0, o1), [BLOCK, D]).to(dtype)

    @triton.jit
    def _attention_inputs_kernel(
        qkv_ptr,
        bias_ptr,
        wq_ptr,
        wk_ptr,
        freqs_ptr,
        out_ptr,
        tokens,
        token_offset,
        stride_qkv_b,
        stride_qkv_l,
        stride_f_b,
        stride_f_l,
        stride_out_part,
        stride_out_b,
        stride_out_h,
        eps,
        H: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        pid_l, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_l * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        mask = (rows < tokens)[:, None]
        src = qkv_ptr + b * stride_qkv_b + rows[:, None] * stride_qkv_l + h * D + cols[None, :]
        bias = bias_ptr + h * D + cols
        dst = out_ptr + b * stride_out_b + h * stride_out_h + (token_offset + rows[:, None]) * D + cols[None, :]
        # The rotation of pair i at token t: freqs[t, i] is [[f00, f01], [f10, f11]].
        pairs = tl.arange(0, D // 2)
        f = freqs_ptr + b * stride_f_b + (token_offset + rows[:, None]) * stride_f_l + pairs[None, :] * 4
        f00 = tl.load(f, mask=mask, other=0.0).to(tl.float32)
        f01 = tl.load(f + 1, mask=mask, other=0.0).to(tl.float32)
        f10 = tl.load(f + 2, mask=mask, other=0.0).to(tl.float32)
        f11 = tl.load(f + 3, mask=mask, other=0.0).to(tl.float32)
        q = _norm_rope(_load(src, bias, mask, HAS_BIAS), wq_ptr, f00, f01, f10, f11, eps, D, BLOCK)
        tl.store(dst, q, mask=mask)
        k = _norm_rope(_load(src + H * D, bias + H * D, mask, HAS_BIAS), wk_ptr, f00, f01, f10, f11, eps, D, BLOCK)
        tl.store(dst + stride_out_part, k, mask=mask)
        v = _load(src + 2 * H * D, bias + 2 * H * D, mask, HAS_BIAS)
        tl.store(dst + 2 * stride_out_part, v, mask=mask)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DiffSynth's RMSNorm (general_modules.RMSNorm.forward), operation for operation."""
    variance = x.to(torch.float32).square().mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """DiffSynth's apply_rope for one tensor."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _reference(qkvs, biases, q_weights, k_weights, epss, freqs, heads) -> torch.Tensor:
    qs, ks, vs = [], [], []
    for qkv, bias, wq, wk, eps in zip(qkvs, biases, q_weights, k_weights, epss, strict=True):
        if bias is not None:
            qkv = qkv + bias.to(qkv.dtype)  # as fp8.fp8_linear adds it
        batch = qkv.shape[0]
        q, k, v = qkv.view(batch, -1, 3 * heads, qkv.shape[-1] // (3 * heads)).transpose(1, 2).chunk(3, dim=1)
        qs.append(_rms_norm(q, wq, eps))
        ks.append(_rms_norm(k, wk, eps))
        vs.append(v)
    q, k, v = (torch.cat(parts, dim=2) for parts in (qs, ks, vs))
    return torch.stack([_rope(q, freqs), _rope(k, freqs), v])


def _kernel_fits(qkvs, biases, q_weights, k_weights, freqs, heads) -> bool:
    if triton is None:
        return False
    first = qkvs[0]
    dim = first.shape[-1] // (3 * heads)
    dtype = first.dtype
    return (
        all(t.is_cuda or _INTERPRET for t in qkvs)
        and all(t.device == first.device for t in (*qkvs, freqs))
        and dtype in (torch.bfloat16, torch.float16)
        and dim >= 16
        and dim & (dim - 1) == 0
        and all(
            t.dtype == dtype and t.dim() == 3 and t.shape[0] == first.shape[0] and t.shape[-1] == 3 * heads * dim
            for t in qkvs
        )
        and all(w is not None and w.dtype == dtype and w.shape == (dim,) for w in (*q_weights, *k_weights))
        and all(b is None or b.shape == (3 * heads * dim,) for b in biases)
        and freqs.dtype == torch.float32
        and freqs.dim() == 6
        and freqs.shape[1] == 1
        and freqs.shape[2] == sum(t.shape[1] for t in qkvs)
        and freqs.shape[-3:] == (dim // 2, 2, 2)
        and freqs.shape[0] in (1, first.shape[0])
    )


@torch.library.triton_op("fluxbot::attention_inputs", mutates_args=())
def attention_inputs(
    qkvs: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    q_weights: list[torch.Tensor],
    k_weights: list[torch.Tensor],
    epss: list[float],
    freqs: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """q, k and v for SDPA, stacked: [3, batch, heads, tokens, head_dim].

    `qkvs` are the parts' projections [batch, tokens_i, 3 * heads * head_dim] in the order their
    tokens take (FLUX: text, then image), each with the bias still to add (None: added already)
    and its own q/k norm weights and eps. `freqs` is DiffSynth's RoPE table
    [batch or 1, 1, tokens, head_dim / 2, 2, 2] for all tokens."""
    if not _kernel_fits(qkvs, biases, q_weights, k_weights, freqs, heads):
        return _reference(qkvs, biases, q_weights, k_weights, epss, freqs, heads)
    first = qkvs[0]
    batch, dim = first.shape[0], first.shape[-1] // (3 * heads)
    tokens = sum(t.shape[1] for t in qkvs)
    out = torch.empty((3, batch, heads, tokens, dim), dtype=first.dtype, device=first.device)
    freqs = freqs if freqs.stride()[-3:] == (4, 2, 1) else freqs.contiguous()
    stride_f_b = freqs.stride(0) if freqs.shape[0] > 1 else 0
    offset = 0
    # Triton launches on the current device, not the tensors' (a bot on "cuda:1", uncompiled).
    on_device = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
    for qkv, bias, wq, wk, eps in zip(qkvs, biases, q_weights, k_weights, epss, strict=True):
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        part = qkv.shape[1]
        grid = (triton.cdiv(part, BLOCK_TOKENS), heads, batch)
        with on_device:
            torch.library.wrap_triton(_attention_inputs_kernel)[grid](
                qkv,
                wq if bias is None else bias.contiguous(),
                wq.contiguous(),
                wk.contiguous(),
                freqs,
                out,
                part,
                offset,
                qkv.stride(0),
                qkv.stride(1),
                stride_f_b,
                freqs.stride(2),
                out.stride(0),
                out.stride(1),
                out.stride(2),
                eps,
                H=heads,
                D=dim,
                BLOCK=BLOCK_TOKENS,
                HAS_BIAS=bias is not None,
                num_warps=NUM_WARPS,
            )
        offset += part
    return out


def _projection(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output before its bias, and the bias, for a float8 layer computing on the GPU
    from its resident weights: the kernel adds the bias as it reads the rows (on its own the add
    was a 50 us pass over a double block's image rows, gpu40). Any other layer (streamed, LoRA,
    bf16) runs as it is and its bias is added already."""
    if (
        getattr(layer, "keep_fp8", False)
        and "forward" not in vars(layer)
        and layer.state == 2
        and not layer.lora_A_weights
        and layer.bias is not None
    ):
        weight, bias = layer.computation()
        return layer.linear_forward(x, weight, None), bias
    return layer(x), None


def _norm_params(norm) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight and eps where its forward would compute (DiffSynth may wrap it)."""
    module = norm.computation() if hasattr(norm, "computation") else norm
    return module.weight, module.eps


def _joint_attention_forward(
    self, hidden_states_a, hidden_states_b, image_rotary_emb, attn_mask=None, ipadapter_kwargs_list=None
):
    """FluxJointAttention.forward with its attention inputs from `attention_inputs`."""
    if attn_mask is not None or ipadapter_kwargs_list is not None:
        return type(self).forward(
            self, hidden_states_a, hidden_states_b, image_rotary_emb, attn_mask, ipadapter_kwargs_list
        )
    (wq_a, eq_a), (wk_a, ek_a) = _norm_params(self.norm_q_a), _norm_params(self.norm_k_a)
    (wq_b, eq_b), (wk_b, ek_b) = _norm_params(self.norm_q_b), _norm_params(self.norm_k_b)
    if eq_a != ek_a or eq_b != ek_b:  # the kernel takes one eps for a part's q and k
        return type(self).forward(self, hidden_states_a, hidden_states_b, image_rotary_emb)
    batch = hidden_states_a.shape[0]
    qkv_a, bias_a = _projection(self.a_to_qkv, hidden_states_a)
    qkv_b, bias_b = _projection(self.b_to_qkv, hidden_states_b)
    q, k, v = attention_inputs(
        [qkv_b, qkv_a], [bias_b, bias_a], [wq_b, wq_a], [wk_b, wk_a], [eq_b, eq_a], image_rotary_emb, self.num_heads
    ).unbind(0)
    hidden = F.scaled_dot_product_attention(q, k, v)
    hidden = hidden.transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim)
    text = hidden_states_b.shape[1]
    out_a = self.a_to_out(hidden[:, text:])
    if self.only_out_a:
        return out_a
    return out_a, self.b_to_out(hidden[:, :text])


def install(dit) -> int:
    """Route the double blocks' attention inputs through `attention_inputs`. Returns the blocks
    changed. The single blocks keep DiffSynth's code: there Inductor already fuses the inputs into
    about what the kernel takes (67 against 70 us on an H100, docs/raw/gpu40_attention_micro.json),
    and also the projection's bias add, which the op would leave as a pass of its own."""
    for block in dit.blocks:
        block.attn.forward = types.MethodType(_joint_attention_forward, block.attn)
    return len(dit.blocks)


def kernel_available(device: torch.device | None = None) -> bool:
    """Whether the one-kernel path can run here: Triton importable and, for a CUDA device, an
    Ampere or newer card."""
    if triton is None:
        return False
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    return True
