"""Where a denoising step's time goes: torch.profiler over two steps of a 1024x1024 image.

python benchmarks/profile_step.py --weights DIR --budget none --out OUT_DIR
python benchmarks/profile_step.py ... --first   # a job's start instead: prompt, first step, and
                                                # the GPU's idle gaps with what the CPU did in them
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import ours_engine  # same directory

from bot.engine.api import GenerationRequest


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def busy_summary(prof) -> str:
    """How much of the profiled window the SMs (kernels) and the copy engine (host->device
    copies) were busy: tells a compute-bound step from a transfer-bound one, and shows idle gaps."""
    kernels, copies = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        (copies if "Memcpy HtoD" in e.name else kernels).append(span)
    if not kernels:
        return "no CUDA activity recorded"
    spans = kernels + copies
    window = max(b for _, b in spans) - min(a for a, _ in spans)
    k, c = _union(kernels), _union(copies)
    return (
        f"window {window / 1e3:.1f} ms: kernels busy {k / 1e3:.1f} ms ({100 * k / window:.0f}%), "
        f"host->device copies busy {c / 1e3:.1f} ms ({100 * c / window:.0f}%)"
    )


def idle_gaps(prof, min_ms: float = 0.5) -> str:
    """The GPU's idle gaps longer than `min_ms`, each with the CPU-side operations that ran in it
    (by name, milliseconds inside the gap): what the GPU waited for."""
    kernels, cpu = [], []
    for e in prof.events():
        span = (e.time_range.start, e.time_range.end)
        (kernels if e.device_type == torch.autograd.DeviceType.CUDA else cpu).append((span, e.name))
    kernels.sort()
    lines, end = [], None
    t0 = kernels[0][0][0] if kernels else 0
    for (a, b), _ in kernels:
        if end is not None and a - end > min_ms * 1e3:
            inside: dict[str, float] = {}
            for (c, d), name in cpu:
                overlap = min(d, a) - max(c, end)
                if overlap > 0:
                    inside[name] = inside.get(name, 0.0) + overlap
            top = sorted(inside.items(), key=lambda kv: -kv[1])[:12]
            lines.append(
                f"gap {(a - end) / 1e3:.2f} ms at +{(end - t0) / 1e3:.1f} ms: "
                + ", ".join(f"{n} {v / 1e3:.2f}" for n, v in top)
            )
        end = b if end is None else max(end, b)
    return "\n".join(lines) or "no gaps"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--budget", default="none")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--first", action="store_true", help="profile a job's start up to its first step instead")
    a = ap.parse_args()
    budget = None if a.budget == "none" else float(a.budget)
    engine = ours_engine(budget, a.weights, "cuda", "majicflus")
    req = GenerationRequest("profile", seed=1, steps=4, width=1024, height=1024)
    engine.generate(req)  # warm-up: compiles the blocks (and captures the step graph)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )

    start, stop = (None, 1) if a.first else (1, 3)  # --first: from the job's start

    def on_progress(i, n):
        if i == start:
            prof.start()
        if i == stop:
            prof.stop()

    if a.first:
        prof.start()
    engine.generate(GenerationRequest("profile two", seed=2, steps=4, width=1024, height=1024), on_progress=on_progress)
    a.out.mkdir(parents=True, exist_ok=True)
    tag = f"first_{a.budget}" if a.first else a.budget
    if a.first:
        gaps = idle_gaps(prof)
        print(gaps)
        (a.out / f"gaps_{tag}.txt").write_text(gaps + "\n")
        prof.export_chrome_trace(str(a.out / f"trace_{tag}.json"))
    summary = busy_summary(prof)
    print(summary)
    (a.out / f"busy_{tag}.txt").write_text(summary + "\n")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=80, max_name_column_width=110)
    (a.out / f"profile_{tag}.txt").write_text(table)
    print(table[:6000])
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    print(cpu[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
