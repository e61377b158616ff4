"""Garbage collection at step boundaries (train.gc_interval)."""

import gc
import weakref

from ftrain.gc_policy import FULL_EVERY, StepGarbageCollector


def test_collects_only_at_interval_steps_and_fully_every_few_intervals():
    collected = []

    def record(phase, info):
        if phase == "start":
            collected.append(info["generation"])

    collector = StepGarbageCollector(3)
    gc.callbacks.append(record)
    try:
        assert not gc.isenabled()
        for step in range(1, 3 * FULL_EVERY + 1):
            collector.step(step)
    finally:
        gc.callbacks.remove(record)
        collector.close()
    assert gc.isenabled()
    assert collected == [1] * (FULL_EVERY - 1) + [2]


def test_start_frees_fresh_cycles_without_scanning_everything():
    """What the set-up just dropped is freed, not frozen; the old generation (imports) is not scanned at start."""

    class Node:
        pass

    started = []

    def record(phase, info):
        if phase == "start":
            started.append(info["generation"])

    node = Node()
    node.self = node
    dropped = weakref.ref(node)
    del node
    gc.callbacks.append(record)
    try:
        collector = StepGarbageCollector(3)
    finally:
        gc.callbacks.remove(record)
    collector.close()
    assert dropped() is None
    assert started == [1]


def test_zero_leaves_python_in_charge():
    collector = StepGarbageCollector(0)
    assert gc.isenabled()
    collector.step(50)
    collector.close()
    assert gc.isenabled()
