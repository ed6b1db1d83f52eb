"""The GPU benchmark scripts, run on the CPU with the tiny model so CI keeps them working."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("system", ["ours", "seed-diffsynth"])
def test_engine_bench_runs_on_the_tiny_model(tmp_path, model_dir, system):
    out = tmp_path / f"{system}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/engine_bench.py"),
            "--system",
            system,
            "--preset",
            "tiny-random",
            "--device",
            "cpu",
            "--weights",
            str(model_dir),
            "--images",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--size",
            "128",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["ok"] is True and rec["system"] == system and rec["images"] == 2
    assert rec["sec_per_image"] > 0 and rec["sec_per_step"] > 0 and rec["peak_host_gib"] > 0
    assert rec["text_encode_s"] > 0 and rec["vae_s"] > 0  # every phase was timed
    assert len(rec["warmup_s"]) == 1 and rec["warmup_s"][0] > 0  # the first image's wait is kept too
    # Host memory the kernel cannot reclaim is part of the resident set, never more than its peak.
    assert 0 < rec["peak_host_anon_gib"] <= rec["peak_host_gib"] + 0.01
    # From the process's start: the load and the first image both come before it.
    assert rec["first_image_s"] >= rec["load_s"] + rec["warmup_s"][0] - 0.05

    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/report.py"), str(out), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    records = json.loads((tmp_path / "benchmarks.json").read_text())
    assert records[0]["system"] == system and records[0]["ok"] is True
    assert records[0]["sec_per_image"] == rec["sec_per_image"]  # the report carries the measured time
    assert (tmp_path / "benchmarks.png").stat().st_size > 1000


def test_the_chart_shows_an_uncapped_time_beside_the_failure():
    """A setup that fails under a budget's cap shows the failure, then its uncapped time marked as
    over the budget; a setup that fits shows its time; a missing one says so."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks/report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)  # loaded from its path: benchmarks/ is not a package

    def rec(system, budget, sec, ok, capped=True, error=None, peak=None):
        return {
            "system": system,
            "budget_gb": budget,
            "sec_per_image": sec,
            "ok": ok,
            "allocator_capped": capped,
            "peak_process_gib": peak or (7.0 if capped else 38.0),
            "error": error,
        }

    rows = report.chart_rows(
        [
            rec("ours", 8, 3.1, True),
            rec("diffusers", 8, None, False, error="OutOfMemoryError: x"),
            rec("diffusers", 8, 7.98, False, capped=False),
            rec("ours", None, 1.9, True),
        ]
    )
    assert [(b, s, sec, over) for b, s, sec, _, over in rows] == [
        (8, "ours", 3.1, False),
        (8, "diffusers", None, False),
        (8, "diffusers", 7.98, True),
        (None, "ours", 1.9, False),
        (None, "diffusers", None, False),
    ]
    assert rows[1][3].startswith("X  OutOfMemoryError") and "uncapped, over the budget" in rows[2][3]
    assert rows[4][3] == "not measured"
    # An uncapped run whose peak fitted after all (engine_bench then records ok) is not marked over the budget.
    fitted = report.chart_rows(
        [rec("diffusers", 8, None, False, error="x"), rec("diffusers", 8, 5.0, True, capped=False, peak=6.9)]
    )
    assert fitted[1][2:] == (5.0, "5.00 s uncapped (6.9 GiB)", False)


def test_size_switch_runs_on_the_tiny_model(tmp_path, model_dir):
    """benchmarks/size_switch.py on the CPU: square jobs, portrait jobs at the bot's own preset,
    square again; no GPU, so no step times."""
    out = tmp_path / "size_switch.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/size_switch.py"),
            "--preset",
            "tiny-random",
            "--device",
            "cpu",
            "--weights",
            str(model_dir),
            "--images",
            "1",
            "--steps",
            "1",
            "--size",
            "128",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["square"] == [128, 128] and rec["portrait"] == [96, 160]  # size_presets(128, 128)
    for name in ("square_before", "portrait", "square_after"):
        assert rec[f"{name}_sec_per_image"] > 0 and rec[f"{name}_step_s"] is None
