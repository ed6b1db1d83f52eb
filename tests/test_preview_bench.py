"""benchmarks/preview_bench.py runs on the CPU and writes the JSON the GPU run is read from (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "preview_bench.py"


def load_bench_module():
    spec = importlib.util.spec_from_file_location("preview_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preview_bench_on_the_cpu_writes_its_fields(tmp_path, capsys):
    out = tmp_path / "preview_bench.json"
    bench = load_bench_module()
    result = bench.main(["--device", "cpu", "--repeats", "2", "--warmup", "1", "--step-ms", "100", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == result == json.loads(capsys.readouterr().out)
    assert written["device"] == "cpu" and written["latent_shape"] == [1, 16, 128, 128]
    assert written["latent_dtype"] == "bfloat16" and written["preview_size"] == [384, 384]
    for key in ("engine_thread_ms", "device_ms", "encode_ms", "bytes"):
        assert key in written, key
    assert written["engine_thread_ms_behind_busy_gpu"] is None  # measured on CUDA only
    for timing in (written["engine_thread_ms"], written["device_ms"], *written["encode_ms"].values()):
        assert set(timing) == {"median", "p90", "min", "max"}
        assert 0 < timing["min"] <= timing["median"] <= timing["max"]
    assert set(written["encode_ms"]) == set(written["bytes"]) == {"jpeg", "webp"}
    for sizes in written["bytes"].values():
        assert set(sizes) == {"noise", "smooth"} and all(0 < n < 200_000 for n in sizes.values())
    assert written["step_ms"] == 100 and written["edit_interval_s"] == 1.5 and written["steps_per_edit"] == 15
    assert written["pct_of_step"] == round(written["device_ms"]["median"], 4)  # of a 100 ms step
    assert written["pct_per_step_amortized"] < written["pct_of_step"]
    assert isinstance(written["meets_target"], bool) and written["target_pct_of_step"] == 1.0
