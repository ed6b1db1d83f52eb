"""One benchmark configuration per process: seconds per image and peak memory at a VRAM budget.

    python benchmarks/engine_bench.py --system ours --budget 8 --weights DIR --json OUT.json
    python benchmarks/engine_bench.py --system seed-diffsynth --budget 8 ...
    python benchmarks/engine_bench.py --system ours --preset tiny-random --device cpu ...   (CI smoke run)

A card of B GB is emulated by capping PyTorch's allocator (set_per_process_memory_fraction) so
that reserved memory plus this process's CUDA context stays under the whole-process target
(8 GB card: 7.0 GiB, as nvidia-smi would show). A setup that cannot meet it fails (ok=false).
Systems:
  ours            bot.engine.Engine with the budget as [model] vram_limit_gb
  seed-diffsynth  the original article's setup on DiffSynth 2.x: DiT float8 + everything offloaded
                  to the CPU, DiffSynth's own vram_limit (= budget - 1, its 8 GB example uses 7)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3
PROMPT = ("a weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the "
          "windows, dramatic clouds lit orange and violet, gulls in the wind, fine film grain, "
          "shot on a medium format camera, soft focus in the distance, high detail, calm mood")
WHOLE_PROCESS_TARGET = {8: 7.0, 12: 11.0, 24: 22.5}


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def context_gib(device) -> float:
    """CUDA context + library handles: whole-device used minus what PyTorch reserved."""
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(1, 2, 64, 128, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / GIB


def load(system: str, budget: int | None, root: Path, device: str, preset: str):
    if system == "ours":
        from bot.engine.pipeline import Engine
        settings = SimpleNamespace(preset=preset, dir=root, vram_limit_gb=None if budget is None else float(budget),
                                   device=device, fp8_matmul=os.environ.get("FP8_MATMUL", "auto"), compile="off",
                                   keep_resident="auto", t5_fp8=False)
        engine = Engine.load(settings)

        def run(seed, steps, width, height):
            from bot.engine.pipeline import GenerationRequest
            # A new prompt per image: the prompt cache must not flatter the timings.
            r = engine.generate(GenerationRequest(f"{PROMPT}, take {seed}", seed=seed, steps=steps, width=width, height=height))
            return r.image, r.timings
        return run, engine.plan.describe()

    if system == "seed-diffsynth":
        from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig
        from bot.engine import weights
        from bot.engine.pipeline import _ensure_cpu_empty_cache
        _ensure_cpu_empty_cache()
        files = weights.model_files(weights.preset_root(preset, root))
        if preset == "tiny-random":
            from bot.engine import tiny
            tiny.write_tiny_model(files.root)
            tiny.register_with_diffsynth(files.root)
        fp8, bf16 = torch.float8_e4m3fn, (torch.bfloat16 if device != "cpu" else torch.float32)
        off = lambda store: dict(offload_dtype=store, offload_device="cpu", onload_dtype=store, onload_device="cpu",  # noqa: E731
                                 preparing_dtype=store, preparing_device=device, computation_dtype=bf16,
                                 computation_device=device)
        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=bf16, device=device,
            model_configs=[ModelConfig(path=str(files.dit), **off(fp8)), ModelConfig(path=str(files.clip), **off(bf16)),
                           ModelConfig(path=[str(p) for p in files.t5], **off(bf16)), ModelConfig(path=str(files.vae), **off(bf16))],
            tokenizer_1_config=ModelConfig(path=str(files.tokenizer)),
            tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
            vram_limit=None if (budget is None or device == "cpu") else budget - 1.0,
        )

        def run(seed, steps, width, height):
            marks = {}

            def bar(ts):
                marks["denoise"] = time.perf_counter()
                yield from ts
                marks["decode"] = time.perf_counter()
            t0 = time.perf_counter()
            img = pipe(prompt=f"{PROMPT}, take {seed}", seed=seed, num_inference_steps=steps, width=width, height=height,
                       progress_bar_cmd=bar)
            end = time.perf_counter()
            return img, {"text_encode_s": marks["denoise"] - t0, "denoise_s": marks["decode"] - marks["denoise"],
                         "decode_s": end - marks["decode"]}
        return run, f"DiffSynth vram_limit={None if budget is None else budget - 1.0}"
    raise SystemExit(f"unknown system {system}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", default="ours", choices=["ours", "seed-diffsynth"])
    ap.add_argument("--budget", default="none", help="8, 12, 24 or none")
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--preset", default="majicflus")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    budget = None if a.budget == "none" else int(a.budget)
    cuda = a.device.startswith("cuda")
    rec = {"system": a.system, "budget_gb": budget, "ok": False, "steps": a.steps, "size": a.size,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "card": torch.cuda.get_device_name() if cuda else "cpu"}
    try:
        import diffsynth
        rec["diffsynth"] = getattr(diffsynth, "__version__", None) or __import__("importlib.metadata").metadata.version("diffsynth")
    except Exception:
        pass
    ctx = 0.0
    if cuda:
        ctx = context_gib(a.device)
        rec["context_gib"] = round(ctx, 3)
        rec["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        if budget is not None:
            total = torch.cuda.get_device_properties(a.device).total_memory
            cap = (WHOLE_PROCESS_TARGET[budget] - ctx) * GIB
            torch.cuda.set_per_process_memory_fraction(cap / total)
            rec["allocator_cap_gib"] = round(cap / GIB, 3)
    times, steps_s, details = [], [], []
    try:
        t0 = time.perf_counter()
        run, setup = load(a.system, budget, a.weights, a.device, a.preset)
        rec["setup"] = setup
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        for i in range(a.warmup + a.images):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            img, timing = run(1000 + i, a.steps, a.size, a.size)
            if cuda:
                torch.cuda.synchronize()
            el = time.perf_counter() - t
            print(f"  image {i} ({'warm-up' if i < a.warmup else 'timed'}): {el:.2f} s {timing}", flush=True)
            if i >= a.warmup:
                times.append(el)
                steps_s.append(timing["denoise_s"] / a.steps)
                details.append(timing)
        rec.update(ok=True, sec_per_image=round(statistics.median(times), 3),
                   sec_per_step=round(statistics.median(steps_s), 4),
                   text_encode_s=round(statistics.median(d["text_encode_s"] for d in details), 3),
                   vae_s=round(statistics.median(d["decode_s"] for d in details), 3),
                   images=len(times))
    except Exception as exc:  # a budget the setup cannot meet is a result, not a crash
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        traceback.print_exc()
    if cuda:
        rec["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        rec["peak_process_gib"] = round(rec["peak_reserved_gib"] + ctx, 3)
        if budget is not None and rec["peak_process_gib"] > WHOLE_PROCESS_TARGET[budget] + 1e-6:
            rec["ok"] = False
            rec.setdefault("error", f"whole-process peak {rec['peak_process_gib']} GiB over the {WHOLE_PROCESS_TARGET[budget]} GiB target")
    else:
        rec.update(peak_vram_gib=None, peak_reserved_gib=None, peak_process_gib=None)
    rec["peak_host_gib"] = round(host_peak_gib(), 3)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
