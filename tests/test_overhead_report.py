"""ftrain-report (ftrain.report, tools/overhead_report.py) and ftrain.events: the report agrees with the scalars."""

import json
import statistics
import subprocess
import sys
import time

import pytest

from conftest import REPO, scalars
from ftrain import report as report_tool
from ftrain.events import NotARunError, events_dir, read_run_scalars, read_scalars
from ftrain.metrics import Metrics

TOOL = REPO / "tools" / "overhead_report.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_json_agrees_with_the_scalars(reference_run, tmp_path):
    plot = tmp_path / "overhead.png"
    proc = run_tool(str(reference_run), "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    tb = reference_run / "tb"
    blocking = list(scalars(tb, "checkpoint/blocking_s").values())
    save = list(scalars(tb, "checkpoint/save_s").values())
    sizes = list(scalars(tb, "checkpoint/size_bytes").values())
    step_times = list(scalars(tb, "train/step_time_s").values())

    assert report["checkpoints"] == {"count": 4, "committed": 4, "failed": 0, "steps": [5, 10, 15, 20]}
    assert report["steps"]["count"] == 20
    assert report["blocking_s"]["median"] == statistics.median(blocking)
    assert report["blocking_s"]["max"] == max(blocking)
    assert min(blocking) <= report["blocking_s"]["p95"] <= max(blocking)
    assert report["save_s"]["median"] == statistics.median(save)
    assert report["size_bytes"]["median"] == statistics.median(sizes)
    assert report["write_GBps"]["median"] == statistics.median(scalars(tb, "checkpoint/write_GBps").values())
    share = sum(blocking) / (sum(step_times) + sum(blocking))
    assert report["lost_share"] == pytest.approx(share, rel=1e-9)
    assert 0 < report["lost_share"] < 1
    assert report["resumes"]["count"] == 0
    assert report["goodput"]["failures"] == 0 and report["goodput"]["ettr"] == 1.0  # nothing failed
    assert 0 < report["goodput"]["training_wall_s"] < 600
    assert report["plot"] == str(plot)
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert not (reference_run / "overhead.png").exists()  # --plot was honoured


def test_text_report_and_default_plot_path(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tb").mkdir(parents=True)
    for events in (reference_run / "tb").iterdir():  # a copy: the default plot goes into the run directory
        (run_dir / "tb" / events.name).write_bytes(events.read_bytes())
    proc = run_tool(str(run_dir))
    assert proc.returncode == 0, proc.stderr
    blocking = scalars(run_dir / "tb", "checkpoint/blocking_s").values()
    assert "4 (4 committed, 0 failed) at steps 5, 10, 15, 20" in proc.stdout
    assert f"median {report_tool._time(statistics.median(blocking))}" in proc.stdout
    assert "loop time lost" in proc.stdout
    assert (run_dir / "overhead.png").read_bytes().startswith(PNG_SIGNATURE)
    # its tb/ directory names the same run
    again = run_tool(str(run_dir / "tb"), "--no-plot")
    assert again.returncode == 0
    assert again.stdout.splitlines() == proc.stdout.splitlines()[:-1]  # all but the plot line


@pytest.mark.parametrize("case", ["missing", "file", "empty_dir", "foreign_events"])
def test_bad_path_is_exit_2_with_one_line(case, tmp_path):
    path = tmp_path / "x"
    if case == "file":
        path.write_text("not a run")
    elif case == "empty_dir":
        path.mkdir()
    elif case == "foreign_events":
        metrics = Metrics(path / "tb", enabled=True, start_step=0)
        metrics.log({"something/else": 1.0}, 1)
        metrics.close()
    proc = run_tool(str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftrain-report: error: ") and str(path) in lines[0]


def test_help_explains_itself():
    proc = run_tool("--help")
    assert proc.returncode == 0
    for words in ("RUN_DIR", "--json", "--plot", "--no-plot", "loop time lost =", "exit codes"):
        assert words in proc.stdout


def test_usage_error_is_exit_2():
    assert run_tool().returncode == 2
    assert run_tool("somewhere", "--plot", "a.png", "--no-plot").returncode == 2


# ----------------------------------------------------------------------------------- ftrain.events
def test_read_scalars_honours_a_resume_purge(tmp_path):
    """A first attempt logs steps 1-10; it resumes from step 5 and redoes 6-8: 9 and 10 are gone."""
    first = Metrics(tmp_path, enabled=True, start_step=0)
    for step in range(1, 11):
        first.log({"train/step_time_s": float(step)}, step)
    first.close()
    # Event files are read in name order, and the name starts with the second of creation; a real restart is
    # seconds later, but two writers in one second of one process would be ordered by a counter's digits.
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    second = Metrics(tmp_path, enabled=True, start_step=5)
    for step in range(6, 9):
        second.log({"train/step_time_s": 100.0 + step}, step)
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    expected = {**{step: float(step) for step in range(1, 6)}, **{step: 100.0 + step for step in range(6, 9)}}
    assert read_scalars(tmp_path) == {"train/step_time_s": expected}
    assert read_run_scalars(tmp_path, ["train/step_time_s", "absent"]) == {"train/step_time_s": expected}


def test_events_dir_finds_tb_or_takes_the_directory(reference_run, tmp_path):
    assert events_dir(reference_run) == reference_run / "tb"
    assert events_dir(reference_run / "tb") == reference_run / "tb"
    with pytest.raises(NotARunError):
        events_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        events_dir(tmp_path / "missing")


# ------------------------------------------------------------------------------------- the numbers
def test_percentile_matches_numpy():
    numpy = pytest.importorskip("numpy")
    for values in ([3.0], [1.0, 2.0], [0.5, 0.1, 0.9, 0.3], [float(v) for v in range(17)]):
        for q in (0, 50, 95, 100):
            assert report_tool.percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def synthetic_run() -> dict[str, dict[int, float]]:
    """Ten steps of 0.1 s; checkpoints at 5 (ok, a 0.25 s save) and 10 (failed); a resume at step 3."""
    return {
        "train/step_time_s": {step: 0.1 for step in range(1, 11)},
        "checkpoint/blocking_s": {5: 0.02, 10: 0.04},
        "checkpoint/staging_s": {5: 0.01, 10: 0.01},
        "checkpoint/save_s": {5: 0.25},
        "checkpoint/write_s": {5: 0.2},
        "checkpoint/size_bytes": {5: 4e8},
        "checkpoint/write_GBps": {5: 2.0},
        "checkpoint/load_s": {3: 0.5},
    }


def test_summary_counts_failed_saves_and_resumes():
    report = report_tool.summarize(synthetic_run(), "run")
    assert report["checkpoints"] == {"count": 2, "committed": 1, "failed": 1, "steps": [5, 10]}
    assert report["blocking_s"]["total"] == pytest.approx(0.06)
    assert report["save_s"]["median"] == 0.25  # failed saves have no save time
    assert report["write_GBps_overall"] == pytest.approx(2.0)
    assert report["resumes"]["count"] == 1 and report["resumes"]["steps"] == [3]
    assert report["lost_share"] == pytest.approx(0.06 / 1.06)
    assert [c["ok"] for c in report["per_checkpoint"]] == [True, False]
    assert "2 (1 committed, 1 failed)" in report_tool.format_text(report)


def test_goodput_counts_each_recovery_and_its_cost():
    """Twenty 0.1 s steps over 10 s of wall time; two failures: 3 s lost with 2 steps redone, 1 s with none."""
    run = {
        **synthetic_run(),
        "train/step_time_s": {step: 0.1 for step in range(1, 21)},
        "recovery/time_lost_s": {8: 3.0, 15: 1.0},
        "recovery/steps_redone": {8: 2.0, 15: 0.0},
        "recovery/startup_s": {8: 2.5, 15: 0.8},
        "recovery/load_s": {8: 0.2, 15: 0.1},
    }
    walls = {step: 1000.0 + step * 0.5 for step in range(1, 21)}  # the first step ended at 1000.5
    good = report_tool.summarize(run, "run", walls)["goodput"]
    assert good["failures"] == 2 and good["at_steps"] == [8, 15]
    assert good["steps_redone"]["total"] == 2.0 and good["time_lost_s"]["max"] == 3.0
    assert good["cost_per_failure_s"]["total"] == pytest.approx(3.0 + 2 * 0.1 + 1.0)
    assert good["training_wall_s"] == pytest.approx(9.5 + 0.1)  # last - first, plus the first step itself
    assert good["ettr"] == pytest.approx(1 - 4.2 / 9.6)
    text = report_tool.format_text(report_tool.summarize(run, "run", walls))
    assert "2 recovered from (first steps after them: 8, 15)" in text and "ETTR" in text and "0.56" in text
    assert report_tool.summarize(run, "run")["goodput"]["ettr"] is None  # no wall times: no ETTR, costs still
    assert "none recovered from so far" in report_tool.format_text(report_tool.summarize(synthetic_run(), "run"))


def test_background_save_laid_over_the_next_steps():
    assert report_tool.background_spans(synthetic_run()) == [(5, pytest.approx(7.5))]


def test_plot_of_a_run_with_a_failure_a_resume_and_one_without_checkpoints(tmp_path):
    pytest.importorskip("matplotlib")
    run = synthetic_run()
    no_checkpoints = {"train/step_time_s": {1: 0.3, 2: 0.2}}
    for name, data in (("mixed.png", run), ("none.png", no_checkpoints)):
        report_tool.render_plot(data, report_tool.summarize(data, "run"), tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


def test_without_matplotlib_the_text_is_printed_and_the_plot_explained(reference_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report_tool, "matplotlib_missing", lambda: True)
    plot = tmp_path / "p.png"
    assert report_tool.main([str(reference_run), "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    assert "4 (4 committed, 0 failed)" in out and "plot" not in out
    assert len(err.strip().splitlines()) == 1 and "pip install 'ftrain[report]'" in err
    assert not plot.exists()
    assert report_tool.main([str(reference_run), "--no-plot"]) == 0
    assert capsys.readouterr().err == ""


def test_tags_come_from_ftrain_tags():
    """The report spells no tag of its own: a renamed tag in ftrain.tags cannot leave it reading nothing."""
    source = (REPO / "ftrain" / "report.py").read_text()
    assert '"train/' not in source and '"checkpoint/' not in source


def test_the_launcher_in_tools_is_the_installed_command():
    assert run_tool("--help").stdout.startswith("usage: ftrain-report")
