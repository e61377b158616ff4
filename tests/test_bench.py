"""The checkpoint benchmark, tools/bench_checkpoint.py, in its quick form: it runs end to end and reports every
section with sane values. Timings are not asserted (CI machines vary); the full benchmark is for people."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TOOL = REPO / "tools" / "bench_checkpoint.py"
MODES = ("sync", "async", "async_process")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def positive(summary: dict) -> bool:
    return summary["n"] >= 1 and 0 < summary["min"] <= summary["median"] <= summary["max"]


def test_floors_and_saves(quick):
    result = json.loads((quick / "bench.json").read_text())
    cfg = result["config"]
    assert cfg["world_size"] == 2 and cfg["device"] == "cpu"
    assert cfg["rank_bytes"] == pytest.approx(8e6, rel=0.01)
    floors = result["floors"]
    assert positive(floors["staging_copy"]) and floors["staging_copy"]["gbps"] > 0
    assert floors["d2h_pinned"] is None  # CPU only
    assert positive(floors["disk"]["write"]) and positive(floors["disk"]["read"])
    assert positive(result["saves"]["dcp_save"])
    for mode in MODES:
        save = result["saves"][mode]
        for key in ("blocked_s", "staged_s", "commit_s"):
            assert positive(save[key]), (mode, key)
        # measured from the same instant on every rank: blocked <= staged <= committed
        assert save["blocked_s"]["median"] <= save["staged_s"]["median"] <= save["commit_s"]["median"], mode
        assert save["size_bytes"] >= 2 * cfg["rank_bytes"], mode  # every rank's share was written
        assert save["write_gbps"]["median"] > 0, mode
    assert positive(result["resume"]) and positive(result["resume"]["manager_load_s"])
    unverified = result["resume_without_checksums"]  # measured when the manager can skip its checksum pass
    assert unverified is None or positive(unverified)


def test_memory_is_reported_for_every_part(quick):
    memory = json.loads((quick / "bench.json").read_text())["memory"]
    expected = {"floor: staging copy", "floor: disk write+read", "dcp.save", "resume", *(f"manager {m}" for m in MODES)}
    assert expected <= set(memory)
    for name, entry in memory.items():
        assert entry["extra_peak_bytes"] >= entry["children_extra_bytes"] >= 0, name
    # an async save keeps a staged copy of the state: its extra memory is at least most of one checkpoint
    assert memory["manager async"]["ratio_to_rank_size"] > 0.5


def test_trainer_ratios_and_targets(quick):
    result = json.loads((quick / "bench.json").read_text())
    modes = result["trainer"]["modes"]
    assert set(modes) == {"off", "async"}
    for mode in ("off", "async"):
        assert positive(modes[mode]["steps_per_s"]) and positive(modes[mode]["window_steps_per_s"])
    # one run per mode: the paired ratios are the ratios of the two runs
    assert modes["async"]["ratio_to_off"]["median"] == pytest.approx(
        modes["async"]["window_steps_per_s"]["median"] / modes["off"]["window_steps_per_s"]["median"]
    )
    assert modes["async"]["ratio_to_off_whole_run"]["median"] == pytest.approx(
        modes["async"]["steps_per_s"]["median"] / modes["off"]["steps_per_s"]["median"]
    )
    assert modes["async"]["ratio_to_off_in_run"]["median"] == pytest.approx(
        modes["async"]["in_run_ratio"]["median"] / modes["off"]["in_run_ratio"]["median"]
    )
    run = result["trainer"]["runs"][0]
    assert run["windows"] == 1 and run["steps"] == [5, 20] and 0 <= run["other_cpu_share"] <= 1
    assert run["plain_step_s"] > 0 and run["in_run_ratio"] > 0
    assert modes["async"]["checkpoint_size_bytes"] > 1e6
    rows = {(row["target"], row["mode"]): row for row in result["targets"]}
    for target in ("blocking_vs_dcp_save", "blocking_vs_staging_floor", "write_vs_disk_floor",
                   "extra_memory_vs_rank_size"):
        for mode in ("async", "async_process"):
            row = rows[(target, mode)]
            assert row["measured"] is not None and row["measured"] > 0, row
            assert row["met"] in (True, False) and (row["met"] or row["miss"]), row
    assert rows[("trainer_throughput_vs_off", "async")]["measured"] > 0


def test_markdown_report_and_cleanup(quick):
    text = (quick / "bench.md").read_text()
    for heading in ("## Targets", "## Saves and floors", "## Resume", "## Trainer"):
        assert heading in text
    assert "python tools/bench_checkpoint.py --quick" in text
    assert not (quick / "work").exists()  # scratch checkpoints are removed
    assert not any((quick / "trainer").iterdir())


def test_bad_argument_is_reported(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--parts", "everything", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--parts must name micro and/or trainer, got everything")


def test_target_rows_say_by_how_much(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))  # as when the tool runs: it imports tools/bench/ as `bench`
    from bench.targets import target_row

    assert target_row("blocking_vs_dcp_save", "async", 0.01, "")["met"] is True
    assert target_row("blocking_vs_dcp_save", "async", 0.10, "")["miss"] == "2.0x the limit"
    assert target_row("trainer_throughput_vs_off", "async", 0.76, "")["miss"] == "20% short"
    assert target_row("trainer_throughput_vs_off", "async", 0.947, "")["miss"] == "0.3% short"
    assert target_row("write_vs_disk_floor", "async", None, "")["met"] is None
