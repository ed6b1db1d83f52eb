"""Does a job at another image size slow the default size down afterwards?

With the DiT compiled, the first job at a new size compiles the blocks for it. Under Dynamo's
automatic dynamic shapes that compile is shape-generic, and later jobs of every size, the default
one included, may then run it; the engine turns automatic dynamic shapes off (one graph per size),
and DYNAMIC=1 turns them back on for comparison. This times default-size steps, then 1 + N jobs at
/imagine's portrait preset, then default-size steps again, in one process.

    python benchmarks/size_switch.py --weights DIR --json out.json     # step times need a CUDA GPU
    DYNAMIC=1 python benchmarks/size_switch.py ...                     # Dynamo's own default
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_bench import load, write_record  # same directory

from bot.validation import size_presets


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--preset", default="majicflus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="the square (default) size")
    a = ap.parse_args()
    run, setup = load("ours", None, a.weights, a.device, a.preset)
    if "DYNAMIC" in os.environ:  # after load: the engine's own choice is what this overrides
        torch._dynamo.config.automatic_dynamic_shapes = os.environ["DYNAMIC"] == "1"
    seed = iter(range(1000))
    square = (a.size, a.size)
    portrait = size_presets(a.size, a.size)["portrait"]
    portrait = (portrait.width, portrait.height)

    def job(size):
        t0 = time.perf_counter()
        _, timings = run(next(seed), a.steps, *size)
        return time.perf_counter() - t0, timings.get("step_s")  # GPU event time (none on the CPU)

    rec = {
        "automatic_dynamic_shapes": torch._dynamo.config.automatic_dynamic_shapes,
        "setup": setup,
        "card": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "square": square,
        "portrait": portrait,
    }
    rec["first_square_s"] = job(square)[0]
    before = [job(square) for _ in range(a.images)]
    rec["first_portrait_s"] = job(portrait)[0]
    portraits = [job(portrait) for _ in range(a.images)]
    after = [job(square) for _ in range(a.images)]
    for name, runs in (("square_before", before), ("portrait", portraits), ("square_after", after)):
        rec[f"{name}_sec_per_image"] = statistics.median(s for s, _ in runs)
        steps = [st for _, st in runs if st is not None]
        rec[f"{name}_step_s"] = statistics.median(steps) if steps else None
    write_record(a.json, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
