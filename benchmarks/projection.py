"""What a home card would do (issue #19, item 4): seconds per step and per image projected for RTX
cards from what was measured on the lent GPU, with the model checked against a throttled run.

    python benchmarks/projection.py --resident docs/raw/gpu60_ours_12.json \\
        --streamed docs/raw/gpu60_ours_8.json --throttled docs/raw/gpu60_ours_8_h2d13.json --json out.json

The model, and what it assumes:
- A step's work is the DiT's matmuls (float8 where the card has float8 matmuls, else bf16 after a
  cast) and its attention (bf16), counted from FLUX.1's shapes at the image size (`step_flops`).
- The lent GPU's measured step time, with nothing streamed (`--resident`), gives the fraction of its
  published dense peak the engine reaches; a home card is assumed to reach the same fraction of its
  own (the same kernels, through the same libraries; not measured on such a card).
- Under a budget the weights that do not fit cross PCIe every step (`dit_streamed_gib_per_step` of
  the `--streamed` record), overlapped with compute: a step takes the longer of the two. The
  throttled run (`--throttled`: the same budget with the copies capped at a home card's link rate)
  checks that; the unthrottled `--streamed` run shows how far from ideal the overlap is when the two
  are close (on the lent GPU), which the table gives as each card's upper bound.
Peaks are NVIDIA's published dense tensor throughput with FP32 accumulation (GeForce cards run FP16/
FP8 with FP32 accumulation at half their FP16-accumulate rate); link rates are what pinned copies reach
on PCIe 4.0 (x16 about 25 GB/s, x8 about 13), not the bus's nominal rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class Card:
    name: str
    budget_gb: int  # the budget the bot runs it at ([model] vram_limit_gb)
    fp8_tflops: float | None  # dense, FP32 accumulate; None: no float8 matmuls (the cast-to-bf16 path)
    bf16_tflops: float  # dense, FP32 accumulate
    link_gb_s: float  # pinned host->GPU copies
    note: str


# The lent GPU: H200 SXM, NVIDIA's data sheet (dense: half the "with sparsity" figures).
LENT = Card("NVIDIA H200", 0, 1979.0, 989.0, 55.4, "measured link: Streamer.cap_rate's probe, gpu60")
# Ada figures: the Ada Lovelace whitepaper (RTX 4090) and NVIDIA's spec pages, per SM and clock
# (512 dense bf16 FLOPs per SM per clock with FP32 accumulate, float8 twice that); Ampere: GA102/GA106.
CARDS = (
    Card("RTX 3060 12 GB", 12, None, 25.5, 25.0, "Ampere: no float8 matmuls; PCIe 4.0 x16"),
    Card("RTX 4060 8 GB", 8, 60.5, 30.2, 13.0, "Ada; PCIe 4.0 x8"),
    Card("RTX 4070 12 GB", 12, 116.6, 58.3, 25.0, "Ada; PCIe 4.0 x16"),
    Card("RTX 4090 24 GB", 24, 330.3, 165.2, 25.0, "Ada; PCIe 4.0 x16"),
)

# FLUX.1's DiT (the shapes DiffSynth's FluxDiT builds): 19 double-stream and 38 single-stream blocks.
HIDDEN, MLP, DOUBLE, SINGLE, TEXT_TOKENS = 3072, 12288, 19, 38, 512


def step_flops(width: int = 1024, height: int = 1024) -> dict[str, float]:
    """FLOPs of one DiT forward: the blocks' matmuls (the AdaLN modulations are computed once per job
    in this engine, so they are not counted) and attention (QK^T and AV), at 2 FLOPs per multiply-add."""
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS
    # Per token and block: qkv + out projection + MLP (double); linear1 (qkv + MLP in) + linear2 (single).
    per_double = HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN + 2 * HIDDEN * MLP
    per_single = HIDDEN * (3 * HIDDEN + MLP) + (HIDDEN + MLP) * HIDDEN
    matmul = 2 * tokens * (DOUBLE * per_double + SINGLE * per_single)
    attention = (DOUBLE + SINGLE) * 4 * tokens * tokens * HIDDEN
    return {"tokens": tokens, "matmul": float(matmul), "attention": float(attention)}


def compute_s(flops: dict[str, float], card: Card, efficiency: float) -> float:
    """Seconds of a step's compute on `card` at `efficiency` of its peaks."""
    matmul_peak = card.fp8_tflops if card.fp8_tflops is not None else card.bf16_tflops
    return (flops["matmul"] / (matmul_peak * 1e12) + flops["attention"] / (card.bf16_tflops * 1e12)) / efficiency


