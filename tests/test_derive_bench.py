"""benchmarks/derive_bench.py runs on the CPU with the tiny model and writes the record the GPU run is
read from (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "derive_bench.py"


def load_bench_module():
    spec = importlib.util.spec_from_file_location("derive_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_derive_bench_on_the_cpu_writes_every_kind(tmp_path, model_dir, capsys):
    out = tmp_path / "derive.json"
    bench = load_bench_module()
    rec = bench.main(
        [
            *("--preset", "tiny-random", "--device", "cpu", "--weights", str(model_dir)),
            *("--budget", "none", "--size", "128", "--steps", "3", "--warmup", "0", "--repeats", "2"),
            *("--json", str(out)),
        ]
    )
    written = json.loads(out.read_text())
    assert written == rec == json.loads(capsys.readouterr().out)
    assert rec["ok"] and "error" not in rec
    assert rec["budget_gb"] is None and rec["fits_budget"] is None and rec["card"] == "cpu"
    assert rec["strengths"] == {"vary_subtle": 0.48, "vary_strong": 0.75, "upscale": 0.3}
    assert rec["upscale_size"] == [256, 256] and rec["upscale_factor"] == 2.0
    kinds = rec["kinds"]
    assert set(kinds) == {"text_to_image", "grid_4", "vary_subtle", "vary_strong", "upscale"}
    assert (kinds["grid_4"]["count"], kinds["text_to_image"]["count"]) == (4, 1)
    assert rec["grid_vs_four_singles"] == round(kinds["grid_4"]["sec"] / (4 * kinds["text_to_image"]["sec"]), 3)
    for name, kind in kinds.items():
        assert kind["sec"] > 0 and len(kind["sec_all"]) == 2, name
        assert kind["peak_vram_gib"] is None and "denoise_s" in kind and "decode_s" in kind, name
    assert kinds["vary_subtle"]["size"] == kinds["text_to_image"]["size"] == [128, 128]
    assert (kinds["vary_subtle"]["strength"], kinds["vary_strong"]["strength"]) == (0.48, 0.75)
    assert kinds["upscale"]["size"] == [256, 256] and kinds["upscale"]["steps"] == 1
    assert kinds["upscale"]["dit_tile_forwards"] == 9  # 3 x 3 tiles of the source's size, one step
