"""The report: bench.json, and bench.md with its markdown tables."""

from __future__ import annotations

import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from .common import MANAGER_MODES, S3_LOOP_MODES, ratio
from .system import environment
from .targets import evaluate_targets


def write_report(out: Path, result: dict[str, Any]) -> None:
    """Write bench.json and bench.md into ``out``; fills in what a micro part launched by hand lacks."""
    result.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
    result.setdefault("command", " ".join([Path(sys.executable).name, *sys.argv]))
    result.setdefault("environment", environment())
    result["targets"] = evaluate_targets(result)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(report_markdown(result))


def fmt_s(summary: dict[str, Any] | None) -> str:
    """``median [min-max]`` of a time, in ms below one second."""
    if not summary:
        return "-"
    scale, unit = (1e3, "ms") if summary["median"] < 1 else (1.0, "s")
    med, low, high = (summary[k] * scale for k in ("median", "min", "max"))
    digits = 1 if unit == "ms" and summary["median"] * scale < 100 else 0 if unit == "ms" else 2
    if summary["n"] == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} [{low:.{digits}f}-{high:.{digits}f}]"


def fmt_x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Checkpoint benchmark ({result.get('created', '')})", "", f"Command: `{result.get('command', '')}`", ""]
    lines += machine_lines(result)
    if "targets" in result and result["targets"]:
        lines += targets_table(result["targets"])
    if "floors" in result:
        lines += micro_tables(result)
    if "trainer" in result:
        lines += trainer_table(result["trainer"])
    if "goodput" in result:
        lines += goodput_tables(result["goodput"])
    if "s3" in result:
        lines += s3_lines(result["s3"])
    if "loop" in result:
        lines += loop_lines(result["loop"])
    return "\n".join(lines) + "\n"


def machine_lines(result: dict[str, Any]) -> list[str]:
    env, cfg = result.get("environment", {}), result.get("config", {})
    lines = [f"Machine: {env.get('cpus', '?')} CPU cores, {env.get('memory_gb', '?')} GB RAM, torch {env.get('torch', '?')}, "
             f"{env.get('platform', '?')}; ftrain sources {env.get('ftrain_source', '?')}."]
    if env.get("other_cpu_share", 0.0) > 0.05 or env.get("steal_share", 0.0) > 0.05:
        lines.append(f"**Warning**: other processes used {env['other_cpu_share']:.0%} and the hypervisor stole "
                     f"{env['steal_share']:.0%} of the CPUs during this run; its numbers may be disturbed.")
    if cfg:
        lines.append(f"State: {cfg['size_mb']:.0f} MB over {cfg['world_size']} ranks on {cfg['device']} "
                     f"({cfg['rank_bytes'] / 1e6:.0f} MB per rank in {cfg['tensors_per_rank']} tensors); "
                     f"{cfg['warmup']} warm-up + {cfg['reps']} measured reps; times are the slowest rank's, "
                     f"shown as median [min-max]."
                     + (f" Other processes used {cfg['other_cpu_share']:.0%} of the CPUs meanwhile."
                        if "other_cpu_share" in cfg else ""))
    return [*lines, ""]


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", "", "| target | mode | measured | limit | status |", "|---|---|---|---|---|"]
    for row in rows:
        status = "not measured" if row["met"] is None else "met" if row["met"] else f"**missed**: {row['miss']}"
        if row["note"]:
            status += f" ({row['note']})"
        lines.append(f"| {row['what']} | {row['mode']} | {fmt_x(row['measured'], 3)} | {row['limit']} | {status} |")
    return [*lines, ""]


