"""checkpoint.interval=auto: the interval follows the measured cost of a checkpoint and the budget."""

from __future__ import annotations

import torch
import torch.nn as nn

import ftrain
from ftrain import tags
from ftrain.interval import FIRST_AUTO_INTERVAL, SaveSchedule

from conftest import check_ok, run_train, scalars


def test_fixed_interval_saves_every_n_steps():
    schedule = SaveSchedule("5")
    assert [step for step in range(1, 21) if schedule.due(step)] == [5, 10, 15, 20]


def test_auto_interval_is_the_fewest_steps_within_the_budget():
    schedule = SaveSchedule("auto", overhead_budget=0.01, max_interval_s=1e9)
    assert schedule.interval == FIRST_AUTO_INTERVAL and schedule.due(FIRST_AUTO_INTERVAL)
    for _ in range(145):  # with the 5 below, 150 steps have earned the 0.15 s this save costs: no debt
        schedule.observe_step(0.1, save_in_flight=False)
    for _ in range(5):  # the background write slowed five steps by 0.02 s each
        schedule.observe_step(0.12, save_in_flight=True)
    # cost = 0.05 s blocked + 5 x 0.02 s slowdown = 0.15 s; 1% of 0.1 s steps = 0.001 s per step -> 150 steps
    assert schedule.propose(blocking_s=0.05) == 150
    assert schedule.set(150) and schedule.interval == 150 and abs(schedule.cost_s - 0.15) < 1e-9
    schedule.saved(40)
    assert not schedule.due(189) and schedule.due(190)


def test_auto_interval_follows_the_mean_cost_of_recent_checkpoints():
    """One dear save must not swing the interval alone: the interval follows the mean of the recent costs."""
    schedule = SaveSchedule("auto", overhead_budget=0.01, max_interval_s=1e9)
    for _ in range(1000):  # 1 s of budget earned, more than the saves below cost: no debt (see the next test)
        schedule.observe_step(0.1, save_in_flight=False)
    assert schedule.propose(blocking_s=0.1) == 100
    assert schedule.propose(blocking_s=0.3) == 200  # mean of 0.1 and 0.3 s
    for _ in range(5):
        schedule.propose(blocking_s=0.1)
    assert abs(schedule.cost_s - 0.1) < 1e-9  # the dear one has left the window


def test_auto_interval_pays_back_what_was_spent_beyond_the_budget():
    """The first checkpoint comes after FIRST_AUTO_INTERVAL steps, before any cost is known: what it spent beyond
    the budget lengthens the next interval, so the run as a whole stays within it."""
    schedule = SaveSchedule("auto", overhead_budget=0.01, max_interval_s=1e9)
    for _ in range(FIRST_AUTO_INTERVAL):
        schedule.observe_step(0.1, save_in_flight=False)
    # 10 steps earned 0.01 s of budget; the save cost 0.05 s: 0.04 s of debt on top of the 0.05 s cost
    assert schedule.propose(blocking_s=0.05) == 90
    for _ in range(90):
        schedule.observe_step(0.1, save_in_flight=False)
    assert schedule.propose(blocking_s=0.05) == 50  # 100 steps earned 0.1 s = what two saves cost: no debt


def test_auto_interval_is_capped_by_max_interval_s():
    schedule = SaveSchedule("auto", overhead_budget=0.01, max_interval_s=3.0)
    for _ in range(10):
        schedule.observe_step(0.1, save_in_flight=False)
    assert schedule.propose(blocking_s=1.0) == 30  # 1000 steps would be wanted; 3 s of 0.1 s steps is the cap


def test_recipe_with_auto_interval_logs_its_choice(tmp_path):
    proc = run_train(tmp_path, "checkpoint.interval=auto", "train.max_steps=60", nproc=0)
    check_ok(proc)
    assert "checkpoint.interval=auto starts at 10 steps" in proc.stderr
    logged = scalars(tmp_path / "tb", tags.CKPT_INTERVAL)
    assert logged[0] == FIRST_AUTO_INTERVAL and len(logged) >= 2 and all(v >= 1 for v in logged.values())
    # the local tier (on by default, local_interval=auto) logs its interval and snapshot cost at each review
    local = scalars(tmp_path / "tb", tags.LOCAL_INTERVAL)
    cost = scalars(tmp_path / "tb", tags.LOCAL_SNAPSHOT_S)
    assert list(local) == [50] and 1 <= local[50] <= 100
    assert list(cost) == [50] and 0 < cost[50] < 0.5


def test_checkpointer_accepts_an_integer_or_auto_interval(tmp_path):
    model = nn.Linear(2, 2)
    for interval in (3, "auto"):
        ckpt = ftrain.Checkpointer(tmp_path / str(interval), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), interval=interval)
        ckpt.abort()


def test_local_interval_auto_is_the_fewest_steps_whose_snapshot_cost_fits_the_budget():
    from ftrain.interval import LocalSchedule

    schedule = LocalSchedule("auto", overhead_budget=0.01)
    assert schedule.interval == 1 and schedule.due(7)
    assert not schedule.review_due(49) and schedule.review_due(50)
    for _ in range(10):
        schedule.observe_step(0.1)
        schedule.observe_snapshot(0.0025)  # 2.5 ms of a 100 ms step: 2.5% at every step, 1% needs every 3rd
    assert schedule.propose() == 3 and schedule.cost_s == 0.0025
    assert schedule.set(3) and schedule.due(9) and not schedule.due(10)
    assert LocalSchedule("0").interval == 0 and not LocalSchedule("0").due(5)
