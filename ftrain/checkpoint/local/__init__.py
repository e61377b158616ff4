"""The local snapshot tier: each rank's latest training state in node-local memory (``/dev/shm``), so a failure
redoes a step, not an interval; lent to durable saves as their staging copy.

Import from here; the modules are the tier's parts:

    snapshots.py   LocalSnapshots: taking, checking, restoring and removing a rank's snapshots (start here)
    marker.py      a snapshot's marker: the typed record, its JSON, its validation; the slot file names
    plan.py        where each tensor goes in a slot, and the snapshot lent to a durable save
    memory.py      the slots' files, the room reserved for them, their shared mappings, page-locking
    skeleton.py    the non-tensor rest of the state, encoded and read back without running code
    reading.py     markers, checksums and state read back from a rank's directory
    adapters.py    model, optimizer and progress as the tier snapshots them
    agreement.py   the step every rank resumes from
    directory.py   claiming a rank's directory for one run; what may be deleted
    run_tier.py    the tier of one run: opened for its run directory, resumed from the newest common snapshot
"""

from ftrain.checkpoint.local.adapters import LocalModelState, LocalOptimizerState, LocalProgressState, direct
from ftrain.checkpoint.local.agreement import agree_on_step, common_step
from ftrain.checkpoint.local.directory import NotUsable, Owner, RankDir, default_directory
from ftrain.checkpoint.local.marker import CHUNK, FORMAT, FORMATS_READ, SnapshotMarker, TensorRecord
from ftrain.checkpoint.local.plan import LentSnapshot
from ftrain.checkpoint.local.run_tier import open_for_run, resume_newest
from ftrain.checkpoint.local.snapshots import ALGORITHM, LocalSnapshots

__all__ = [
    "ALGORITHM",
    "CHUNK",
    "FORMAT",
    "FORMATS_READ",
    "LentSnapshot",
    "LocalModelState",
    "LocalOptimizerState",
    "LocalProgressState",
    "LocalSnapshots",
    "NotUsable",
    "Owner",
    "RankDir",
    "SnapshotMarker",
    "TensorRecord",
    "agree_on_step",
    "common_step",
    "default_directory",
    "direct",
    "open_for_run",
    "resume_newest",
]
