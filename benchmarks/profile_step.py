"""Where a denoising step's time goes: torch.profiler over two steps of a 1024x1024 image.

    python benchmarks/profile_step.py --weights DIR --budget none --out OUT_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.config import ModelSettings  # noqa: E402
from bot.engine.pipeline import Engine, GenerationRequest  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--budget", default="none")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    budget = None if a.budget == "none" else float(a.budget)
    settings = ModelSettings(preset="majicflus", dir=a.weights, vram_limit_gb=budget, device="cuda",
                             fp8_matmul=os.environ.get("FP8_MATMUL", "auto"))
    engine = Engine.load(settings)
    req = GenerationRequest("profile", seed=1, steps=4, width=1024, height=1024)
    engine.generate(req)  # warm-up (compiles the quantizer)
    steps = {"n": 0}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    def on_progress(i, n):
        if i == 1:
            prof.start()
        if i == 3:
            prof.stop()
        steps["n"] = i
    engine.generate(GenerationRequest("profile two", seed=2, steps=4, width=1024, height=1024), on_progress=on_progress)
    a.out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (a.out / f"profile_{a.budget}.txt").write_text(table)
    print(table[:6000])
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    print(cpu[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
