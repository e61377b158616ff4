"""The training loop: builds the run from its config, resumes, trains, checkpoints, and stops cleanly.

Exit codes (``Trainer.fit`` returns them; ``recipes/train.py`` exits with them):
    0   finished: the final checkpoint is committed
    75  preempted (a configured signal arrived): a checkpoint of the current step is committed; run again to resume
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from ftrain import __version__
from ftrain.checkpoint import CheckpointError, CheckpointManager, SaveStats
from ftrain.checkpoint import layout
from ftrain.checkpoint.lock import LockedError, RunLock
from ftrain.config import Config, to_yaml
from ftrain.data import build_dataloader
from ftrain.distributed import all_reduce_max, all_reduce_sum, close_distributed, init_distributed
from ftrain.gc_policy import StepGarbageCollector
from ftrain.metrics import Metrics, Progress, setup_logging
from ftrain.model import build_model, num_parameters
from ftrain.state import ModelOptimizerState, TrainProgress, seed_rank_rngs

logger = logging.getLogger("ftrain")

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died, stalled past the timeout, or closed its connection."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo/transport", "Connection reset", "Connection closed", "Timed out waiting", "NCCL")
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step with index ``step`` (0-based)."""
    # 1) linear warmup
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # 2) cosine decay from 1 to min_ratio over the remaining steps
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PreemptionFlag:
    """Signal handlers that only note the request; the loop acts on it at the next step boundary."""

    def __init__(self, signal_names: list[str]) -> None:
        self.requested: str | None = None
        self._owner = os.getpid()
        for name in signal_names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._owner:  # a forked data worker: behave as if we were never installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name


