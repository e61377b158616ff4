"""A training loop of your own under ``ftrain.Checkpointer``: your model, your data, your optimizer.

    python recipes/custom_loop.py --run-dir runs/custom                     # one process
    torchrun --standalone --nproc_per_node=2 recipes/custom_loop.py --run-dir runs/custom   # DDP on gloo

Kill it at any moment (SIGKILL, Ctrl-C, a preemption's SIGTERM) and run the same command again: it continues
from the latest complete checkpoint (under torchrun, one rank's training process killed alone is replaced in
place: ``ftrain.run_with_warm_restarts``) and ends with the same weights and the same losses as a run that was never
interrupted. Nothing here is ftrain's own model or data: an MLP with batch norm and dropout on a synthetic
classification set, a plain ``torch.utils.data.Dataset`` in torchdata's ``StatefulDataLoader``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import ftrain
from ftrain import tags


class Blobs(Dataset):
    """Points around ``classes`` centres in ``dim`` dimensions: fixed by ``seed``, so every run sees the same data."""

    def __init__(self, size: int, dim: int, classes: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(classes, dim, generator=generator) * 3
        self.labels = torch.randint(classes, (size,), generator=generator)
        self.points = centres[self.labels] + torch.randn(size, dim, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index], self.labels[index]


class Classifier(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Epoch:
    """The loop's own counter, saved with the checkpoint through ``extra``: any ``Stateful`` can ride along."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = int(state["value"])


def rehearse() -> None:
    """One step on throwaway objects, run once by each rank's warm parent (``ftrain.run_with_warm_restarts``) on a
    process group of torch's ``fake`` backend: what a process does the first time (the first forward, backward and
    optimizer step) then stays in the parent, and a training process forked after a failure skips it. CPU only, no
    thread: no data loader here. The module is not wrapped: DDP's gradient all-reduce cannot run on the fake group
    (FSDP2's ``fully_shard`` can)."""
    model = Classifier(dim=16, hidden=64, classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    F.cross_entropy(model(torch.randn(32, 16)), torch.randint(4, (32,))).backward()
    optimizer.step()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--mode", default="async", help="checkpoint mode: async, async_process, sync or off")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model: nn.Module = Classifier(dim=16, hidden=64, classes=4)
    if distributed:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    dataset = Blobs(size=2048, dim=16, classes=4, seed=1)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = StatefulDataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
    torch.manual_seed(args.seed + 1 + rank)  # each rank draws its own dropout masks
    epoch = Epoch()

    ckpt = ftrain.Checkpointer(
        args.run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        dataloader=loader,
        extra={"epoch": epoch},
        interval=args.interval,
        mode=args.mode,
        keep_last=2,
    )
    mean_loss = None
    with ckpt:
        step = ckpt.load()  # before the loader's iterator is created: it continues where the checkpoint was
        sampler.set_epoch(epoch.value)
        batches = iter(loader)
        while step < args.steps:
            try:
                points, labels = next(batches)
            except StopIteration:  # next epoch: a new order
                epoch.value += 1
                sampler.set_epoch(epoch.value)
                batches = iter(loader)
                points, labels = next(batches)
            model.train()
            loss = F.cross_entropy(model(points), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            mean_loss = loss.detach().clone()
            if distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            ckpt.metrics.log({tags.LOSS: mean_loss.item()}, step)
            if ckpt.maybe_save(step, last=step == args.steps, loss=mean_loss.item()):
                print(f"preempted: step {step} saved; run again to resume", file=sys.stderr)
                return ftrain.EXIT_PREEMPTED
            if not ckpt.healthy:  # a NaN/Inf loss: back to the newest checkpoint, past the batches that led here
                step = ckpt.rollback()
                sampler.set_epoch(epoch.value)
                batches = iter(loader)
    if rank == 0:
        print(f"done: {step} steps" + (f", final loss {mean_loss.item():.4f}" if mean_loss is not None else ""))
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Under torchrun, a training process that dies (SIGKILL, OOM kill, an exception on one rank) is replaced by a
    # fork of this rank's warm parent, which has imported everything above: no new torchrun round, no new imports.
    # Without torchrun, main simply runs here.
    code = ftrain.run_with_warm_restarts(lambda: main(sys.argv[1:]), rehearse=rehearse)
    # Leave without interpreter finalization, as ftrain-train does: with gloo (here DDP's and the default group's
    # threads), a process that finished cleanly can still abort while the interpreter tears down (SIGABRT,
    # "terminate called without an active exception"; pytorch/pytorch#179291 describes the mechanism), and
    # torchrun would report the finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
