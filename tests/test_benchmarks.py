"""The GPU benchmark scripts, run on the CPU with the tiny model so CI keeps them working."""

from __future__ import annotations

import importlib.util
import json
import os
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


def _script(name: str):
    """A benchmark script as a module, loaded from its path: benchmarks/ is not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_chart_shows_the_fastest_setup_that_fits():
    """A peer tried in several setups at a budget is shown in its fastest one that fits under the
    cap (not the first tried, not a faster one over the budget); where none fits it says so."""
    report = _script("report")

    def rec(sec, ok, name, capped=True):
        return {
            "system": "diffusers",
            "budget_gb": 8,
            "setup_name": name,
            "sec_per_image": sec,
            "ok": ok,
            "allocator_capped": capped,
            "peak_process_gib": 6.9,
            "error": None if ok else "OutOfMemoryError: x",
        }

    tried = [
        rec(None, False, "group-leaf-stream-rs"),
        rec(9.5, True, "group-leaf-stream"),
        rec(7.1, True, "group-block1-stream"),
        rec(5.0, False, "group-block1-stream-rs", capped=False),
    ]
    assert report.chosen(tried)["setup_name"] == "group-block1-stream"
    (row,) = report.chart_rows(tried)[:1]
    assert row[2] == 7.1 and row[3].endswith("group-block1-stream")
    failed = report.chart_rows([rec(None, False, "a"), rec(None, False, "b")])
    assert failed[0][2] is None and failed[0][3].startswith("X  none of 2 setups fit; OutOfMemoryError")


def test_peer_setups_are_named_as_their_documentation_names_them():
    """engine_bench's --setup: diffusers' documented options by name, DiffSynth's vram_limit; a
    name that is none of them is refused (SystemExit), not run as something else."""
    bench = _script("engine_bench")
    s = bench.diffusers_setup("group-block1-stream-rs+tiledvae", 12)
    assert (s.placement, s.level, s.blocks_per_group, s.stream, s.record_stream, s.tiled_vae) == (
        "group",
        "block_level",
        1,
        True,
        True,
        True,
    )
    leaf = bench.diffusers_setup("group-leaf-stream-lowcpu", 8)
    assert (leaf.level, leaf.stream, leaf.record_stream, leaf.low_cpu_mem) == ("leaf_level", True, False, True)
    assert "record_stream" not in leaf.describe() and "low_cpu_mem_usage" in leaf.describe()
    assert bench.diffusers_setup("auto", None).placement == "resident"
    assert bench.diffusers_setup("auto", None).fp8 is False
    assert bench.diffusers_setup("model-offload", 24).fp8 is True
    for bad in ("group-leaf-rs", "group-block-stream", "cpu-offload", "resident-bf16+vae"):
        with pytest.raises(SystemExit):
            bench.diffusers_setup(bad, 8)
    assert bench.seed_vram_limit(8, "auto") == 7.0 and bench.seed_vram_limit(None, "auto") is None
    assert bench.seed_vram_limit(8, "vram_limit=4.5") == 4.5
    for bad in ("group-leaf", "vram_limit=lots"):
        with pytest.raises(SystemExit):
            bench.seed_vram_limit(8, bad)


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


def test_a_side_by_side_plan_tries_setups_until_one_fits(tmp_path, model_dir):
    """benchmarks/side_by_side.sh runs a plan line by line; "a|b" tries a, then b: a try that does
    not run leaves no record and fails the run, the next one is still tried and recorded."""
    plan = tmp_path / "plan.txt"
    plan.write_text(
        "# a comment\n"
        "seed seed-diffsynth none vram_limit=bogus|auto -- --preset tiny-random --device cpu "
        "--steps 2 --size 128 --images 1 --warmup 0\n"
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/side_by_side.sh"), str(plan)],
        cwd=ROOT,
        env={
            **os.environ,
            "OUT": str(tmp_path / "out"),
            "WEIGHTS": str(model_dir),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # its python3 is ours
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "=== seed_1 FAILED" in proc.stdout
    assert not (tmp_path / "out/raw/seed_1.json").exists()
    rec = json.loads((tmp_path / "out/raw/seed_2.json").read_text())
    assert rec["ok"] is True and rec["setup_name"] == "auto" and rec["images"] == 1


def test_the_home_card_projection_follows_its_model():
    """benchmarks/projection.py: FLUX.1's step FLOPs from its shapes, the lent GPU's efficiency from
    a measured step, each card at that fraction of its peaks, PCIe per step at 8 GB only, and the
    throttled run's check (predicted vs measured step)."""
    proj = _script("projection")
    flops = proj.step_flops(1024, 1024)
    assert flops["tokens"] == 4096 + 512
    # Per token: 57 blocks of 2 x 113.2M multiply-adds (12.9 GFLOP); attention 4 N^2 d per block.
    assert flops["matmul"] == 2 * 4608 * 57 * (3072 * 9216 + 3072 * 3072 + 2 * 3072 * 12288)
    assert flops["attention"] == 57 * 4 * 4608**2 * 3072
    resident = {"size": 1024, "sec_per_step_steady": 0.09, "text_encode_s": 0.2, "vae_s": 0.1}
    streamed = {"dit_streamed_gib_per_step": 3.4, "sec_per_step_steady": 0.13}
    throttled = {"h2d_cap": {"cap_gb_per_s": 13.0}, "sec_per_step_steady": 0.3}
    p = proj.project(resident, streamed, throttled)
    assert 0 < p["efficiency_of_peak"] < 1
    check = p["throttled_check"]
    assert check["predicted_step_s"] == round(3.4 * 2**30 / 13e9, 4)  # PCIe-bound there
    assert check["error_pct"] == round(100 * (0.3 / check["predicted_step_s"] - 1), 1)
    cards = {r["name"]: r for r in p["cards"]}
    ada_8, ada_24 = cards["RTX 4060 8 GB"], cards["RTX 4090 24 GB"]
    assert ada_8["stream_s_per_step"] > 0 and ada_24["stream_s_per_step"] == 0  # only 8 GB streams
    assert ada_8["sec_per_step"] > ada_24["sec_per_step"]
    # Compute scales inversely with the card's peaks at one efficiency.
    assert abs(ada_8["compute_s_per_step"] / ada_24["compute_s_per_step"] - 330.3 / 60.5) < 0.05
    # A card without float8 matmuls computes its matmuls at its bf16 rate.
    no_fp8 = cards["RTX 3060 12 GB"]
    assert no_fp8["fp8_tflops"] is None and no_fp8["compute_s_per_step"] > cards["RTX 4070 12 GB"]["compute_s_per_step"]
    assert "| RTX 4060 8 GB (8 GB) | yes |" in proj.markdown(p)
