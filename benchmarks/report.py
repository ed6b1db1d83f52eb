"""Collect benchmark records into docs/benchmarks.json and draw docs/benchmarks.png.

    python benchmarks/report.py docs/raw/gpu3_*.json docs/raw/gpu4_*.json

Each input is one record written by engine_bench.py. The markdown in docs/benchmarks.md is
written by hand around these numbers (what was measured, on which card, with which command).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [
    "system",
    "setup_name",
    "setup",
    "budget_gb",
    "allocator_capped",
    "card",
    "driver",
    "ok",
    "sec_per_image",
    "sec_per_step",
    "sec_per_step_steady",
    "text_encode_s",
    "vae_s",
    "peak_vram_gib",
    "peak_reserved_gib",
    "peak_process_gib",
    "peak_host_gib",
    "peak_host_anon_gib",
    "load_s",
    "first_image_s",
    "dit_streamed_gib_per_step",
    "h2d_cap",
    "date",
    "torch",
    "diffsynth",
    "images",
    "warmup_s",
    "error",
]
COLORS = {"ours": (124, 92, 255), "seed-diffsynth": (230, 140, 60), "diffusers": (70, 160, 120)}


def load(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        rec = json.loads(p.read_text())
        out.append({k: rec.get(k) for k in FIELDS if k in rec or k in ("error",)})
    order = {"ours": 0, "seed-diffsynth": 1, "diffusers": 2}
    # An uncapped run of a setup (its time where it does not fit) comes after the capped one.
    return sorted(
        out,
        key=lambda r: (
            r["budget_gb"] is None,
            r["budget_gb"] or 0,
            order.get(r["system"], 9),
            r.get("allocator_capped") is False,
        ),
    )


def chosen(mine: list[dict]) -> dict | None:
    """Of one system's records at one budget (each a setup it was tried in), the one shown: the
    fastest that fits under the cap; where none fits, the first tried under the cap."""
    capped = [r for r in mine if r.get("allocator_capped") is not False]
    fits = [r for r in capped if r["ok"] and r.get("sec_per_image") is not None]
    if fits:
        return min(fits, key=lambda r: r["sec_per_image"])
    return capped[0] if capped else (mine[0] if mine else None)


def _named(rec: dict) -> str:
    name = rec.get("setup_name")
    return f"  {name}" if name and name != "auto" else ""


def chart_rows(records: list[dict]) -> list[tuple]:
    """What the chart shows, row by row: (budget, system, seconds or None, label, over_budget).
    A system tried in several setups shows the fastest that fits (`chosen`). A setup that failed
    under the cap but was also timed uncapped (`--no-cap`) gets a second row with that time, marked
    as over the budget."""
    budgets = sorted({r["budget_gb"] for r in records}, key=lambda b: (b is None, b or 0))
    systems = [s for s in COLORS if any(r["system"] == s for r in records)]
    rows = []
    for b in budgets:
        for s in systems:
            mine = [r for r in records if r["system"] == s and r["budget_gb"] == b]
            rec = chosen(mine)
            tried = sum(1 for r in mine if r.get("allocator_capped") is not False)
            if rec is None:
                rows.append((b, s, None, "not measured", False))
            elif not rec["ok"] or rec["sec_per_image"] is None:
                none_fit = f"none of {tried} setups fit; " if tried > 1 else ""
                rows.append((b, s, None, "X  " + none_fit + (rec.get("error") or "failed")[:90], False))
                uncapped = next((r for r in mine if r.get("allocator_capped") is False and r["sec_per_image"]), None)
                if uncapped is not None:
                    over = not uncapped["ok"]
                    rows.append(
                        (
                            b,
                            s,
                            uncapped["sec_per_image"],
                            f"{uncapped['sec_per_image']:.2f} s uncapped"
                            + (", over the budget" if over else "")
                            + f" ({uncapped['peak_process_gib']} GiB)",
                            over,
                        )
                    )
            else:
                rows.append(
                    (
                        b,
                        s,
                        rec["sec_per_image"],
                        f"{rec['sec_per_image']:.2f} s  ({rec['peak_process_gib']} GiB){_named(rec)}",
                        False,
                    )
                )
    return rows


def chart(records: list[dict], path: Path) -> None:
    rows = chart_rows(records)
    budgets = list(dict.fromkeys(b for b, *_ in rows))
    worst = max((sec for _, _, sec, _, _ in rows if sec), default=1)
    left, width, bar_h = 170, 900, 20
    img = Image.new("RGB", (width, 60 + 26 * len(rows) + 24 * len(budgets) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (10, 10),
        "Seconds per 1024x1024 image, 20 steps (lower is better); X = budget not met; "
        "outlined = run without the cap, over the budget",
        fill="black",
    )
    y = 40
    for b in budgets:
        d.text((10, y + 4), "unlimited" if b is None else f"{b} GB card", fill="black")
        for _, s, sec, label, over in (row for row in rows if row[0] == b):
            d.text((90, y + 4), s, fill=COLORS[s])
            if sec is None:
                d.text((left, y + 4), label, fill=(200, 0, 0) if label.startswith("X") else (150, 150, 150))
            else:
                w = max(int((width - left - 260) * sec / worst), 2)
                box = [left, y + 2, left + w, y + 2 + bar_h - 4]
                # Over the budget: an outline only, so it does not read as a result that fits.
                d.rectangle(box, outline=COLORS[s], fill=None if over else COLORS[s])
                d.text((left + w + 6, y + 4), label, fill="black")
            y += 26
        y += 24
    img.save(path)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    a = ap.parse_args(argv)
    records = load(a.records)
    for b in {r["budget_gb"] for r in records}:
        for s in {r["system"] for r in records}:
            best = chosen([r for r in records if r["system"] == s and r["budget_gb"] == b])
            for r in records:
                if r["system"] == s and r["budget_gb"] == b:
                    r["shown"] = r is best  # the record the chart and the README quote
    (a.out_dir / "benchmarks.json").write_text(json.dumps(records, indent=1) + "\n")
    chart(records, a.out_dir / "benchmarks.png")
    for r in records:
        print(
            f"{'*' if r.get('shown') else ' '}{r['system']:<15} {str(r['budget_gb']):>5} {r.get('setup_name') or '':<24} ok={r['ok']!s:<5} "
            f"{r.get('sec_per_image')} s/img  {r.get('sec_per_step')} s/step  "
            f"process {r.get('peak_process_gib')} GiB  host {r.get('peak_host_gib')} GiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
