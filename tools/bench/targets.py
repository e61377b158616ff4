"""The benchmark's targets, for saves and for goodput under failures: each one's limit, and whether a result
meets it."""

from __future__ import annotations

from typing import Any

from .common import ASYNC_MODES, ratio

# Save targets: (key, limit, comparison). Ratios measured in the same run.
TARGETS = {
    "blocking_vs_dcp_save": (0.05, "<="),
    "blocking_vs_staging_floor": (1.5, "<="),
    "trainer_throughput_vs_off": (0.95, ">="),
    "write_vs_disk_floor": (0.80, ">="),
    "extra_memory_vs_rank_size": (1.2, "<="),
    # goodput targets (and the health check's cost), from the goodput part
    "goodput_steps_redone": (1.0, "<="),
    "goodput_time_lost_over_floor": (0.5, "<="),
    "goodput_ettr": (0.8, ">="),
    # warm restarts (#27): one training process SIGKILLed, its warm parent forks a new one
    "warm_time_lost_s": (0.5, "<="),
    "warm_ettr": (0.95, ">="),
    "warm_throughput_vs_cold": (0.99, ">="),
    "local_tier_throughput_vs_off": (0.99, ">="),
    "identical_to_uninterrupted": (1.0, ">="),
    "auto_overhead_vs_budget": (1.0, "<="),
    "health_cost_vs_noise": (1.0, "<="),
    # the loop part (own loop through ftrain.Checkpointer): the local tier's cost with the defaults, and
    # after / before of save cost and resume time; 1.1, not 1.0: a margin for run-to-run noise chosen here
    "loop_defaults_minus_tier_off": (0.01, "<="),
    "loop_save_cost_after_vs_before": (1.1, "<="),
    "loop_resume_after_vs_before": (1.1, "<="),
}
KILL_NAMES = {
    "job": "whole-job SIGKILL",
    "rank": "one-rank SIGKILL (--max-restarts)",
    "process": "one training process SIGKILL",
}
SETUP_NAMES = {"on": "local tier on", "warm": "defaults (local tier, warm restarts)"}
FAILURE_ROWS = ("job/on", "rank/on", "job/warm", "process/warm")  # the configurations with target rows


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each save target for each async mode: measured ratio, limit, met or by how much it is missed."""
    rows = []
    saves, floors = result.get("saves", {}), result.get("floors", {})
    memory, trainer = result.get("memory", {}), result.get("trainer", {}).get("modes", {})
    floor_copy = (floors.get("d2h_pinned") or floors.get("staging_copy") or {}).get("median")
    disk_gbps = floors.get("disk", {}).get("write", {}).get("gbps")
    dcp_save = saves.get("dcp_save", {}).get("median")
    for mode in ASYNC_MODES:
        save = saves.get(mode)
        if save:
            blocked = save["blocked_s"]["median"]
            rows.append(target_row("blocking_vs_dcp_save", mode, ratio(blocked, dcp_save),
                                   "blocked in save() / dcp.save total"))
            rows.append(target_row("blocking_vs_staging_floor", mode, ratio(blocked, floor_copy),
                                   "blocked in save() / staging-copy floor"))
            rows.append(target_row("write_vs_disk_floor", mode, ratio(save["write_gbps"]["median"], disk_gbps),
                                   "background write GB/s / sequential write+fsync GB/s"))
            mem = memory.get(f"manager {mode}")
            if mem:
                note = ""
                if mem["children_extra_bytes"] > 0:
                    note = f"writer process: {mem['children_extra_bytes'] / 1e6:.0f} MB of it"
                rows.append(target_row("extra_memory_vs_rank_size", mode, mem["ratio_to_rank_size"],
                                       "extra peak host memory / checkpoint bytes per rank", note))
        if mode in trainer:
            entry = trainer[mode]
            rows.append(target_row("trainer_throughput_vs_off", mode, entry["ratio_to_off_in_run"]["median"],
                                   "recipe steps/s, checkpoint every K steps / off (in-run estimate)",
                                   f"run against run: {entry['ratio_to_off']['median']:.3f}"))
    if result.get("goodput"):
        rows += goodput_rows(result["goodput"])
    if result.get("loop"):
        rows += loop_rows(result["loop"])
    return rows


def loop_rows(loop: dict[str, Any]) -> list[dict[str, Any]]:
    """The local tier's cost in the loop with the defaults (and the same figure before, for comparison), and after /
    before of save cost and resume time when the run had a before tree."""
    comparisons, configs = loop["comparisons"], loop["configs"]
    before = loop["config"].get("before")
    rows = []
    trees = [("", "defaults", "defaults_minus_tier_off")]
    if before:
        trees.append(("before ", f"before ({before['commit']})", "before_defaults_minus_tier_off"))
    for measure, what, ratio_key in (("", "loop time", "ratio_to_none"), ("cpu ", "CPU time", "cpu_ratio_to_none")):
        for prefix, mode, key in trees:
            gap, note = comparisons.get(measure + key), ""
            if gap:
                on, off = configs[f"{prefix}defaults"], configs[f"{prefix}tier-off"]
                note = (f"{what} / none: {on[ratio_key]['median']:.3f} defaults, {off[ratio_key]['median']:.3f} "
                        f"tier off; median of {gap['n']} paired round(s)")
            rows.append(target_row("loop_defaults_minus_tier_off", mode, gap["median"] if gap else None,
                                   f"own loop: {what} / none, defaults minus local_interval=0", note))
    for config in ("tier-off", "defaults"):
        after_before = comparisons.get(f"after_vs_before {config}")
        if not after_before:
            continue
        rows.append(target_row("loop_save_cost_after_vs_before", config, after_before["blocking_s"],
                               "own loop: blocked per save (checkpoint/blocking_s), after / before",
                               _after_before_note(configs, config, "blocking_s")))
        rows.append(target_row("loop_resume_after_vs_before", config, after_before["resume_s"],
                               "own loop: one load() of the last checkpoint, after / before",
                               _after_before_note(configs, config, "resume_s")))
    return rows


def _after_before_note(configs: dict[str, Any], config: str, key: str) -> str:
    now, then = configs[config].get(key), configs[f"before {config}"].get(key)
    if not now or not then:
        return ""
    unit = (1e3, "ms") if then["median"] < 1 else (1.0, "s")
    return f"{now['median'] * unit[0]:.1f} vs {then['median'] * unit[0]:.1f} {unit[1]} (medians)"


def goodput_rows(goodput: dict[str, Any]) -> list[dict[str, Any]]:
    """The goodput targets for the local tier on (the default); the tier-off runs are in the goodput table."""
    rows = []
    floor = goodput["restart_floor_s"]["median"]
    first_step = (goodput.get("first_step_floor_s") or {}).get("median")
    for config in FAILURE_ROWS:
        if config not in goodput["failures"]:
            continue
        entry = goodput["failures"][config]
        kind, setup = config.split("/")
        mode = f"{KILL_NAMES[kind]}, {SETUP_NAMES[setup]}"
        rows.append(target_row("goodput_steps_redone", mode, _median(entry["steps_redone"]),
                               "median steps redone per failure", _landed(entry)))
        lost = _median(entry["time_lost_s"])
        if kind == "process":  # no new process at all: the target is absolute
            rows.append(target_row("warm_time_lost_s", mode, lost, "median time lost per failure (s)",
                                   _lost_note(lost, floor, first_step)))
            rows.append(target_row("warm_ettr", mode, entry["ettr"], "ETTR (effective training time ratio)"))
            continue
        rows.append(target_row("goodput_time_lost_over_floor", mode, None if lost is None else lost - floor,
                               "median time lost per failure - restart floor (s)",
                               _lost_note(lost, floor, first_step)))
        rows.append(target_row("goodput_ettr", mode, entry["ettr"], "ETTR (effective training time ratio)"))
    throughput = goodput["throughput"]
    if throughput.get("ratio_warm_on"):
        rows.append(target_row("warm_throughput_vs_cold", "warm restarts on / off", throughput["ratio_warm_on"]["median"],
                               "recipe steps/s without failures, warm restarts on / off, local tier on (paired runs)",
                               "" if not throughput.get("ratio_warm_on_cpu") else
                               f"median step: {throughput['ratio_warm_on_median_step']['median']:.3f}; job CPU time "
                               f"off / on: {throughput['ratio_warm_on_cpu']['median']:.3f}"))
    rows.append(target_row("local_tier_throughput_vs_off", "local tier on / off", throughput["ratio_on_off"]["median"],
                           "recipe steps/s without failures, local tier on / off (paired runs)",
                           f"median step: {throughput['ratio_on_off_median_step']['median']:.3f}"))
    verdicts = {"uninterrupted, on vs off": throughput["identical_on_off"]["weights"]
                and throughput["identical_on_off"]["losses"]}
    verdicts.update({f"{e['kind']} kills, tier {e['tier']}": e["identical"] for e in goodput["failures"].values()})
    differ = [name for name, same in verdicts.items() if not same]
    rows.append(target_row("identical_to_uninterrupted", "all runs", sum(verdicts.values()) / len(verdicts),
                           "share of runs whose final weights and every loss match the uninterrupted run bit for bit",
                           f"differ: {', '.join(differ)}" if differ else f"{len(verdicts)} of {len(verdicts)}"))
    auto = goodput["auto"]
    rows.append(target_row("auto_overhead_vs_budget", "interval=auto, local tier on", auto["overhead_vs_budget"],
                           "checkpoint overhead (blocked + slowed steps) / checkpoint.overhead_budget",
                           f"{auto['overhead_share']:.2%} of training time (blocked only: {auto['blocked_share']:.2%}),"
                           f" budget {auto['budget']:.0%}"))
    health = goodput["health"]
    noise = health["step_time_noise"]
    rows.append(target_row("health_cost_vs_noise", "health check", ratio(health["share_of_step"], noise),
                           "health check's cost per step / run-to-run noise of the median step (#17)",
                           f"{health['per_step_s'] * 1e6:.1f} us = {health['share_of_step']:.3%} of a "
                           f"{health['median_step_s'] * 1e3:.1f} ms step; noise "
                           + (f"{noise:.2%}" if noise is not None else "needs 2 runs per tier")))
    return rows


def _median(summary: dict[str, Any] | None) -> float | None:
    return summary["median"] if summary else None


def _landed(entry: dict[str, Any]) -> str:
    note = f"{entry['recovered']} of {entry['requested']} kills recovered"
    return note + (f"; {entry['missed']} came after the run had finished" if entry["missed"] else "")


def target_row(key: str, mode: str, measured: float | None, what: str, note: str = "") -> dict[str, Any]:
    limit, op = TARGETS[key]
    if measured is None:
        return {"target": key, "mode": mode, "what": what, "limit": f"{op} {limit:g}", "measured": None,
                "met": None, "miss": "not measured", "note": note}
    met = measured <= limit if op == "<=" else measured >= limit
    if met:
        miss = ""
    elif op == "<=":
        miss = f"{measured / limit:.1f}x the limit"
    else:
        short = (limit - measured) / limit
        miss = f"{short:.1%} short" if short < 0.01 else f"{short:.0%} short"  # "0% short" would read as met
    return {"target": key, "mode": mode, "what": what, "limit": f"{op} {limit:g}", "measured": measured,
            "met": met, "miss": miss, "note": note}


def _lost_note(lost: float | None, floor: float, first_step: float | None) -> str:
    if lost is None:
        return ""
    note = f"{lost:.2f} s lost, floor {floor:.2f} s"
    if first_step is not None:
        note += f"; {lost - first_step:+.2f} s over the first-step floor ({first_step:.2f} s, torch without ftrain)"
    return note
