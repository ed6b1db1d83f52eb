"""A FLUX block's attention inputs (q/k RMSNorm, RoPE, SDPA's layout): DiffSynth's code compiled
by Inductor with the engine's settings against the engine's one Triton kernel (bot/engine/attention.py),
at full size (1024x1024: 4096 image + 512 text tokens, 24 heads of 128), bf16, timed from a CUDA
graph (no launch gaps): a double block's attention (inputs + SDPA) both ways, a single block's as
DiffSynth writes it, SDPA alone, and the kernel alone on a single block's inputs at several tile sizes.

    python benchmarks/attention_micro.py [--json out.json]      # needs a CUDA GPU
"""

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cuda_timing import graph_us as bench  # same directory
from diffsynth.models import flux_dit
from engine_bench import write_record  # same directory

from bot.engine import attention, inductor

HEADS, DIM, TEXT, IMAGE = 24, 128, 512, 4096


def modules(dt):
    """A double block's attention and a single block, with their linear layers as identities so
    the timed code runs from the q/k/v projections to the attention output."""
    dim = HEADS * DIM
    joint = flux_dit.FluxJointAttention(dim, dim, HEADS, DIM).cuda().to(dt)
    for name in ("a_to_qkv", "b_to_qkv", "a_to_out", "b_to_out"):
        setattr(joint, name, torch.nn.Identity())
    single = flux_dit.FluxSingleTransformerBlock(dim, HEADS).cuda().to(dt)
    for m in (joint, single):
        for name, child in m.named_modules():
            if name.startswith("norm_q") or name.startswith("norm_k"):
                child.weight.data = torch.rand(DIM, device="cuda", dtype=dt) + 0.5
    return joint, single


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    inductor.configure(tuning=True)
    ids = torch.randint(0, 64, (1, TEXT + IMAGE, 3), device="cuda").float()
    freqs = flux_dit.RoPEEmbedding(DIM, 10000, [16, 56, 56])(ids)
    dim = HEADS * DIM
    image_qkv = torch.randn(1, IMAGE, 3 * dim, device="cuda", dtype=dt)
    text_qkv = torch.randn(1, TEXT, 3 * dim, device="cuda", dtype=dt)
    single_qkv = torch.randn(1, TEXT + IMAGE, 7 * dim, device="cuda", dtype=dt)[:, :, : 3 * dim]
    joint, single = modules(dt)
    q, k, v = (torch.randn(1, HEADS, TEXT + IMAGE, DIM, device="cuda", dtype=dt) for _ in range(3))
    results = {"sdpa_us": bench(lambda: F.scaled_dot_product_attention(q, k, v))}
    # Bytes that must move: q, k, v read once and written once (plus the RoPE table, L2-resident).
    moved = 2 * 3 * (TEXT + IMAGE) * dim * 2
    torch._dynamo.reset()
    fs = torch.compile(lambda x: single.process_attention(x, freqs), fullgraph=True)
    results["diffsynth_compiled_single_us"] = bench(fs, single_qkv)
    for fused in (False, True):
        torch._dynamo.reset()
        if fused:  # the double blocks' forward as the engine installs it
            joint.forward = types.MethodType(attention._joint_attention_forward, joint)
        name = "kernel" if fused else "diffsynth_compiled"
        fj = torch.compile(lambda a, b: joint(a, b, freqs), fullgraph=True)
        results[f"{name}_double_us"] = bench(fj, image_qkv, text_qkv)
        print(
            f"{name}: double block {results[f'{name}_double_us']:.1f} us with SDPA ({results['sdpa_us']:.1f} us)",
            flush=True,
        )
    print(f"diffsynth_compiled: single block {results['diffsynth_compiled_single_us']:.1f} us with SDPA", flush=True)

    # The kernel alone on a single block's inputs (the engine leaves those to Inductor).
    def inputs():
        return attention.attention_inputs(
            [single_qkv],
            [None],
            [single.norm_q_a.weight],
            [single.norm_k_a.weight],
            [single.norm_q_a.eps],
            freqs,
            HEADS,
        )

    engine_tile = attention.BLOCK_TOKENS, attention.NUM_WARPS
    for block, warps in ((8, 4), (16, 4), (4, 4), (8, 2), (32, 8)):
        attention.BLOCK_TOKENS, attention.NUM_WARPS = block, warps
        t = bench(inputs)
        results[f"kernel_alone_block{block}_warps{warps}_us"] = t
        print(
            f"kernel alone, single block's inputs, {block} tokens x {warps} warps: {t:.1f} us, "
            f"{moved / t / 1e3:.0f} GB/s",
            flush=True,
        )
    attention.BLOCK_TOKENS, attention.NUM_WARPS = engine_tile
    saved = 19 * (results["diffsynth_compiled_double_us"] - results["kernel_double_us"])
    results["double_blocks_saved_ms_per_step"] = saved / 1000
    print(f"19 double blocks a step: {saved / 1000:.2f} ms saved", flush=True)
    results["card"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    if args.json:
        write_record(args.json, results)


if __name__ == "__main__":
    with torch.inference_mode():  # as the engine runs (the op has no backward)
        main()
