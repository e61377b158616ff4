"""The checkpoint benchmark, tools/bench_checkpoint.py, in its quick form: it runs end to end and reports every
section with sane values (the goodput part with real SIGKILLs). Timings are not asserted (CI machines vary); the
full benchmark is for people."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from ftrain.checkpoint.local import default_directory

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


@pytest.mark.soak  # the default --quick run, ~66 s: CI runs the tool end to end with the loop part
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


@pytest.mark.soak  # the default --quick run, ~66 s: CI runs the tool end to end with the loop part
def test_memory_is_reported_for_every_part(quick):
    memory = json.loads((quick / "bench.json").read_text())["memory"]
    expected = {"floor: staging copy", "floor: disk write+read", "dcp.save", "resume", *(f"manager {m}" for m in MODES)}
    assert expected <= set(memory)
    for name, entry in memory.items():
        assert entry["extra_peak_bytes"] >= entry["children_extra_bytes"] >= 0, name
    # an async save keeps a staged copy of the state: its extra memory is at least most of one checkpoint
    assert memory["manager async"]["ratio_to_rank_size"] > 0.5


@pytest.mark.soak  # the default --quick run, ~66 s: CI runs the tool end to end with the loop part
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


@pytest.mark.soak  # the default --quick run, ~66 s: CI runs the tool end to end with the loop part
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
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--parts must name micro, trainer, goodput, s3 and/or loop, got everything")


def test_target_rows_say_by_how_much(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))  # as when the tool runs: it imports tools/bench/ as `bench`
    from bench.targets import target_row

    assert target_row("blocking_vs_dcp_save", "async", 0.01, "")["met"] is True
    assert target_row("blocking_vs_dcp_save", "async", 0.10, "")["miss"] == "2.0x the limit"
    assert target_row("trainer_throughput_vs_off", "async", 0.76, "")["miss"] == "20% short"
    assert target_row("trainer_throughput_vs_off", "async", 0.947, "")["miss"] == "0.3% short"
    assert target_row("write_vs_disk_floor", "async", None, "")["met"] is None


# ------------------------------------------------------------------------------------------ goodput part
@pytest.fixture(scope="module")
def goodput(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-goodput")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--parts", "goodput", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.mark.soak  # ~50 s: the goodput part end to end; run with -m soak (the full run is in docs/bench.md)
def test_goodput_failures_are_recovered_from_the_local_tier(goodput):
    result = json.loads((goodput / "bench.json").read_text())["goodput"]
    assert positive(result["restart_floor_s"])
    # the same launches then take the recipe's first step without ftrain: later than joining
    assert result["first_step_floor_s"]["median"] > result["restart_floor_s"]["median"]
    assert set(result["failures"]) == {"job/warm", "process/warm"}  # the quick form: the defaults only
    for name, entry in result["failures"].items():
        assert entry["kills"] == entry["recovered"] == 1, (name, entry["report"])  # a real SIGKILL, recovered
        # snapshots every step: a kill redoes a step or two, not the steps since the durable checkpoint (<= 9)
        assert entry["steps_redone"]["max"] <= 2, (name, entry["report"])
        assert entry["time_lost_s"]["median"] > 0 and 0 < entry["ettr"] < 1, name
        assert entry["cost_per_failure_s"]["median"] >= entry["time_lost_s"]["median"], name
        assert entry["identical"], (name, entry["differences"])
        assert entry["own_report"]["time_lost_s"] is not None, name  # the run logged recovery/* itself


@pytest.mark.soak  # ~50 s: the goodput part end to end; run with -m soak (the full run is in docs/bench.md)
def test_goodput_throughput_health_and_auto(goodput):
    result = json.loads((goodput / "bench.json").read_text())["goodput"]
    throughput = result["throughput"]
    for tier in ("on", "off"):
        assert positive(throughput["tiers"][tier]["steps_per_s"])
        assert positive(throughput["tiers"][tier]["plain_step_s"])
    assert throughput["ratio_on_off"]["median"] == pytest.approx(
        throughput["tiers"]["on"]["steps_per_s"]["median"] / throughput["tiers"]["off"]["steps_per_s"]["median"])
    assert throughput["identical_on_off"]["weights"] and throughput["identical_on_off"]["losses"]
    assert throughput["step_time_noise"] is None  # one run per tier
    health = result["health"]
    assert health["allreduce_2_s"] > 0 and health["allreduce_3_s"] > 0 and 0 < health["judge_s"] < 1e-3
    assert health["median_step_s"] == throughput["tiers"]["off"]["plain_step_s"]["median"]
    auto = result["auto"]
    assert auto["intervals"][0] == [0, 10]  # auto starts at 10 steps, logged at start
    assert auto["checkpoints"] and 0 <= auto["blocked_share"] < 1 and auto["budget"] == 0.01


@pytest.mark.soak  # ~50 s: the goodput part end to end; run with -m soak (the full run is in docs/bench.md)
def test_goodput_targets_report_and_cleanup(goodput):
    result = json.loads((goodput / "bench.json").read_text())
    rows = {(row["target"], row["mode"]): row for row in result["targets"]}
    for kind in ("whole-job SIGKILL", "one-rank SIGKILL (--max-restarts)"):
        for target in ("goodput_steps_redone", "goodput_time_lost_over_floor", "goodput_ettr"):
            row = rows[(target, f"{kind}, local tier on")]
            assert row["measured"] is not None and row["met"] in (True, False) and (row["met"] or row["miss"]), row
    assert rows[("identical_to_uninterrupted", "all runs")]["met"] is True
    for target in ("local_tier_throughput_vs_off", "auto_overhead_vs_budget"):
        assert sum(row["target"] == target and row["met"] is not None for row in result["targets"]) == 1, target
    health = [row for row in result["targets"] if row["target"] == "health_cost_vs_noise"]
    assert health[0]["met"] is None and "needs 2 runs per tier" in health[0]["note"]
    text = (goodput / "bench.md").read_text()
    headings = ("## Targets", "## Goodput under failures", "### Without failures", "### `checkpoint.interval=auto`")
    for heading in headings:
        assert heading in text
    assert "## Trainer" not in text and "python tools/bench_checkpoint.py --quick --parts goodput" in text
    assert not (goodput / "goodput").exists()  # run directories removed, and their local snapshots
    assert not default_directory(goodput / "goodput" / "chaos-job-on").exists()
    assert (goodput / "logs" / "goodput-chaos-job-on.log").is_file()


def test_auto_overhead_from_tensorboard_wall_times(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Steps of 0.1 s; a checkpoint at step 10 blocks 0.05 s and commits 0.35 s after step 10: steps 11-13 start
    before the commit and take 0.15 s more in all; step 14 starts after it."""
    monkeypatch.syspath_prepend(str(TOOL.parent))
    from torch.utils.tensorboard import SummaryWriter

    from bench.goodput import auto_overhead
    from ftrain import tags

    writer, wall = SummaryWriter(str(tmp_path)), 1000.0
    for step in range(1, 31):
        wall += 0.1 + {11: 0.08, 12: 0.04, 13: 0.03}.get(step, 0.0)
        writer.add_scalar(tags.LOSS, 1.0, step, walltime=wall)
        if step in (10, 30):
            writer.add_scalar(tags.CKPT_BLOCKING_S, 0.05, step, walltime=wall)
            writer.add_scalar(tags.CKPT_SAVE_S, 0.35, step, walltime=wall)  # the call until the commit
    writer.add_scalar(tags.CKPT_INTERVAL, 10.0, 0, walltime=1000.0)
    writer.close()
    measured = auto_overhead(tmp_path)
    assert measured["checkpoints"] == [10]  # the final save, which the run waits for, is left out
    assert measured["blocked_s"] == pytest.approx(0.05)
    assert measured["median_step_s"] == pytest.approx(0.1)
    assert measured["slowdown_s"] == pytest.approx(0.15)  # steps 11-13 ran while it blocked and wrote
    assert measured["overhead_share"] == pytest.approx(0.15 / (29 * 0.1 + 0.15))
    assert measured["intervals"] == [[0, 10.0]]


