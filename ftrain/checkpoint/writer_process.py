"""DCP's writer process of ``checkpoint.mode=async_process``: whether it still runs, stopping it, and the check
before each save (room in shared memory for its staging, a lost process, a failed save)."""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch

from ftrain._torch_compat import (
    close_dcp_writer_process,
    dcp_writer_process,
    dcp_writer_process_alive,
    forget_dcp_writer_process,
)
from ftrain.checkpoint.collectives import max_over_ranks

if TYPE_CHECKING:
    from ftrain.checkpoint.pending import SaveStats

logger = logging.getLogger("ftrain.checkpoint")

SHARED_MEMORY = "/dev/shm"  # where async_process stages tensors for its writer process

# What check_before_save tells the manager to do.
KEEP = ""
USE_THREAD = "use the writer thread"
RESTART = "restart"


def stop() -> None:
    """Stop DCP's writer process (``async_process``) the way DCP itself would at garbage collection: DCP keeps it
    in a module global for the life of the interpreter, so a trainer that leaves with ``os._exit`` (as ftrain's
    do) would leave it to find a closed pipe and print an ``EOFError`` traceback at the end of every run. The next
    ``async_process`` save in this process starts a new one."""
    process = dcp_writer_process()
    if process is None:
        return
    forget_dcp_writer_process()
    close_dcp_writer_process(process)  # sends TERMINATE and joins (SIGTERM after 5 s); a second call at collection does nothing


def alive() -> bool:
    """Whether DCP's writer process of this rank is running (True when none was started yet)."""
    process = dcp_writer_process()
    return process is None or dcp_writer_process_alive(process)


def check_before_save(previous: SaveStats | None, staging_bytes: int, device: torch.device, rank: int) -> str:
    """``async_process``, before each save, agreed by every rank (the ranks' writer processes form a process
    group of their own, so all ranks act together). Collective. Returns what every rank does:

    * ``USE_THREAD``: too little shared memory for staging on any rank: every rank saves with the thread writer
      from now on (``async``), with one warning; staging into shared memory would fail every save.
    * ``RESTART``: a rank's writer process is gone (killed, crashed) or the previous save failed: every rank stops
      its writer process, so that this save starts new ones; otherwise every later save would fail.
    * ``KEEP``: nothing to do."""
    free = shutil.disk_usage(SHARED_MEMORY).free if staging_bytes and os.path.isdir(SHARED_MEMORY) else None
    node_bytes = staging_bytes * int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # the node's ranks share it
    short = free is not None and node_bytes * 1.25 > free
    # a save that failed for want of shared memory says so (torch: "unable to allocate shared memory")
    short = 1.0 if short or (previous is not None and "shared memory" in previous.error) else 0.0
    dead = 0.0 if alive() else 1.0
    failed = 1.0 if previous is not None and not previous.ok else 0.0
    short, dead, failed = max_over_ranks([short, dead, failed], device)
    if short:
        if rank == 0:
            logger.warning(
                "checkpoint.mode=async_process: too little room in %s to stage %.1f MB per rank for the writer "
                "process; saving with the writer thread (checkpoint.mode=async) from now on",
                SHARED_MEMORY,
                staging_bytes / 1e6,
            )
        return USE_THREAD
    if not (dead or failed):
        return KEEP
    if rank == 0:
        logger.warning(
            "starting a new checkpoint writer process on every rank: %s",
            "a writer process is gone" if dead else f"the save of step {previous.step if previous else '?'} failed",
        )
    return RESTART
