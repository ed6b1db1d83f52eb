"""What the result buttons that paint from an image cost (issue 16, item 2): Vary (Subtle), Vary
(Strong) and Upscale, timed and their peak GPU memory taken at a VRAM budget, next to the plain
text-to-image job they start from; and a grid of four (item 3: one batch, `grid_4`) against four
single images (`grid_vs_four_singles`: the grid's seconds over four times text_to_image's).

On the GPU (8 GB budget, as engine_bench.py emulates a card: PyTorch's allocator capped so that
reserved memory plus this process's CUDA context stays under the whole-process target):

    python benchmarks/derive_bench.py --budget 8 --weights DIR --json derive_8gb.json
    python benchmarks/derive_bench.py --budget none --weights DIR --json derive_unlimited.json

Quick, anywhere (the test suite runs this): python benchmarks/derive_bench.py --preset tiny-random
--device cpu --weights /tmp/tiny --size 128 --steps 3 --json derive.json

The engine comes from engine_bench.py's `ours_engine` (its environment switches apply: COMPILE,
FP8_MATMUL, CUDA_GRAPHS, ...). One source image is painted at --size with --steps; each kind then
runs --warmup times untimed (compiles, graph captures), then --repeats timed: Vary at the source's
size and steps with the configured strengths ([generation] defaults unless given), Upscale at the
size the engine's plan picks (`Engine.upscale_size`: 2x, or 1.5x where 2x does not fit the budget)
with steps x strength steps, as the bot asks for them. Per kind: median seconds, the phases
(text encoding, denoising, decoding; `dit_tile_forwards` for a tiled pass), and the peaks over its
runs (allocated, reserved, reserved + context as the whole process); `fits_budget` is the last
against the budget's whole-process target. Prints one JSON object (also written to --json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_bench, beside this file
import engine_bench  # found beside this file (the line above); it puts the repository on sys.path

GIB = engine_bench.GIB
PROMPT = engine_bench.PROMPT
KINDS = ("text_to_image", "grid_4", "vary_subtle", "vary_strong", "upscale")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def requests(size: int, steps: int, source: Path, strengths: dict[str, float], upscale: tuple[int, int] | None):
    """Each kind's request, as the bot makes it from a result of `size` and `steps` (views.py)."""
    from bot.engine.api import GenerationRequest

    def derived(strength: float, width: int, height: int, n: int) -> GenerationRequest:
        return GenerationRequest(
            PROMPT, seed=7, steps=n, width=width, height=height, strength=strength, source_path=str(source)
        )

    out = {
        "text_to_image": GenerationRequest(PROMPT, seed=7, steps=steps, width=size, height=size),
        "grid_4": GenerationRequest(PROMPT, seed=7, steps=steps, width=size, height=size, count=4),
        "vary_subtle": derived(strengths["vary_subtle"], size, size, steps),
        "vary_strong": derived(strengths["vary_strong"], size, size, steps),
    }
    if upscale is not None:
        strength = strengths["upscale"]
        out["upscale"] = derived(strength, upscale[0], upscale[1], max(1, math.ceil(steps * strength)))
    return out


