"""The host-memory plan: what is kept where for a given budget and RAM size, the automatic choice
of where T5 lives, and the refusal that names what helps. Sizes are the full-size model's (counted
on the meta device, ../shared/notes/diffsynth.md); the plans are the ones `make_plan` makes for a
card of that budget."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from bot.engine import hostmem
from bot.engine.budget import GIB, HEADROOM_GIB, Plan
from bot.engine.hostmem import FileTensors, HostMemoryShort, ModelSizes, plan_host_memory, settle

FULL = ModelSizes(
    dit=FileTensors(11_901_408_320, 0, frozenset({"F8_E4M3"})),
    clip=FileTensors(123_060_480, 0, frozenset({"BF16"})),
    t5=FileTensors(4_890_000_000, 0, frozenset({"BF16"})),
    vae_encoder=FileTensors(34_163_592, 0, frozenset({"BF16"})),
)
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it


def gpu_plan(budget: float | None, **overrides) -> Plan:
    """What make_plan gives a card of `budget` GiB (None: a 141 GiB card without a limit)."""
    plan = Plan(
        device=CUDA,
        compute_dtype=torch.bfloat16,
        budget_gib=budget,
        dit_resident_gib=None if budget is None else budget - HEADROOM_GIB,
        text_encoders_resident=budget is None or budget >= 30,
        keep_resident=True,
        fp8_matmul=True,
        pinned=True,
    )
    return replace(plan, **overrides)


def gib(n: int) -> float:
    return n / GIB


def test_unlimited_keeps_no_host_copy_of_what_lives_on_the_gpu():
    host = plan_host_memory(gpu_plan(None), FULL, t5_fp8=False, t5_in_ram=True)
    assert [what for what, _ in host.kept] == ["runtime"]
    assert gib(host.needed) <= 6
    assert [what for what, _ in host.mapped] == ["VAE encoder"]  # read from its file when used


@pytest.mark.parametrize(
    ("budget", "t5_in_ram", "at_most"),
    [(8, True, 20), (8, False, 13), (12, True, 20), (12, False, 13), (24, True, 20), (24, False, 13)],
)
def test_a_budget_keeps_the_streamed_part_of_the_dit_and_t5_where_it_is_told(budget, t5_in_ram, at_most):
    host = plan_host_memory(gpu_plan(budget), FULL, t5_fp8=False, t5_in_ram=t5_in_ram)
    kept = dict(host.kept)
    streamed = max(0, FULL.dit.stored_bytes("F8_E4M3") - (budget - HEADROOM_GIB) * GIB)
    assert kept["DiT, streamed part"] == pytest.approx(streamed, abs=1)
    assert kept["CLIP"] == FULL.clip.float_numel * 2
    if t5_in_ram:
        assert kept["T5"] == FULL.t5.float_numel * 2 and host.t5_in_ram
    else:
        assert "T5" not in kept and dict(host.mapped)["T5"] == FULL.t5.float_numel * 2 and not host.t5_in_ram
    assert gib(host.needed) <= at_most


def test_a_larger_budget_needs_less_host_memory():
    needed = [plan_host_memory(gpu_plan(b), FULL, t5_fp8=False, t5_in_ram=True).needed for b in (8, 12, 24)]
    assert needed[0] > needed[1] > needed[2]
    assert plan_host_memory(gpu_plan(None), FULL, t5_fp8=False, t5_in_ram=True).needed < needed[2]


def test_t5_in_float8_is_a_copy_the_file_cannot_back():
    host = plan_host_memory(gpu_plan(8), FULL, t5_fp8=True, t5_in_ram=False)
    assert dict(host.kept)["T5"] == FULL.t5.float_numel  # one byte per weight, in RAM all the same
    assert host.t5_in_ram


def test_keep_resident_off_keeps_everything_in_host_memory_between_jobs():
    host = plan_host_memory(gpu_plan(None, keep_resident=False), FULL, t5_fp8=False, t5_in_ram=True)
    kept = dict(host.kept)
    assert kept["DiT between jobs"] == FULL.dit.float_numel and kept["T5"] == FULL.t5.float_numel * 2


def test_auto_keeps_t5_in_ram_on_a_32_gb_pc_and_reads_it_from_the_file_on_a_16_gb_one():
    plan = gpu_plan(8)
    roomy, host = settle(plan, FULL, "auto", t5_fp8=False, available=int(28 * GIB))
    assert roomy.t5_in_ram and host.t5_in_ram
    # A 16 GB PC with a desktop running: ~13 GiB available.
    small, host = settle(plan, FULL, "auto", t5_fp8=False, available=int(13 * GIB))
    assert not small.t5_in_ram and not host.t5_in_ram
    assert gib(host.needed) <= 13
    # Unknown memory (not Linux): T5 stays in RAM, nothing refused.
    unknown, _ = settle(plan, FULL, "auto", t5_fp8=False, available=None)
    assert unknown.t5_in_ram


def test_on_and_off_are_obeyed_and_off_says_when_it_cannot_help(caplog):
    plan = gpu_plan(8)
    on, _ = settle(plan, FULL, "on", t5_fp8=False, available=int(28 * GIB))
    off, _ = settle(plan, FULL, "off", t5_fp8=False, available=int(28 * GIB))
    assert on.t5_in_ram and not off.t5_in_ram
    with caplog.at_level(logging.WARNING, logger="fluxbot.engine"):
        fp8, _ = settle(plan, FULL, "off", t5_fp8=True, available=int(28 * GIB))
    assert fp8.t5_in_ram
    assert 't5_in_ram = "off" has no effect' in caplog.text


def test_too_little_memory_is_refused_naming_what_helps():
    with pytest.raises(HostMemoryShort) as raised:
        settle(gpu_plan(8), FULL, "on", t5_fp8=False, available=int(12 * GIB))
    text = str(raised.value)
    assert "\n" not in text
    assert "12.0 GiB available" in text and "needs about 17." in text
    assert 't5_in_ram = "off"' in text and "t5_fp8 = true" in text and "vram_limit_gb" in text
    # With T5 already read from its file, what is left to suggest is a larger budget.
    with pytest.raises(HostMemoryShort) as raised:
        settle(gpu_plan(8), FULL, "auto", t5_fp8=False, available=int(6 * GIB))
    text = str(raised.value)
    assert "t5_in_ram" not in text and "vram_limit_gb" in text
    # Unlimited needs only the runtime.
    settle(gpu_plan(None), FULL, "auto", t5_fp8=False, available=int(6 * GIB))


def test_the_cpu_keeps_what_it_must_cast_and_maps_the_rest():
    cpu = Plan(torch.device("cpu"), torch.float32, None, None, True, keep_resident=True, fp8_matmul=False, pinned=False)
    host = plan_host_memory(cpu, FULL, t5_fp8=False, t5_in_ram=True)
    assert dict(host.mapped) == {"DiT": FULL.dit.float_numel}  # the float8 file is the float8 storage
    assert dict(host.kept)["T5"] == FULL.t5.float_numel * 4  # cast to float32: a copy


def test_sizes_come_from_the_file_headers(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(
        {
            "encoder.conv.weight": torch.zeros(4, 3, dtype=torch.bfloat16),
            "encoder.steps": torch.zeros(5, dtype=torch.int64),
            "decoder.conv.weight": torch.zeros(8, 8, dtype=torch.float32),
        },
        str(path),
    )
    enc = hostmem.file_tensors([path], prefix="encoder.")
    assert enc == FileTensors(12, 40, frozenset({"BF16"}))
    assert enc.stored_bytes("BF16") == 24 + 40 and enc.maps_as("BF16") and not enc.maps_as("F8_E4M3")
    both = hostmem.file_tensors([path])
    assert both.float_numel == 76 and both.float_dtypes == {"BF16", "F32"}


def test_available_memory_is_the_lower_of_the_machine_and_the_container(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16305164 kB\nMemAvailable:   12582912 kB\n")
    no_cgroup = tmp_path / "none"
    assert hostmem.available_bytes(meminfo, no_cgroup) == 12 * GIB
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{10 * GIB}\n")
    (v2 / "memory.current").write_text(f"{2 * GIB}\n")
    assert hostmem.available_bytes(meminfo, v2) == 8 * GIB
    (v2 / "memory.max").write_text("max\n")
    assert hostmem.available_bytes(meminfo, v2) == 12 * GIB
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    assert hostmem.available_bytes(meminfo, v1) == 12 * GIB
    assert hostmem.available_bytes(tmp_path / "missing", no_cgroup) is None
