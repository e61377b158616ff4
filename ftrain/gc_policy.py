"""Python's garbage collector on the training loop's schedule instead of the allocator's.

A checkpoint makes DCP allocate thousands of small objects (plans, write items, metadata), and each 700 of them
start a collection, in whichever thread is allocating and holding the GIL meanwhile: one checkpoint sets off more
collections than a whole run without checkpoints (docs/bench.md has the counts). With ``train.gc_interval`` > 0
(torchtitan does the same with its ``gc_freq``) automatic collection is off and the loop collects at step
boundaries instead: the young generations every ``interval`` steps, everything every ``FULL_EVERY`` intervals, so
no cycle lives longer than that. What exists when training starts (modules, imported code) is frozen out of every
later scan.

Only the young generations are collected before the freeze. A full collection at that point scans every object the
imports made (torch, DCP and FSDP2 make hundreds of thousands), which every (re)start would pay while it finds
nothing to free; the young generations hold what the set-up just dropped, and collecting them is cheap.
"""

from __future__ import annotations

import gc

FULL_EVERY = 10  # intervals between full collections


class StepGarbageCollector:
    """``interval`` = 0 leaves Python's automatic collection as it is."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        if interval > 0:
            gc.collect(1)  # not 2: see the module docstring
            gc.freeze()
            gc.disable()

    def step(self, step: int) -> None:
        """Call once per finished optimizer step."""
        if self.interval > 0 and step % self.interval == 0:
            gc.collect(2 if step % (self.interval * FULL_EVERY) == 0 else 1)

    def close(self) -> None:
        if self.interval > 0:
            gc.enable()
            gc.unfreeze()


def enable_in_worker(_worker_id: int) -> None:
    """``worker_init_fn`` for data-loader workers: a worker forked while collection was off gets it back."""
    gc.enable()