def measure(engine, request, device: str, *, warmup: int, repeats: int, ctx: float) -> dict:
    """A kind's runs: `warmup` untimed, then `repeats` timed, with the GPU's peaks over the timed ones."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        engine.generate(request)
    times, details = [], []
    peak_allocated = peak_reserved = 0.0
    for _ in range(repeats):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        result = engine.generate(request)
        sync(device)
        times.append(time.perf_counter() - t)
        details.append(result.timings)
        if cuda:
            peak_allocated = max(peak_allocated, torch.cuda.max_memory_allocated() / GIB)
            peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved() / GIB)
    rec = {
        "size": list(result.image.size),
        "steps": request.steps,
        "count": len(result.images),
        "strength": request.strength,
        "sec": round(statistics.median(times), 3),
        "sec_all": [round(x, 3) for x in times],
    }
    for phase in ("text_encode_s", "denoise_s", "decode_s", "step_s", "dit_tile_forwards"):
        values = [d[phase] for d in details if phase in d]
        if values:
            rec[phase] = round(statistics.median(values), 4)
    if cuda:
        rec.update(
            peak_vram_gib=round(peak_allocated, 3),
            peak_reserved_gib=round(peak_reserved, 3),
            peak_process_gib=round(peak_reserved + ctx, 3),
        )
    else:
        rec.update(peak_vram_gib=None, peak_reserved_gib=None, peak_process_gib=None)
    return rec


def main(argv: list[str] | None = None) -> dict:
    from bot.config import GenerationSettings

    defaults = GenerationSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="8", help="8, 12, 24 or none")
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--preset", default="majicflus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vary-subtle", type=float, default=defaults.vary_subtle_strength)
    ap.add_argument("--vary-strong", type=float, default=defaults.vary_strong_strength)
    ap.add_argument("--upscale", type=float, default=defaults.upscale_strength)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    budget = None if a.budget == "none" else int(a.budget)
    cuda = a.device.startswith("cuda")
    strengths = {"vary_subtle": a.vary_subtle, "vary_strong": a.vary_strong, "upscale": a.upscale}
    rec: dict = {
        "system": "ours",
        "budget_gb": budget,
        "ok": False,
        "preset": a.preset,
        "device": a.device,
        "size": a.size,
        "steps": a.steps,
        "strengths": strengths,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "kinds": {},
    }
    ctx = 0.0
    target = engine_bench.WHOLE_PROCESS_TARGET.get(budget) if budget is not None else None
    if cuda:
        from bot.cli import compile_cache_env
        from bot.config import ModelSettings

        os.environ.update(compile_cache_env(ModelSettings(), os.environ))
        ctx = engine_bench.context_gib(a.device)
        rec.update(context_gib=round(ctx, 3), driver=engine_bench.nvidia_driver())
        if target is not None:  # the card emulated as engine_bench.py does
            total = torch.cuda.get_device_properties(a.device).total_memory
            torch.cuda.set_per_process_memory_fraction((target - ctx) * GIB / total)
            rec["allocator_cap_gib"] = round(target - ctx, 3)
            rec["whole_process_target_gib"] = target
    try:
        t0 = time.perf_counter()
        engine = engine_bench.ours_engine(budget, a.weights, a.device, a.preset)
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        rec["plan"] = engine.plan.describe()
        upscale = engine.upscale_size(a.size, a.size)
        rec["upscale_size"] = None if upscale is None else list(upscale)
        rec["upscale_factor"] = None if upscale is None else upscale[0] / a.size
        with tempfile.TemporaryDirectory(prefix="derive-bench-") as tmp:
            from bot.engine.api import GenerationRequest
            from bot.images import save_png

            first = engine.generate(GenerationRequest(PROMPT, seed=1, steps=a.steps, width=a.size, height=a.size))
            source = save_png(first.image, Path(tmp) / "source.png", {})
            for kind, request in requests(a.size, a.steps, source, strengths, upscale).items():
                try:
                    rec["kinds"][kind] = measure(engine, request, a.device, warmup=a.warmup, repeats=a.repeats, ctx=ctx)
                except Exception as exc:  # one kind that does not fit is a result, not a crash
                    traceback.print_exc()
                    rec["kinds"][kind] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                print(f"  {kind}: {rec['kinds'][kind]}", file=sys.stderr, flush=True)
        single, grid = rec["kinds"].get("text_to_image", {}), rec["kinds"].get("grid_4", {})
        if "sec" in single and "sec" in grid:
            rec["grid_vs_four_singles"] = round(grid["sec"] / (4 * single["sec"]), 3)
        rec["ok"] = all("error" not in k for k in rec["kinds"].values()) and set(rec["kinds"]) == set(KINDS)
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        traceback.print_exc()
    if cuda and target is not None:
        peaks = [k["peak_process_gib"] for k in rec["kinds"].values() if k.get("peak_process_gib") is not None]
        rec["fits_budget"] = bool(peaks) and max(peaks) <= target + 1e-6
    else:
        rec["fits_budget"] = None  # no budget to fit, or no GPU to measure it on
    engine_bench.write_record(a.json, rec)
    return rec


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