def micro_tables(result: dict[str, Any]) -> list[str]:
    floors, saves, resume, memory = result["floors"], result["saves"], result["resume"], result["memory"]
    rank_bytes = result["config"]["rank_bytes"]
    lines = ["## Saves and floors", "",
             "| what | blocked (caller) | staging done | committed / total | GB/s | extra peak host memory |",
             "|---|---|---|---|---|---|"]

    def mem(name: str) -> str:
        m = memory.get(name)
        return f"{m['extra_peak_bytes'] / 1e6:.0f} MB ({m['ratio_to_rank_size']:.2f}x rank)" if m else "-"

    lines.append(f"| floor: copy into preallocated buffer | - | {fmt_s(floors['staging_copy'])} | - | "
                 f"{fmt_x(floors['staging_copy']['gbps'])} | {mem('floor: staging copy')} |")
    if floors.get("d2h_pinned"):
        lines.append(f"| floor: device-to-host into pinned | - | {fmt_s(floors['d2h_pinned'])} | - | "
                     f"{fmt_x(floors['d2h_pinned']['gbps'])} | {mem('floor: d2h pinned')} |")
    disk = floors["disk"]
    lines.append(f"| floor: sequential write + fsync | - | - | {fmt_s(disk['write'])} | {fmt_x(disk['write']['gbps'])} | "
                 f"{mem('floor: disk write+read')} |")
    lines.append(f"| `dcp.save` | {fmt_s(saves['dcp_save'])} | - | {fmt_s(saves['dcp_save'])} | "
                 f"{fmt_x(saves['dcp_save']['gbps'])} | {mem('dcp.save')} |")
    for mode in MANAGER_MODES:
        s = saves[mode]
        lines.append(f"| CheckpointManager `{mode}` | {fmt_s(s['blocked_s'])} | {fmt_s(s['staged_s'])} | "
                     f"{fmt_s(s['commit_s'])} | {fmt_x(s['write_gbps']['median'])} (write) | {mem('manager ' + mode)} |")
    lines += ["", f"Checkpoint bytes per rank: {rank_bytes / 1e6:.0f} MB. GB/s counts all ranks' bytes; for the "
              "manager modes it is the background write (from staging done until every rank's files are durable).", ""]
    lines += ["## Resume", "", "| what | time | GB/s | vs read floor |", "|---|---|---|---|",
              f"| floor: sequential read, cold page cache | {fmt_s(disk['read'])} | {fmt_x(disk['read']['gbps'])} | 1 |",
              f"| `CheckpointManager.load`, cold page cache | {fmt_s(resume)} | {fmt_x(resume['gbps'])} | "
              f"{fmt_x(ratio(resume['median'], disk['read']['median']))}x |"]
    unverified = result.get("resume_without_checksums")
    if unverified:
        lines.append(f"| same, `verify_checksums=False` | {fmt_s(unverified)} | {fmt_x(unverified['gbps'])} | "
                     f"{fmt_x(ratio(unverified['median'], disk['read']['median']))}x |")
    lines.append("")
    return lines