class SampleRecorder:
    """Appends which sequences each step consumed, for checking exactly-once data across restarts.

    Lines are JSON: ``{"step", "rank", "attempt", "indices"}``; ``attempt`` is this process's start time, so
    steps redone after a resume can be told from the ones they replace (keep the latest attempt per step).
    """

    def __init__(self, run_dir: Path, rank: int, attempt: float) -> None:
        path = run_dir / "samples" / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")
        self.rank = rank
        self.attempt = attempt

    def write(self, step: int, indices: torch.Tensor) -> None:
        line = {"step": step, "rank": self.rank, "attempt": self.attempt, "indices": indices.tolist()}
        self.handle.write(json.dumps(line) + "\n")
        self.handle.flush()


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = init_distributed(cfg.train.device, cfg.train.timeout_s)
        setup_logging(self.env.rank)
        self.run_dir = Path(cfg.run.dir)
        self.device = self.env.device
        self.lock = self._take_lock()
        self._write_config()

        # Build order: the model before the optimizer (its state refers to the parameters), the data loader
        # before the progress state that records its position.
        self.model = build_model(cfg.model, self.device, cfg.train.seed)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=cfg.train.weight_decay
        )
        self.scheduler = LambdaLR(
            self.optimizer,
            partial(
                lr_factor,
                warmup_steps=cfg.train.warmup_steps,
                max_steps=cfg.train.max_steps,
                min_ratio=cfg.train.min_lr_ratio,
            ),
        )
        self.dataloader = build_dataloader(
            cfg.data, cfg.model.seq_len, cfg.train.batch_size, self.env.rank, self.env.world_size, cfg.train.seed
        )
        self.progress = TrainProgress(
            self.scheduler, self.dataloader, self.env.rank, self.env.world_size, self.device, cfg.train.seed
        )
        self.states = {"app": ModelOptimizerState(self.model, self.optimizer), "train": self.progress}
        seed_rank_rngs(cfg.train.seed, self.env.rank, step=0)

        self.checkpointer = CheckpointManager(
            self.run_dir / "checkpoints",
            mode=cfg.checkpoint.mode,
            keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            process_group=self.env.checkpoint_group,
            marker_info={"model": vars(cfg.model), "ftrain_version": __version__, "run_name": cfg.run.name},
            timeout_s=cfg.checkpoint.timeout_s,
            allow_world_size_change=cfg.checkpoint.on_world_size_change == "reshard",
            verify_checksums=cfg.checkpoint.verify == "checksums",
            write_threads=cfg.checkpoint.write_threads,
        )
        self.checkpointer.start_writer()  # async_process: the writer process starts while we resume
        self.preemption = PreemptionFlag(cfg.checkpoint.signals)
        load_s = self._resume()
        self.metrics = Metrics(self.run_dir / "tb", self.env.is_main, self.step)
        if load_s is not None:
            self.metrics.log({"checkpoint/load_s": load_s}, self.step)
        logger.info(
            "model %.2fM parameters, %d rank(s) on %s, checkpoint.mode=%s",
            num_parameters(self.model) / 1e6,
            self.env.world_size,
            self.device,
            cfg.checkpoint.mode,
        )

    @property
    def step(self) -> int:
        return self.progress.step

    def _take_lock(self) -> RunLock | None:
        """Rank 0 takes the run directory's lock; every rank learns whether it succeeded."""
        lock, problem = None, ""
        if self.env.is_main:
            lock = RunLock(self.run_dir)
            try:
                lock.acquire()
            except LockedError as exc:
                problem = str(exc)
        if all_reduce_max([1.0 if problem else 0.0], self.device)[0]:
            raise LockedError(problem or "the run directory is in use by another job (see rank 0)")
        return lock

    def _write_config(self) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def _resume(self) -> float | None:
        """Load the latest usable checkpoint (per ``checkpoint.resume``); tidy the directory before any save."""
        root = self.checkpointer.root
        result = None
        if self.checkpointer.enabled or self.cfg.checkpoint.resume != "auto":
            result = self.checkpointer.load(
                {**self.states, "train": self.progress.for_loading()},
                self.cfg.checkpoint.resume,
                optional_prefixes=TrainProgress.OPTIONAL_PREFIXES,
            )
            if self.progress.resharded_from is not None and self.env.is_main:
                logger.warning(
                    "resharded from %d to %d ranks: data continues at epoch %d, sequence %d of its order; "
                    "RNGs re-seeded, so this run is not bit-identical to one on %d ranks",
                    self.progress.resharded_from,
                    self.env.world_size,
                    self.progress.data_position["epoch"],
                    self.progress.data_position["cursor"],
                    self.progress.resharded_from,
                )
        if self.env.is_main and self.checkpointer.enabled:
            for path in layout.remove_incomplete(root):
                logger.info("removed incomplete checkpoint %s (left by an interrupted save)", path)
            for path in layout.set_aside_newer(root, self.step):
                logger.warning("checkpoint newer than step %d moved aside to %s", self.step, path)
        dist.barrier()
        return result.load_s if result else None

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> int:
        cfg = self.cfg
        if self.step >= cfg.train.max_steps:
            logger.info("nothing to do: step %d >= train.max_steps %d", self.step, cfg.train.max_steps)
            self.finish_saving()  # the writer process may be starting (async_process): let it finish, tidy up
            return EXIT_OK
        collector = StepGarbageCollector(cfg.train.gc_interval)
        try:
            return self._loop(collector)
        finally:
            collector.close()

    def _loop(self, collector: StepGarbageCollector) -> int:
        cfg = self.cfg
        progress = Progress(self.step, cfg.train.max_steps, cfg.log.interval)
        tokens_per_step = cfg.train.batch_size * cfg.model.seq_len * self.env.world_size
        batches = iter(self.dataloader)
        record = None
        if cfg.data.record_samples:  # one attempt id for all ranks of this launch
            record = SampleRecorder(self.run_dir, self.env.rank, all_reduce_max([time.time()], self.device)[0])
        while self.step < cfg.train.max_steps:
            started = time.perf_counter()
            indices, inputs, targets = next(batches)
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(inputs.to(self.device), targets.to(self.device))
            self.progress.advance()
            if record:
                record.write(self.step, indices)

            # One collective per step: the mean loss, and whether any rank was asked to stop or saw a save fail.
            loss_sum, stop, failed = all_reduce_sum(
                [loss.item(), float(self.preemption.requested is not None), float(self.checkpointer.failed_pending())],
                self.device,
            )
            step_time = time.perf_counter() - started
            mean_loss = loss_sum / self.env.world_size
            self.metrics.log(
                {
                    "train/loss": mean_loss,
                    "train/lr": lr,
                    "train/step_time_s": step_time,
                    "train/tokens_per_s": tokens_per_step / step_time,
                },
                self.step,
            )
            progress.maybe_print(self.step, mean_loss, lr, tokens_per_step / step_time)
            if failed and cfg.checkpoint.on_failure == "abort":
                raise CheckpointError(
                    f"stopping because checkpoint.on_failure=abort and a background save failed: "
                    f"{self.checkpointer.last_error or 'on another rank'}"
                )
            if stop:
                logger.warning("stop requested (%s): saving step %d and exiting", self.preemption.requested, self.step)
                self.save()
                self.finish_saving()
                return EXIT_PREEMPTED if self.step < cfg.train.max_steps else EXIT_OK
            if self.step % cfg.checkpoint.interval == 0 or self.step == cfg.train.max_steps:
                self.save()
            collector.step(self.step)
        self.finish_saving()
        return EXIT_OK

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.model.train()
        loss = self.model(inputs, targets)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        # The optimizer is the first thing to change the state a background save may still be copying.
        self.checkpointer.wait_for_staging()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach()

    # ------------------------------------------------------------------------------------ checkpointing
    def save(self) -> None:
        if not self.checkpointer.enabled:
            return
        self.metrics.flush()  # the curve up to this step must be on disk before its checkpoint can commit
        self._log_save(self.checkpointer.save(self.step, self.states))

    def finish_saving(self) -> None:
        """Wait until the last checkpoint is committed; a failed final save is an error."""
        stats = self.checkpointer.close()
        self._log_save(stats)
        self.metrics.flush()
        if stats is not None and not stats.ok:
            raise CheckpointError(f"final checkpoint of step {stats.step} failed: {stats.error or 'on another rank'}")

    def _log_save(self, stats: SaveStats | None) -> None:
        if stats is None:
            return
        scalars = {
            "checkpoint/blocking_s": stats.blocking_s,
            "checkpoint/staging_s": stats.staging_s,
            "checkpoint/failures": float(self.checkpointer.failures),
        }
        if stats.ok:
            scalars.update(
                {
                    "checkpoint/save_s": stats.save_s,
                    "checkpoint/write_s": stats.write_s,
                    "checkpoint/size_bytes": float(stats.size_bytes),
                    "checkpoint/write_GBps": stats.write_gbps,
                }
            )
        self.metrics.log(scalars, stats.step)

    def close(self) -> None:
        """Release everything after ``fit`` returned (its last save is already committed)."""
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
        close_distributed()
