"""TensorBoard tag names: the one home of every scalar ftrain logs.

The trainer, ``ftrain.Checkpointer``, the overhead report, the benchmark and the chaos tool all import these
names; none of them spells a tag as a string of its own.
"""

from __future__ import annotations

# train/*: one value per optimizer step
LOSS = "train/loss"
LR = "train/lr"
STEP_TIME_S = "train/step_time_s"  # every ftrain run logs it at every step: it marks a run's events
TOKENS_PER_S = "train/tokens_per_s"

# checkpoint/*: one value per checkpoint (maximum over ranks), logged at the step it saved
CKPT_BLOCKING_S = "checkpoint/blocking_s"  # the training loop stopped for this checkpoint
CKPT_STAGING_S = "checkpoint/staging_s"  # from dispatch until the state was copied off the live tensors
CKPT_SAVE_S = "checkpoint/save_s"  # from the save call until the commit marker was written
CKPT_WRITE_S = "checkpoint/write_s"  # from staging done until every rank's files were durable
CKPT_SIZE_BYTES = "checkpoint/size_bytes"
CKPT_WRITE_GBPS = "checkpoint/write_GBps"
CKPT_FAILURES = "checkpoint/failures"  # failed saves so far in this process
CKPT_LOAD_S = "checkpoint/load_s"  # logged once, at the step a run resumed from

CHECKPOINT_TAGS = (
    CKPT_BLOCKING_S,
    CKPT_STAGING_S,
    CKPT_SAVE_S,
    CKPT_WRITE_S,
    CKPT_SIZE_BYTES,
    CKPT_WRITE_GBPS,
    CKPT_FAILURES,
)

# recovery/*: logged once per resume, at the first step the resumed attempt finished
RECOVERY_TIME_LOST_S = "recovery/time_lost_s"  # from the last step before the failure to the first step after it
RECOVERY_STEPS_REDONE = "recovery/steps_redone"  # steps finished before the failure that are trained again
RECOVERY_STARTUP_S = "recovery/startup_s"  # from process start until ready to train (state loaded)
RECOVERY_LOAD_S = "recovery/load_s"  # choosing, verifying and loading the checkpoint

# health/*
HEALTH_ROLLBACKS = "health/rollbacks"  # rollbacks so far, logged at the step each one restored
CKPT_INTERVAL = "checkpoint/interval"  # checkpoint.interval=auto: the interval in steps, logged when it changes
# checkpoint.local_interval=auto, logged at each re-evaluation (every LocalSchedule.REVIEW_EVERY steps):
LOCAL_INTERVAL = "checkpoint/local_interval"  # the snapshot interval in steps the ranks agreed on
LOCAL_SNAPSHOT_S = "checkpoint/local_snapshot_s"  # rank 0's median cost of its recent snapshots
