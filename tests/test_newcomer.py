"""What a new user of ftrain.Checkpointer and the recipe ran into (issue #25), with real processes."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from ftrain.run_status import read_status

from conftest import REPO, Job, check_ok, run_train, start_train, train_cmd, wait_for

LOOP = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn
    from torchdata.stateful_dataloader import StatefulDataLoader
    import ftrain

    run = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(8) for _ in range(64)]
    loader = StatefulDataLoader(data, batch_size=4) if sys.argv[2] == "stateful" else torch.utils.data.DataLoader(data, batch_size=4)
    with ftrain.Checkpointer(run, model=model, optimizer=optimizer, dataloader=loader, interval=3) as ckpt:
        step = ckpt.load()
        for batch in loader:
            if step >= 6:
                break
            step += 1
            loss = model(batch).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ckpt.maybe_save(step, last=step == 6, loss=loss.item())
    """
)


def _loop(tmp_path: Path, kind: str) -> subprocess.CompletedProcess:
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    return subprocess.run([sys.executable, str(script), str(tmp_path / "run"), kind], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_a_plain_dataloader_is_refused_in_one_line_and_nothing_is_taken(tmp_path):
    proc = _loop(tmp_path, "plain")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ValueError: dataloader=DataLoader cannot save its position" in last and "StatefulDataLoader" in last
    assert not (tmp_path / "run" / "LOCK").exists()


def test_a_loop_of_ones_own_shows_ftrains_lines_and_ftrain_report_reads_its_run(tmp_path):
    proc = _loop(tmp_path, "stateful")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ftrain] checkpoint step 3 committed" in proc.stderr and "[ftrain] starting fresh" in proc.stderr
    again = _loop(tmp_path, "stateful")  # finished: resumes step 6 and has nothing to do
    assert "[ftrain] resumed from" in again.stderr, again.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "ftrain.report", str(tmp_path / "run"), "--no-plot"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert report.returncode == 0, report.stderr
    assert "training steps       6 logged (steps 1-6)" in report.stdout, report.stdout


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file() and "tb" not in p.relative_to(path).parts and p.name not in ("STATUS", ".LOCK.takeover")}


def test_a_refused_start_touches_nothing_and_exits_2(tmp_path):
    options = ("train.max_steps=10", "checkpoint.interval=5")
    check_ok(run_train(tmp_path, *options, nproc=0))
    before = _digest(tmp_path)
    for refused in ("model.d_model=64", "checkpoint.resume=999"):
        proc = run_train(tmp_path, *options, refused, nproc=0)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "ftrain: config error:" in proc.stderr and "Traceback" not in proc.stderr
        assert _digest(tmp_path) == before, refused


# A shell starts a background job (`cmd &`) with SIGINT ignored, and an ignored signal stays ignored across exec (so
# Python installs no KeyboardInterrupt handler): the job starts with SIGINT at its default, as a terminal's foreground
# job has it, however the test suite itself was started.
_WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _sigint_disposition(pid: int) -> str:
    """Whether SIGINT is blocked, ignored or caught in process ``pid`` (Linux: /proc), for a failure message: a
    blocked or ignored SIGINT is inherited from whoever started the process."""
    bit = 1 << (signal.SIGINT - 1)
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    return ", ".join(f"{name} {bool(int(fields[name], 16) & bit)}" for name in ("SigBlk", "SigIgn", "SigCgt") if name in fields)


def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    options = ("train.max_steps=400", "checkpoint.interval=5")
    proc = Job([sys.executable, "-c", _WITH_DEFAULT_SIGINT, *train_cmd(tmp_path, *options, nproc=0)], cwd=REPO)
    wait_for(lambda: (read_status(tmp_path) or 0) and read_status(tmp_path).step >= 12, what="step 12", proc=proc)
    sigint = _sigint_disposition(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"SIGINT in the job: {sigint}\n{err[:3000]}\n...\n{err[-1500:]}"
    assert "ftrain: interrupted (SIGINT)" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "LOCK").exists()
    resumed = run_train(tmp_path, "train.max_steps=20", "checkpoint.interval=5", nproc=0)
    check_ok(resumed)
    assert "resumed from" in resumed.stderr
