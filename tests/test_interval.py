"""checkpoint.interval=auto: the interval follows the measured cost of a checkpoint and the budget."""

from __future__ import annotations

import torch
import torch.nn as nn

import ftrain
from ftrain import tags
from ftrain.interval import FIRST_AUTO_INTERVAL, LocalSchedule, SaveSchedule

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
    # the local tier (on by default, local_interval=auto) logs its interval and snapshot cost at each review: the
    # first a few steps after the start, from the first snapshots measured, then every 50 steps
    local = scalars(tmp_path / "tb", tags.LOCAL_INTERVAL)
    cost = scalars(tmp_path / "tb", tags.LOCAL_SNAPSHOT_S)
    first = LocalSchedule.FIRST_REVIEW_AFTER
    assert list(local) == [first, 50] and all(1 <= local[step] <= 100 for step in local)
    assert list(cost) == [first, 50] and all(0 < cost[step] < 0.5 for step in cost)


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


def test_local_interval_auto_pays_the_snapshots_durable_saves_take_from_the_same_budget():
    """Every durable save takes a snapshot (it writes from it): with a save every 10 steps those alone spend part
    of the budget, and the snapshots between saves get the rest; saves that spend it all leave MAX_AUTO_INTERVAL."""
    from ftrain.interval import LocalSchedule

    schedule = LocalSchedule("auto", overhead_budget=0.01)
    for _ in range(10):
        schedule.observe_step(0.6)
        schedule.observe_snapshot(0.03)  # 30 ms of a 0.6 s step: 6 ms of budget per step
    assert schedule.propose() == 5  # no saves: 30 ms / 6 ms
    assert schedule.propose(save_every=10) == 10  # saves spend 3 ms per step: 30 ms / 3 ms
    assert schedule.propose(save_every=5) == LocalSchedule.MAX_AUTO_INTERVAL  # 6 ms per step: nothing left
    assert schedule.propose(save_every=2) == LocalSchedule.MAX_AUTO_INTERVAL


def test_local_interval_auto_is_first_reviewed_a_few_steps_after_each_start():
    """A large state is not snapshotted at every step until step 50 whatever it costs: the first review comes
    FIRST_REVIEW_AFTER steps after a start (the same step on every rank), from the first measured snapshots."""
    from ftrain.interval import LocalSchedule

    schedule = LocalSchedule("auto", overhead_budget=0.01)
    schedule.start(120)
    first = 120 + LocalSchedule.FIRST_REVIEW_AFTER
    assert [step for step in range(121, 160) if schedule.review_due(step)] == [first, 150]
    for cost in (1.0, 1.0, 0.02, 0.02, 0.02):  # each slot's first snapshot faults its pages in: not counted
        schedule.observe_step(0.1)
        schedule.observe_snapshot(cost)  # 20% of a step: every 20th step fits 1%
    assert schedule.propose() == 20 and schedule.cost_s == 0.02
    assert not LocalSchedule("5").review_due(LocalSchedule.FIRST_REVIEW_AFTER)  # a fixed interval is never reviewed


def test_local_interval_auto_first_review_is_not_misled_by_the_first_steps_one_time_work():
    """At the first review, three steps after a fresh start, only two step times are known (StepTimer does not
    feed a start's first step) and they carry one-time work (the slots' first pages): a rule that waits for three
    would keep a snapshot at every step until step 50, a median would take the slow one for the step time. The
    fastest step since the start is used until enough are measured."""
    from ftrain.interval import LocalSchedule

    schedule = LocalSchedule("auto", overhead_budget=0.01)
    schedule.start(0)
    for step_s, cost in ((None, 0.2), (3.0, 0.1), (0.6, 0.03)):  # two warm-up snapshots, then one measured
        if step_s is not None:
            schedule.observe_step(step_s)
        schedule.observe_snapshot(cost)
    assert schedule.review_due(LocalSchedule.FIRST_REVIEW_AFTER)
    assert schedule.propose() == 5  # 30 ms of a 0.6 s step: 1% is every 5th step
    for _ in range(LocalSchedule.STEADY_AFTER):
        schedule.observe_step(0.5)
    assert schedule.propose() == 6  # enough steps measured: the median (0.5 s)