def project(resident: dict, streamed: dict, throttled: dict | None, steps: int = 20) -> dict:
    flops = step_flops(resident.get("size", 1024), resident.get("size", 1024))
    lent_step = resident["sec_per_step_steady"]
    efficiency = compute_s(flops, LENT, 1.0) / lent_step
    streamed_bytes = streamed["dit_streamed_gib_per_step"] * GIB
    lent_streamed_ideal = max(lent_step, streamed_bytes / (LENT.link_gb_s * 1e9))
    overlap_excess = max(0.0, streamed["sec_per_step_steady"] - lent_streamed_ideal)  # imperfect overlap, measured
    check = None
    if throttled is not None:
        cap = throttled["h2d_cap"]["cap_gb_per_s"]
        predicted = max(lent_step, streamed_bytes / (cap * 1e9))
        check = {
            "cap_gb_s": cap,
            "predicted_step_s": round(predicted, 4),
            "measured_step_s": throttled["sec_per_step_steady"],
            "error_pct": round(100 * (throttled["sec_per_step_steady"] / predicted - 1), 1),
        }
    rows = []
    for card in CARDS:
        compute = compute_s(flops, card, efficiency)
        stream = (streamed_bytes / (card.link_gb_s * 1e9)) if card.budget_gb <= 8 else 0.0
        step = max(compute, stream)
        rows.append(
            {
                **asdict(card),
                "compute_s_per_step": round(compute, 3),
                "stream_s_per_step": round(stream, 3),
                "sec_per_step": round(step, 3),
                "sec_per_step_upper": round(step + (overlap_excess if stream else 0.0), 3),
                # Denoising only: text encoding and the VAE decode (0.3 s on the lent GPU) are small
                # and latency-bound there, so scaling them by peak throughput would say little.
                "denoise_s_per_image": round(steps * step, 1),
                "bound": "compute" if compute >= stream else "PCIe",
            }
        )
    return {
        "flops_per_step": flops,
        "lent_card": asdict(LENT),
        "lent_step_s": lent_step,
        "efficiency_of_peak": round(efficiency, 3),
        "streamed_gib_per_step_at_8gb": streamed["dit_streamed_gib_per_step"],
        "overlap_excess_s": round(overlap_excess, 4),
        "throttled_check": check,
        "steps": steps,
        "cards": rows,
    }


def markdown(p: dict) -> str:
    lines = [
        "| card (budget) | float8 matmuls | step compute | PCIe per step | **s per step** | **denoising, 20 steps** |",
        "|---|---|---|---|---|---|",
    ]
    for r in p["cards"]:
        upper = f" (≤ {r['sec_per_step_upper']:.2f})" if r["sec_per_step_upper"] != r["sec_per_step"] else ""
        lines.append(
            f"| {r['name']} ({r['budget_gb']} GB) | {'yes' if r['fp8_tflops'] else 'no (cast to bf16)'} "
            f"| {r['compute_s_per_step']:.2f} s | {r['stream_s_per_step']:.2f} s | **{r['sec_per_step']:.2f}**{upper} "
            f"| **{r['denoise_s_per_image']:.0f} s** |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resident", type=Path, required=True, help="ours at a budget that streams nothing (12 GB)")
    ap.add_argument("--streamed", type=Path, required=True, help="ours at 8 GB (records dit_streamed_gib_per_step)")
    ap.add_argument("--throttled", type=Path, help="ours at 8 GB with H2D_GBPS set (the check)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    p = project(load(a.resident), load(a.streamed), load(a.throttled) if a.throttled else None)
    if a.json:
        a.json.write_text(json.dumps(p, indent=1) + "\n")
    print(json.dumps({k: v for k, v in p.items() if k != "cards"}, indent=1))
    print(markdown(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
