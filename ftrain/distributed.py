"""Process-group setup from torchrun's environment and device choice. ``DistContext`` and the rank helpers
(``max_over_ranks``, ``sum_over_ranks``) live in ``ftrain.checkpoint.collectives`` and are re-exported here."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftrain.checkpoint.collectives import DistContext, max_over_ranks, sum_over_ranks
from ftrain.warm import GENERATION_ENV as WARM_GENERATION_ENV

__all__ = ["DistContext", "DistEnv", "close_distributed", "init_distributed", "max_over_ranks", "pick_device", "sum_over_ranks"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    checkpoint_group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def context(self) -> DistContext:
        return DistContext(self.rank, self.world_size, self.device, self.checkpoint_group)


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun set up, or make a one-rank group when run with plain ``python``.

    Under torchrun each restart round gets a key space of its own in the agent's store: ranks of a new round
    must never read the addresses that a dead round left there (they would try to connect to dead ports).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _round_store(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        rank, world_size = 0, 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)

    # Background checkpoint collectives get their own gloo group so that they never interleave with the
    # training collectives on the default group.
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device, checkpoint_group)


def _round_store(timeout: datetime.timedelta) -> dist.Store:
    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # One store for the agent's whole life, shared by every round: key each round apart. The restart count
        # is kept by each agent on its own, so it names the round only while there is one agent (one node).
        round_id = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ["RANK"]) == 0:
            logging.getLogger("ftrain").warning(
                "several nodes share torchrun's agent store: a restarted or replaced node will not rejoin. "
                "Start every node's torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see README)"
            )
        client = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        # A training process forked again by its warm parent (ftrain.warm) is a generation of its own.
        generation = os.environ.get(WARM_GENERATION_ENV, "0")
        return dist.PrefixStore(f"ftrain/{run_id}/round{round_id}/gen{generation}/", client)
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (or a launcher without an agent store): rank 0 hosts a new store on
    # the port that this round's rendezvous picked, so no key of an earlier round can be in it.
    is_master = int(os.environ["RANK"]) == 0
    client = dist.TCPStore(host, port, int(os.environ["WORLD_SIZE"]), is_master=is_master, timeout=timeout)
    return dist.PrefixStore(f"ftrain/{run_id}/", client)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()




