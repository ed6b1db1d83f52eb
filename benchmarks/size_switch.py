"""Does a job at another image size slow the default size down afterwards?

With the DiT compiled, the first job at a new size recompiles the blocks. Dynamo's automatic
dynamic shapes then compiles a shape-generic graph for the token count, and later jobs of every
size, the default one included, may run that graph. This times default-size steps before and after
one portrait job (832x1216, /imagine's portrait preset) in one process.

    python benchmarks/size_switch.py --weights DIR --json out.json     # needs a CUDA GPU
    DYNAMIC=1 python benchmarks/size_switch.py ...                     # Dynamo's own default for comparison
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
from bot.engine.pipeline import Engine, GenerationRequest  # noqa: E402
from engine_bench import PROMPT, ours_settings, write_record  # noqa: E402  (same directory)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--preset", default="majicflus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    engine = Engine.load(ours_settings(None, a.weights, a.device, a.preset))
    if "DYNAMIC" in os.environ:  # after load: the engine's own choice is what this overrides
        torch._dynamo.config.automatic_dynamic_shapes = os.environ["DYNAMIC"] == "1"
    seed = iter(range(1000))

    def job(width, height):
        t0 = time.perf_counter()
        r = engine.generate(GenerationRequest(f"{PROMPT}, take {next(seed)}", seed=1, steps=a.steps,
                                              width=width, height=height))
        return time.perf_counter() - t0, r.timings.get("step_s", 0.0)  # GPU event time (none on the CPU)

    rec = {"automatic_dynamic_shapes": torch._dynamo.config.automatic_dynamic_shapes,
           "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    rec["first_square_s"] = job(1024, 1024)[0]
    before = [job(1024, 1024) for _ in range(a.images)]
    rec["first_portrait_s"], _ = job(832, 1216)
    portrait = [job(832, 1216) for _ in range(a.images)]
    after = [job(1024, 1024) for _ in range(a.images)]
    for name, runs in (("square_before", before), ("portrait", portrait), ("square_after", after)):
        rec[f"{name}_sec_per_image"] = statistics.median(s for s, _ in runs)
        rec[f"{name}_step_s"] = statistics.median(st for _, st in runs)
    write_record(a.json, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
