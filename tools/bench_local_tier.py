"""What the local snapshot tier costs: the hot-path call, the background copy, checksum and marker, verify, restore.

    python tools/bench_local_tier.py                 # the recipe's model + AdamW, in /dev/shm
    python tools/bench_local_tier.py --extra-mb 512  # plus a 512 MB tensor: copy and checksum throughput

Single process (one rank's share of the state). Times are medians over ``--repeats`` snapshots.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftrain.checkpoint import local  # noqa: E402
from ftrain.checkpoint.local import LocalModelState, LocalOptimizerState, LocalProgressState, LocalSnapshots  # noqa: E402
from ftrain.config import ModelConfig  # noqa: E402
from ftrain.model import GPT  # noqa: E402
from ftrain.state import ModelState, OptimizerState, TrainProgress  # noqa: E402


class Blob:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> dict:
        return {"blob": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor.copy_(state["blob"])


def median_us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:8.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--extra-mb", type=int, default=0, help="add a tensor of this size to the state")
    parser.add_argument("--dir", default="/dev/shm", help="where the snapshot directory goes")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(ModelConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (8, 128))
    model(tokens, tokens).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    progress = TrainProgress(scheduler, None, 0, 1, torch.device("cpu"), 0)
    extra = {"extra": Blob(torch.ones(args.extra_mb << 18))} if args.extra_mb else {}
    variants = {
        "ftrain.state (get_*_state_dict)": {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)},
        "local.Local*State (own state_dict, no blobs)": {
            "model": LocalModelState(model),
            "optimizer": LocalOptimizerState(optimizer),
            "train": LocalProgressState(progress),
        },
    }
    print(f"checksum: {local.ALGORITHM}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ftrain-bench-") as directory:
        for name, states in variants.items():
            states = {"train": progress, **states, **extra}
            tier = LocalSnapshots(Path(directory) / name.split()[0], 0, 1, {"bench": 1})
            call, copy, whole = [], [], []
            for step in range(args.repeats + 2):
                started = time.perf_counter()
                tier.snapshot(step, states)
                returned = time.perf_counter()
                tier.wait()
                copied = time.perf_counter()
                tier._finish()
                done = time.perf_counter()
                if step >= 2:  # the first two allocate and map the slots
                    call.append(returned - started)
                    copy.append(copied - started)
                    whole.append(done - started)
            size = tier._plan.size if tier._plan else 0
            print(f"\n{name}: {size / 1e6:.1f} MB per snapshot")
            print(f"  snapshot() returns after        {median_us(call)}")
            print(f"  copy done (wait() returns) after {median_us(copy)}")
            print(f"  marker written after            {median_us(whole)}")
            started = time.perf_counter()
            tier._verified.clear()
            steps = tier.complete_steps()
            print(f"  complete_steps() (sums both)    {median_us([time.perf_counter() - started])}  -> {steps}")
            tier._verified.clear()
            started = time.perf_counter()  # what a resume does: cheap checks, then sum only the snapshot it uses
            assert tier.complete_steps(verify_data=False) == steps and tier.verify(steps[-1])
            print(f"  resume's check (sums the newest) {median_us([time.perf_counter() - started])}")
            started = time.perf_counter()
            tier.restore(steps[-1], states)
            print(f"  restore()                       {median_us([time.perf_counter() - started])}")
            for part, state in states.items():
                samples = []
                for _ in range(20):
                    started = time.perf_counter()
                    state.state_dict()
                    samples.append(time.perf_counter() - started)
                print(f"    of which {part}.state_dict()  {median_us(samples)}")
            tier.remove()
            tier.close()


if __name__ == "__main__":
    main()