def test_goodput_target_rows_say_when_missed_or_not_measured(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))
    from bench.targets import goodput_rows

    def failures(redone: list[float], lost: list[float]) -> dict:
        def stats(values: list[float]) -> dict | None:
            return {"median": statistics.median(values), "n": len(values)} if values else None

        return {"kind": "job", "tier": "on", "requested": 4, "kills": len(redone), "missed": 0,
                "recovered": len(redone), "steps_redone": stats(redone), "time_lost_s": stats(lost),
                "ettr": 0.6 if redone else None, "identical": True}

    one = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    goodput = {
        "restart_floor_s": {"median": 2.0},
        "first_step_floor_s": {"median": 2.9},
        "failures": {"job/on": failures([20.0, 25.0, 30.0, 8.0], [3.1, 3.4, 3.2, 3.3]), "rank/on": failures([], [])},
        "throughput": {"ratio_on_off": {"median": 0.95}, "ratio_on_off_median_step": one,
                       "identical_on_off": {"weights": True, "losses": False}},
        "auto": {"overhead_vs_budget": 0.5, "overhead_share": 0.005, "blocked_share": 0.001, "budget": 0.01},
        "health": {"share_of_step": 0.0001, "step_time_noise": 0.02, "per_step_s": 1e-5, "median_step_s": 0.1},
    }
    rows = {(row["target"], row["mode"].split(",")[0]): row for row in goodput_rows(goodput)}
    assert rows[("goodput_steps_redone", "whole-job SIGKILL")]["miss"] == "22.5x the limit"
    lost = rows[("goodput_time_lost_over_floor", "whole-job SIGKILL")]
    assert lost["measured"] == pytest.approx(1.25) and lost["met"] is False and "3.25 s lost" in lost["note"]
    assert "+0.35 s over the first-step floor (2.90 s" in lost["note"]
    assert rows[("goodput_ettr", "whole-job SIGKILL")]["miss"] == "25% short"
    for target in ("goodput_steps_redone", "goodput_time_lost_over_floor", "goodput_ettr"):
        assert rows[(target, "one-rank SIGKILL (--max-restarts)")]["met"] is None  # no kill landed: not "met"
    assert rows[("local_tier_throughput_vs_off", "local tier on / off")]["miss"] == "4% short"
    identical = rows[("identical_to_uninterrupted", "all runs")]
    assert identical["met"] is False and "uninterrupted, on vs off" in identical["note"]
    assert rows[("auto_overhead_vs_budget", "interval=auto")]["met"] is True
    assert rows[("health_cost_vs_noise", "health check")]["met"] is True