def trainer_table(trainer: dict[str, Any]) -> list[str]:
    cfg = trainer["config"]
    k = cfg["interval"]
    lines = ["## Trainer", "",
             f"`recipes/train.py`, {cfg['nproc']} ranks, {cfg['max_steps']} steps, checkpoint every {k} steps, "
             f"{cfg['reps']} alternating run(s) per mode, steps/s from TensorBoard's wall times after step {cfg['skip']}.",
             "",
             f"- *steps/s*: {k} / the median duration of the {k}-step windows that each hold one checkpoint; *vs off*: "
             "divided by the `off` run of the same repetition (run against run: exposed to changes of outside load "
             "between runs).",
             f"- *in-run vs off*: within each run, {k} x the median step that does not follow a checkpoint / the "
             "median window (with / without checkpoints under the same outside load), divided by the same figure "
             "of the `off` run. This is the estimate the target uses.",
             "- *whole run*: all steps after the skipped ones / their wall time, and its ratio run against run.",
             "",
             "| mode | steps/s | vs off | in-run vs off | whole run: steps/s | vs off | blocked per checkpoint "
             "| save until commit | checkpoint size | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def spread(summary: dict[str, Any] | None, digits: int) -> str:
        if not summary:
            return "-"
        text = f"{summary['median']:.{digits}f}"
        return text + (f" [{summary['min']:.{digits}f}-{summary['max']:.{digits}f}]" if summary["n"] > 1 else "")

    for mode, entry in trainer["modes"].items():
        size = entry.get("checkpoint_size_bytes")
        lines.append(
            f"| {mode} | {spread(entry['window_steps_per_s'], 2)} | {spread(entry.get('ratio_to_off'), 3)} | "
            f"{spread(entry.get('ratio_to_off_in_run'), 3)} | "
            f"{spread(entry['steps_per_s'], 2)} | {spread(entry.get('ratio_to_off_whole_run'), 3)} | "
            f"{fmt_s(entry.get('checkpoint_blocking_s'))} | {fmt_s(entry.get('checkpoint_save_s'))} | "
            f"{f'{size / 1e6:.1f} MB' if size else '-'} | {spread(entry['other_cpu_share'], 2)} |"
        )
    return [*lines, "", "Other load: the share of the CPUs that processes outside the benchmark used during each run "
            "(0.50 = one of two cores).", ""]


def goodput_tables(goodput: dict[str, Any]) -> list[str]:
    """Failures with the local tier on and off, throughput without failures, the health check, interval=auto."""
    cfg, floor = goodput["config"], goodput["restart_floor_s"]
    limit = floor["median"] + 0.5
    lines = ["## Goodput under failures", "",
             f"`recipes/train.py`, {cfg['nproc']} ranks, {cfg['max_steps']} steps, checkpoint every {cfg['interval']} "
             f"steps; local snapshot tier on (`checkpoint.local_interval=auto`, the default) and off (`=0`, as before "
             f"it). {cfg['kills']} SIGKILL(s) per row at the same random moments (seed {cfg['seed']}, "
             f"{cfg['kill_delay_s'][0]:.1f}-{cfg['kill_delay_s'][1]:.1f} s of training before each).", "",
             f"Restart floor (torchrun starting {cfg['nproc']} workers that import torch and "
             f"`torch.distributed.checkpoint` and join a gloo group): {fmt_s(floor)} over {floor['n']} launch(es); "
             f"time lost per failure should stay within floor + 0.5 s = {limit:.2f} s.", ""]
    first_step = goodput.get("first_step_floor_s")
    if first_step:
        lines += [f"First-step floor (the same launch, each worker then also building the recipe's FSDP2 model and "
                  f"AdamW and taking one optimizer step on random tokens, without ftrain): {fmt_s(first_step)}. "
                  f"Beyond the restart floor this is torch's own first-use work (`torch._dynamo` imported at the "
                  f"first DTensor, DTensor sharding rules computed at their first use) and the step itself; *over "
                  f"first step* below is what a restart costs beyond it: ftrain's imports, lock, agreement and "
                  f"load, and the chaos tool's kill.", ""]
    lines += ["| failure | local tier | recovered | steps redone (median [min-max]) | time lost per failure | "
              "vs floor + 0.5 s | over first step | cost per failure | ETTR | run's own time lost | bit-identical |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    first_step_median = first_step["median"] if first_step else None
    for entry in goodput["failures"].values():
        lost, own = entry["time_lost_s"], entry["own_report"].get("time_lost_s")
        lost_median = lost["median"] if lost else None
        verdict = "yes" if entry["identical"] else "**no**: " + "; ".join(entry["differences"][:3])
        lines.append(f"| {entry['kind']} | {entry['tier']} | {entry['recovered']} of {entry['requested']} | "
                     f"{_spread(entry['steps_redone'], 1)} | {fmt_s(lost)} | "
                     f"{fmt_x(ratio(lost['median'], limit)) + 'x' if lost else '-'} | "
                     f"{f'{lost_median - first_step_median:+.2f} s' if lost and first_step else '-'} | "
                     f"{fmt_s(entry['cost_per_failure_s'])} | "
                     f"{fmt_x(entry['ettr'])} | {fmt_s(own)} | {verdict} |")
    lines += ["", "*recovered*: failures that landed while the job trained and were recovered from, of those asked for "
              "(a kill drawn after the run finished is not one); "
              "*time lost*: from the kill until the first step after it (chaos tool); *cost per failure*: time lost + "
              "steps redone x the median step time; *ETTR*: 1 - the failures' cost / training wall time; *run's own*: "
              "the `recovery/time_lost_s` the resumed run logged (last step before the failure to first step after; "
              "fewer values than failures when a resume went back past the step an earlier one was logged at).", ""]
    return lines + throughput_lines(goodput) + auto_lines(goodput["auto"])


def throughput_lines(goodput: dict[str, Any]) -> list[str]:
    throughput, health = goodput["throughput"], goodput["health"]
    tiers, same = throughput["tiers"], throughput["identical_on_off"]
    lines = ["### Without failures", "",
             f"{throughput['tiers']['on']['steps_per_s']['n']} run(s) per setting, alternating, same seed; steps/s "
             f"from TensorBoard's wall times after step {goodput['config']['skip']}; *median step*: the median step "
             "that does not follow a checkpoint.", "",
             "| local tier | steps/s | vs off (paired) | median step | vs off | other load |",
             "|---|---|---|---|---|---|"]
    for tier in tiers:
        entry, vs = tiers[tier], tier == "on"
        lines.append(f"| {tier} | {_spread(entry['steps_per_s'], 2)} | "
                     f"{_spread(throughput['ratio_on_off'], 3) if vs else '-'} | {fmt_s(entry['plain_step_s'])} | "
                     f"{_spread(throughput['ratio_on_off_median_step'], 3) if vs else '-'} | "
                     f"{_spread(entry['other_cpu_share'], 2)} |")
    if throughput.get("ratio_warm_on"):
        lines += ["", "*off*, *on*: the local tier off and on, warm restarts off; *warm*: the defaults (local tier on, "
                  f"warm restarts on). Steps/s warm / on, paired: {_spread(throughput['ratio_warm_on'], 3)}"
                  + (f"; median step on / warm: {_spread(throughput['ratio_warm_on_median_step'], 3)}; the job's "
                     f"CPU time on / warm: {_spread(throughput['ratio_warm_on_cpu'], 3)}"
                     if throughput.get("ratio_warm_on_cpu") else "") + "."]
    noise = health["step_time_noise"]
    differ = "**differ**: " + "; ".join(same["differences"][:5])
    lines += ["", "Final weights and every loss, tier on vs off: "
              + ("bit-identical." if same["weights"] and same["losses"] else differ),
              "",
              f"Health check per step (#17), micro-benchmark: `HealthMonitor.judge` + `record` "
              f"{health['judge_s'] * 1e6:.1f} us, plus the verdict's float in the per-step all-reduce (gloo, 3 floats "
              f"{health['allreduce_3_s'] * 1e6:.1f} us vs 2 floats {health['allreduce_2_s'] * 1e6:.1f} us): "
              f"{health['per_step_s'] * 1e6:.1f} us per step, {health['share_of_step']:.3%} of the median step "
              f"({health['median_step_s'] * 1e3:.1f} ms); run-to-run noise of the median step: "
              + (f"{noise:.2%}." if noise is not None else "not measured (one run per setting)."), ""]
    return lines


def auto_lines(auto: dict[str, Any]) -> list[str]:
    chosen = ", ".join(f"{int(value)} from step {int(step)}" for step, value in auto["intervals"]) or "none logged"
    return ["### `checkpoint.interval=auto`", "",
            f"One run, local tier on. Interval chosen: {chosen}; {len(auto['checkpoints'])} checkpoint(s) before the "
            f"last step. Over {auto['training_s']:.1f} s of training: blocked {auto['blocked_s']:.3f} s "
            f"({auto['blocked_share']:.2%}); blocked + slowdown of the steps while each write ran "
            f"{auto['slowdown_s']:.3f} s ({auto['overhead_share']:.2%}, against a median step of "
            f"{auto['median_step_s'] * 1e3:.1f} ms); budget {auto['budget']:.1%}.", ""]


def _spread(summary: dict[str, Any] | None, digits: int) -> str:
    if not summary:
        return "-"
    text = f"{summary['median']:.{digits}f}"
    return text + (f" [{summary['min']:.{digits}f}-{summary['max']:.{digits}f}]" if summary["n"] > 1 else "")


def _cpu_per_gb(rate: dict[str, Any]) -> str:
    value = rate.get("cpu_s_per_gb")
    return "-" if value is None else f"{value:.2f}"


def s3_lines(s3: dict[str, Any]) -> list[str]:
    """The part's markdown: rates against the floor, and the loop's throughput by where checkpoints go."""
    cfg, floor, ours = s3["config"], s3["floor"], s3["ftrain"]
    loop = s3["loop"]["modes"]
    lines = [
        "", "## Object storage (S3)", "",
        f"{cfg['url']}; {cfg['size_bytes'] / 1e6:.0f} MB as {cfg['threads']} files in parallel; "
        f"{cfg['reps']} reps after {cfg['warmup']} warm-up.", "",
        "| | floor (boto3 transfer) | ftrain | ftrain / floor | client CPU-s per GB: floor / ftrain |",
        "|---|---|---|---|---|",
        f"| save (until the marker) | {floor['put']['gbps']:.3f} GB/s | {ours['save']['gbps']:.3f} GB/s | "
        f"{s3['save_to_floor']:.2f} | {_cpu_per_gb(floor['put'])} / {_cpu_per_gb(ours['save'])} |",
        f"| resume (checksums verified) | {floor['get']['gbps']:.3f} GB/s | {ours['resume']['gbps']:.3f} GB/s | "
        f"{s3['resume_to_floor']:.2f} | {_cpu_per_gb(floor['get'])} / {_cpu_per_gb(ours['resume'])} |",
        "", f"Requests per ftrain save: {ours['save'].get('requests_per_save', float('nan')):.1f}.",
        *small_save_lines(s3.get("small_saves")),
        "", "| loop (checkpoint.mode=async) | steps/s | vs off | server CPU per run |", "|---|---|---|---|",
    ]
    for label in S3_LOOP_MODES:
        entry = loop[label]
        against = entry.get("ratio_to_off")
        cpu = [r["server_cpu_s"] for r in s3["loop"]["runs"] if r["mode"] == label and r.get("server_cpu_s") is not None]
        lines.append(f"| {label} | {entry['window_steps_per_s']['median']:.2f} | "
                     f"{'-' if against is None else format(against['median'], '.3f')} | "
                     f"{format(sorted(cpu)[len(cpu) // 2], '.2f') + ' s' if cpu else '-'} |")
    points = s3["loop"]["overhead_points"]
    if points is not None:
        lines.append(f"\nSaving to the store costs {points:+.1f} points of throughput more than saving to local disk.")
    cpu = s3["loop"].get("cpu_points")
    if cpu is not None:
        lines.append(f"The job's own CPU time (torchrun, workers, their threads; not the server's) saving to the store "
                     f"is {cpu:+.1f} points of the checkpoint-free run's above saving to local disk (median of the "
                     "rounds): what the training processes pay for the store, load on the machine apart.")
    return lines


def small_save_lines(small: dict[str, Any] | None) -> list[str]:
    if not small:
        return []
    return ["", f"A {small['size_mb']:.0f} MB save in one process (async, until committed, retention included; median of "
            f"{small['saves']}): {small['disk_cpu_ms']:.0f} ms of CPU to local disk, {small['store_cpu_ms']:.0f} ms to "
            f"the store ({small['extra_cpu_ms']:+.0f} ms), {small['requests_per_save']:.1f} requests per save."]


def _tree(source: dict[str, Any]) -> str:
    changed = source.get("changed") or []
    return f"`{source['commit']}`" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def snapshot_share(entry: dict[str, Any] | None, tier_off: dict[str, Any] | None) -> float | None:
    """The local tier's share of the loop time of a configuration, as the training thread sees it: the extra of
    a ``maybe_save`` call that snapshots (no save) over one that does nothing, times those snapshots, plus the
    extra of a save step's call over ``tier_off``'s (where the snapshot replaces the save's staging copy), times
    the saves, all over the loop time. Work in background threads is not in it."""
    wanted = ("call_snapshot_s", "call_plain_s", "snapshots_plain", "save_call_s", "saves_measured")
    if not entry or not tier_off or not tier_off.get("save_call_s") or not all(entry.get(key) for key in wanted):
        return None
    extra = max(entry["call_snapshot_s"]["median"] - entry["call_plain_s"]["median"], 0.0)
    extra_save = max(entry["save_call_s"]["median"] - tier_off["save_call_s"]["median"], 0.0)
    spent = extra * entry["snapshots_plain"]["median"] + extra_save * entry["saves_measured"]["median"]
    return spent / entry["loop_s"]["median"]


def loop_lines(loop: dict[str, Any]) -> list[str]:
    """The loop part: loop time per configuration against no Checkpointer, save cost, resume; before and after."""
    cfg, configs = loop["config"], loop["configs"]
    before = cfg.get("before")
    run = next(iter(loop["runs"]), {})
    lines = [
        "", "## Own loop (`ftrain.Checkpointer`)", "",
        f"`tools/bench/loop_worker.py` under torchrun, {cfg['nproc']} ranks: an MLP of {cfg['layers']} `Linear` layers "
        f"of width {run.get('width', '?')} ({run.get('params', 0) / 1e6:.1f} M parameters; with AdamW's two moments "
        f"{cfg['size_mb']:.0f} MB), each layer and the model `fully_shard`'ed, gloo on CPU, {cfg['batch']} rows per "
        "rank; "
        f"{cfg['steps']} steps, a durable save every {cfg['interval']} (`mode=async`, `keep_last=2`); "
        f"{cfg['reps']} round(s), each running every configuration once, the order rotated. *none*: no Checkpointer; "
        "*tier-off*: `local_interval=0`; *defaults*: the local tier on (`local_interval=auto`). After: ftrain "
        + _tree(cfg["after"]) + "."
        + (f" Before: `{before['commit']}` ({before['rev']}: {before['subject']}), the same worker with "
           "`PYTHONPATH` on its sources." if before else ""), "",
        f"- *loop time*: from the end of step {cfg['skip']} until the last step's `maybe_save(last=True)` returned "
        "(the final commit included), the slowest rank; *vs none*: divided by the *none* job of the same round; "
        "*last step left out*: the same without the last step (no final commit wait); *CPU time vs none*: the CPU "
        "time the ranks' processes (all their threads) used in the same steps, divided likewise (outside load on a "
        "shared machine moves it far less than wall time).",
        "- *snapshots*: local snapshots in the measured steps / in all steps (from the snapshot schedule in force; a "
        "durable save takes one too); *blocked per save*: the checkpointer's `checkpoint/blocking_s` of the saves "
        "before the last; *maybe_save at a save*: the call at those steps; *final save*: the last step's call, "
        "until the commit; *resume*: one `load()` of the last checkpoint in a second job (page cache warm).", "",
        "| configuration | loop time | vs none | last step left out | CPU time vs none | median step | snapshots "
        "| blocked per save | maybe_save at a save | final save | resume: load() | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in configs.items():
        snaps = entry.get("snapshots_measured")
        snap_text = "-" if label == "none" else "?" if snaps is None else (
            f"{snaps['median']:.0f} / {entry['snapshots_all']['median']:.0f}")
        lines.append(
            f"| {label} | {fmt_s(entry['loop_s'])} | {_spread(entry.get('ratio_to_none'), 3)} | "
            f"{_spread(entry.get('ratio_to_none_without_last'), 3)} | {_spread(entry.get('cpu_ratio_to_none'), 3)} | "
            f"{fmt_s(entry['median_step_s'])} | {snap_text} | "
            f"{fmt_s(entry.get('blocking_s'))} | {fmt_s(entry.get('save_call_s'))} | "
            f"{fmt_s(entry.get('final_save_s'))} "
            f"| {fmt_s(entry.get('resume_s'))} | {_spread(entry['other_cpu_share'], 2)} |")
    lines.append("")
    for label, entry in configs.items():
        if label == "none" or entry.get("snapshots_measured") is None or not entry["snapshots_all"]["median"]:
            continue
        chosen = ", ".join(f"{int(v)} at step {s}" for s, v in entry["auto_intervals"]) or "none in these steps"
        costs = entry["auto_snapshot_cost_s"]
        cost = statistics.median(c for _, c in costs) * 1e3 if costs else None
        lines.append(
            f"- {label}: `local_interval=auto` chose {chosen}"
            + (f" (rank 0's median snapshot cost {cost:.0f} ms)" if cost is not None else "")
            + f"; `maybe_save` on a measured step with a snapshot (no save) {fmt_s(entry.get('call_snapshot_s'))}, "
            f"without one {fmt_s(entry.get('call_plain_s'))}.")
    comparisons = loop["comparisons"]
    gap = comparisons.get("defaults_minus_tier_off")
    share = snapshot_share(configs.get("defaults"), configs.get("tier-off"))
    if share is not None:
        lines.append(f"- defaults: the local tier's cost as the training thread sees it, ((`maybe_save` with a snapshot "
                     "- without one) x those snapshots + (`maybe_save` at a save - tier-off's) x the saves) / loop "
                     f"time: {share:.3f} (from medians within each run, so outside load moves it far less than the "
                     "ratios above; background threads' work is not in it: see CPU time); target <= 0.01.")
    for key, what in (("defaults_minus_tier_off", "loop time"), ("cpu defaults_minus_tier_off", "CPU time")):
        if comparisons.get(key):
            lines.append(f"- defaults minus tier-off, {what} / none: {comparisons[key]['median']:+.3f} (median of the "
                         f"rounds' differences; of the medians {comparisons[key]['of_medians']:+.3f}); target <= 0.01.")
    if before:
        lines += ["", "| measure | configuration | before | after | after / before |", "|---|---|---|---|---|"]
        names = {"blocking_s": "blocked per save", "save_call_s": "maybe_save at a save",
                 "final_save_s": "final save (until commit)", "resume_s": "resume: load()"}
        for config in ("tier-off", "defaults"):
            now, then = configs[config], configs[f"before {config}"]
            ratios = comparisons[f"after_vs_before {config}"]
            for key, name in names.items():
                lines.append(f"| {name} | {config} | {fmt_s(then.get(key))} | {fmt_s(now.get(key))} | "
                             f"{fmt_x(ratios.get(key))} |")
            for key, name in (("ratio_to_none", "loop time / none"), ("cpu_ratio_to_none", "CPU time / none")):
                lines.append(f"| {name} | {config} | {_spread(then.get(key), 3)} | {_spread(now.get(key), 3)} | "
                             f"{fmt_x(ratios.get(key), 3)} |")
        for key, what in (("defaults_minus_tier_off", "loop time"), ("cpu defaults_minus_tier_off", "CPU time")):
            now_gap, then_gap = comparisons.get(key), comparisons.get(f"{key.replace('defaults', 'before_defaults')}")
            if now_gap and then_gap:
                lines.append(f"\nDefaults minus tier-off, {what} / none: before {then_gap['median']:+.3f}, after "
                             f"{now_gap['median']:+.3f}.")
    return [*lines, ""]
