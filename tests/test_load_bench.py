"""Smoke run of benchmarks/load_bench.py with tiny numbers: it runs and writes sane JSON (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_bench.py"


def load_bench_module():
    spec = importlib.util.spec_from_file_location("load_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_stats(stats: dict, n: int | None = None) -> None:
    assert set(stats) >= {"n", "min", "p50", "p90", "p99", "max", "mean"}
    if n is not None:
        assert stats["n"] == n
    assert stats["n"] > 0
    assert 0 <= stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]


def test_load_bench_smoke(tmp_path, model_dir, capsys):
    bench = load_bench_module()
    out = tmp_path / "load_bench.json"
    result = bench.main(
        [
            "--out",
            str(out),
            "--model-dir",
            str(model_dir),
            "--size",
            "256",
            "--steps",
            "6",
            "--painter-jobs",
            "2",
            "--commands",
            "10",
            "--spacing-ms",
            "20",
            "--burst",
            "20",
            "--users",
            "5",
            "--quota",
            "2",
            "--burst-steps",
            "2",
        ]
    )
    assert json.loads(out.read_text()) == result
    assert "CPU" in result["note"] and result["machine"]["device"] == "cpu"
    assert result["targets"] == {"ack_p99_ms": 500.0, "loop_lag_p99_ms": 50.0}
    assert result["config"]["burst"] == 20 and result["config"]["image"] == "256x256"

    steady, burst = result["phases"]["steady"], result["phases"]["burst"]
    for phase, n in ((steady, 10), (burst, 20)):
        assert phase["interactions"] == n
        check_stats(phase["ack_ms"], n)
        check_stats(phase["loop_lag_ms"])
        assert 0.5 < phase["gpu_busy_fraction"] <= 1  # the model really painted during the phase
        assert phase["duration_s"] > 0 and phase["acks_per_s"] > 0
        assert set(phase["meets_targets"]) == {"ack_p99", "loop_lag_p99"}
    assert steady["commands"] == {"quota": 5, "queue": 5}
    # 5 members x 4 commands with a quota of 2: 10 painted, 10 refused for the quota, all answered
    assert burst["accepted"] == 10 and burst["refused"] == 10
    assert burst["refusals"] == {"quota": 10}

    printed = capsys.readouterr().out
    assert "steady" in printed and "burst" in printed and str(out) in printed