def test_local_tier_benchmark_runs_and_reports_every_phase(tmp_path):
    """tools/bench_local_tier.py reads the tier's internals (its plan's size): it must keep up with them."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_local_tier.py"), "--repeats", "3", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for phase in ("snapshot() returns after", "complete_steps() (sums both)", "resume's check", "restore()"):
        assert proc.stdout.count(phase) == 2, (phase, proc.stdout)
    assert list(tmp_path.iterdir()) == [], "the benchmark left snapshot files behind"


@pytest.mark.soak  # ~54 s: the s3 part end to end; CI runs the tool with the loop part, the store in test_s3.py
def test_object_storage_part_in_its_quick_form(tmp_path):
    """The s3 part against a SeaweedFS server of its own: rates against the same server's floor, and the loop
    with saves to local disk and to the store beside the off run."""
    out = tmp_path / "bench-s3"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--quick", "--parts", "s3", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s3 = json.loads((out / "bench.json").read_text())["s3"]
    assert s3["save_to_floor"] > 0 and s3["resume_to_floor"] > 0
    moves = [("floor", "put"), ("floor", "get"), ("ftrain", "save"), ("ftrain", "resume")]
    assert all(s3[side][kind]["cpu_s_per_gb"] > 0 for side, kind in moves)  # the client's CPU per GB moved
    assert s3["ftrain"]["save"]["requests_per_save"] >= 4  # data, .metadata, CHECKSUMS.json, COMPLETE at least
    small = s3["small_saves"]  # a recipe-sized save's CPU time in one process, to disk and to the store
    assert small["disk_cpu_ms"] > 0 and small["store_cpu_ms"] > 0 and small["requests_per_save"] >= 4
    assert set(s3["loop"]["modes"]) == {"off", "async", "async-s3"}
    assert all(run["server_cpu_s"] >= 0 for run in s3["loop"]["runs"])  # the niced server's CPU, per run
    assert all(run["job_cpu_s"] > 0 for run in s3["loop"]["runs"]) and s3["loop"]["cpu_points"] is not None
    text = (out / "bench.md").read_text()
    assert "## Object storage (S3)" in text and "server CPU per run" in text and "nice 19" in text
    assert not (out / "s3server").exists()  # the server and its data are gone


# ------------------------------------------------------------------------------------------------ loop part
LOOP_CONFIGS = ("none", "tier-off", "defaults")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-loop")
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--parts", "loop", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def test_loop_part_reports_every_configuration(loop):
    """The own-loop part in its quick form (4 MB, 7 steps, a save every 3, 1 round): every configuration has its
    loop time, and the checkpointing ones their save cost and resume time; the target row is there."""
    result = json.loads((loop / "bench.json").read_text())
    part = result["loop"]
    assert list(part["configs"]) == list(LOOP_CONFIGS) and part["config"]["before"] is None
    assert [r["label"] for r in part["runs"]] == list(LOOP_CONFIGS)
    for label in ("tier-off", "defaults"):
        entry = part["configs"][label]
        assert entry["ratio_to_none"]["n"] == 1 and entry["ratio_to_none"]["median"] > 0, label
        for key in ("blocking_s", "save_call_s", "final_save_s", "resume_s"):
            assert entry[key] is not None and positive(entry[key]), (label, key)
    assert part["configs"]["tier-off"]["snapshots_all"]["median"] == 0
    assert part["configs"]["defaults"]["snapshots_all"]["median"] > 0  # the tier is on by default
    # what the tier's share of the loop time is made of: snapshots without a save, and the saves (2 + the last)
    assert part["configs"]["defaults"]["saves_measured"]["median"] == 3
    assert part["configs"]["defaults"]["snapshots_plain"] is not None
    rows = [row for row in result["targets"] if row["target"] == "loop_defaults_minus_tier_off"]
    # loop time and CPU time, each defaults minus tier-off
    assert [row["mode"] for row in rows] == ["defaults", "defaults"] and len({row["what"] for row in rows}) == 2
    assert all(row["met"] in (True, False) for row in rows)
    assert part["configs"]["defaults"]["cpu_ratio_to_none"]["median"] > 0
    text = (loop / "bench.md").read_text()
    assert "## Own loop (`ftrain.Checkpointer`)" in text and "defaults minus local_interval=0" in text
    for label in LOOP_CONFIGS:
        assert f"| {label} |" in text, label
    assert "python tools/bench_checkpoint.py --quick --parts loop" in text
    assert not any((loop / "loop").iterdir())  # run directories removed, and their local snapshots
    assert not (loop / "trees").exists()  # the copy of the sources the jobs ran on
    assert not default_directory(loop / "loop" / "defaults-0").exists()


def test_loop_report_with_a_before_tree(loop, monkeypatch: pytest.MonkeyPatch):
    """With --loop-before, the same configurations of the older tree sit beside the current ones: the report gets
    their rows, the before/after table and the after/before target rows (here from the quick run's numbers)."""
    monkeypatch.syspath_prepend(str(TOOL.parent))
    from bench.own_loop import compare, loop_labels
    from bench.report import report_markdown
    from bench.targets import evaluate_targets

    result = json.loads((loop / "bench.json").read_text())
    part = result["loop"]
    part["config"]["before"] = {"rev": "HEAD~1", "commit": "0123456789ab", "subject": "s", "path": "/x"}
    for label in ("tier-off", "defaults"):
        part["configs"][f"before {label}"] = part["configs"][label]
    part["configs"] = {label: part["configs"][label] for label in loop_labels(part["config"]["before"])}
    part["comparisons"] = compare(part["configs"], True)
    rows = {(row["target"], row["mode"]): row for row in evaluate_targets(result)}
    assert rows[("loop_defaults_minus_tier_off", "before (0123456789ab)")]["measured"] is not None
    for target in ("loop_save_cost_after_vs_before", "loop_resume_after_vs_before"):
        for config in ("tier-off", "defaults"):
            assert rows[(target, config)]["measured"] == pytest.approx(1.0), (target, config)
    text = report_markdown(result)
    assert "| before tier-off |" in text and "| before defaults |" in text
    assert "| resume: load() | defaults |" in text and "after / before" in text


def test_loop_before_tree_is_extracted_and_checked(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))
    from bench.common import BenchError
    from bench.own_loop import prepare_before

    before = prepare_before("HEAD", tmp_path)
    assert (Path(before["path"]) / "ftrain" / "checkpointer.py").is_file() and len(before["commit"]) == 12
    with pytest.raises(BenchError, match="rev-parse"):
        prepare_before("no-such-revision", tmp_path)
