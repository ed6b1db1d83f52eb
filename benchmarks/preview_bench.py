"""What a live preview costs (issue 16, item 1): one preview of a 1024x1024 FLUX latent
(1x16x128x128, bf16), made by the engine's own code (`bot.engine.preview`: x0 = x_t - sigma * v, the
fixed 16->3 map, the resize to 384x384, uint8, the copy to page-locked memory), against the time of
one denoising step that you pass in; and the JPEG and WebP that each progress edit then carries
(bytes, and the encoding time, which the bot spends off the engine's thread).

On the GPU (the step time: docs/benchmarks.md, e.g. 88 ms unlimited or ~135 ms at the 8 GB budget):

    python benchmarks/preview_bench.py --step-ms 88 --out preview_bench.json

Quick, anywhere (the test suite runs this): python benchmarks/preview_bench.py --device cpu --repeats 3

Prints one JSON object (also written to --out). Times are medians over --repeats after a warm-up:
`device_ms` is the preview's work on the device (CUDA events around it: kernels and the copy);
`engine_thread_ms` is what the call costs the engine's thread, which queues that work and does not
wait for it (`engine_thread_ms_behind_busy_gpu`: the same call with ~15 ms of other work still
queued on the GPU; null on the CPU); `pct_of_step` is device_ms against one step (the issue's
target: under 1%), and `pct_per_step_amortized` spreads it over the steps between two edits (at
most one per 1.5 s). Bytes are for two synthetic latents: `noise` (random: the worst case for a
JPEG) and `smooth` (low-frequency structure plus a little noise, closer to a painting's latent); no
model is loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bot.engine import preview

LATENT_SHAPE = (1, 16, 128, 128)  # a 1024x1024 image
SIGMA = 0.5  # mid-schedule; the cost does not depend on it


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
    }


def latents(kind: str, device: torch.device, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v) in bf16 whose clean-latent guess is a `kind` latent: x_t = (1 - s) x0 + s n, v = n - x0."""
    noise = torch.randn(LATENT_SHAPE, generator=generator)
    if kind == "noise":
        x0 = torch.randn(LATENT_SHAPE, generator=generator)
    else:  # low-frequency structure, as a painting's latent has, with a little fine detail
        coarse = torch.randn(1, 16, 8, 8, generator=generator)
        x0 = torch.nn.functional.interpolate(coarse, size=LATENT_SHAPE[-2:], mode="bicubic", align_corners=False)
        x0 = x0 + 0.1 * torch.randn(LATENT_SHAPE, generator=generator)
    x_t = (1 - SIGMA) * x0 + SIGMA * noise
    return x_t.to(device, torch.bfloat16), (noise - x0).to(device, torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def behind_busy_gpu(tap: preview.StepTap, device: torch.device, repeats: int, warmup: int) -> dict | None:
    """The preview call while the GPU is still busy with earlier work (as behind a queued step): if
    anything in it waited for the GPU, this would be that work's time, not a fraction of a ms."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) / 90
    times: list[float] = []
    queued_ms: list[float] = []
    for i in range(warmup + min(repeats, 20)):
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):  # 11 TFLOP of matmuls queued ahead (~15 ms on an H200)
            a = torch.tanh(a @ a)
        end.record()
        t0 = time.perf_counter()
        tap.preview()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
            end.synchronize()
            queued_ms.append(start.elapsed_time(end))
    sync(device)
    return {**stats(times), "gpu_work_queued_ahead_ms": round(statistics.median(queued_ms), 2)}


def measure(device: torch.device, repeats: int, warmup: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    tap = preview.StepTap()
    x_t, v = latents("noise", device, generator)
    tap.record(x_t, v, SIGMA)
    thread_ms: list[float] = []
    device_ms: list[float] = []
    made = None
    for i in range(warmup + repeats):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        made = tap.preview()
        t1 = time.perf_counter()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            on_device = start.elapsed_time(end)
        else:
            on_device = (t1 - t0) * 1000  # the CPU does the work in the call itself
        if i >= warmup:
            thread_ms.append((t1 - t0) * 1000)
            device_ms.append(on_device)
    assert made is not None
    shown = made.encode()
    out: dict = {
        "preview_size": [shown.width, shown.height],
        "engine_thread_ms": stats(thread_ms),
        "device_ms": stats(device_ms),
        "engine_thread_ms_behind_busy_gpu": behind_busy_gpu(tap, device, repeats, warmup),
        "encode_ms": {},
        "bytes": {},
    }
    size = (shown.width, shown.height)
    for fmt in ("jpeg", "webp"):
        times: list[float] = []
        for i in range(warmup + repeats):
            made = preview.TensorPreview(preview.latents_to_pixels(tap.clean_latents(), size), fmt=fmt)
            sync(device)  # the copy is done: what is timed is the encoding alone
            t0 = time.perf_counter()
            made.encode()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
        out["encode_ms"][fmt] = stats(times)
        out["bytes"][fmt] = {}
        for kind in ("noise", "smooth"):
            x_t, v = latents(kind, device, torch.Generator().manual_seed(1))
            x0 = preview.clean_latents(x_t, v, SIGMA)
            out["bytes"][fmt][kind] = len(
                preview.TensorPreview(preview.latents_to_pixels(x0, size), fmt=fmt).encode().data
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--step-ms", type=float, default=88.0, help="one denoising step's time to compare with")
    parser.add_argument("--edit-interval", type=float, default=1.5, help="seconds between progress edits (the bot's)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu for a quick run")
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "latent_shape": list(LATENT_SHAPE),
        "latent_dtype": "bfloat16",
        "repeats": args.repeats,
        **measure(device, args.repeats, args.warmup),
    }
    step_ms = args.step_ms
    steps_per_edit = max(1.0, args.edit_interval * 1000 / step_ms)
    one = result["device_ms"]["median"]
    result.update(
        step_ms=step_ms,
        pct_of_step=round(100 * one / step_ms, 4),
        engine_thread_pct_of_step=round(100 * result["engine_thread_ms"]["median"] / step_ms, 4),
        edit_interval_s=args.edit_interval,
        steps_per_edit=round(steps_per_edit, 2),
        pct_per_step_amortized=round(100 * one / steps_per_edit / step_ms, 4),
        target_pct_of_step=1.0,
        meets_target=100 * one / step_ms < 1.0,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
