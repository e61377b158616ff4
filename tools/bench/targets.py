"""The issue #7 targets: each one's limit, and whether a result meets it."""

from __future__ import annotations

from typing import Any

from .common import ASYNC_MODES, ratio

# Targets of issue #7: (key, limit, comparison). Ratios measured in the same run.
TARGETS = {
    "blocking_vs_dcp_save": (0.05, "<="),
    "blocking_vs_staging_floor": (1.5, "<="),
    "trainer_throughput_vs_off": (0.95, ">="),
    "write_vs_disk_floor": (0.80, ">="),
    "extra_memory_vs_rank_size": (1.2, "<="),
}


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #7 for each async mode: measured ratio, limit, met or by how much it is missed."""
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
    return rows


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
