"""The training loop: builds the run from its config, resumes, trains, checkpoints, and stops cleanly.

``Trainer.fit`` returns an exit code:
    0   finished: the final checkpoint is committed
    75  preempted (a configured signal arrived): a checkpoint of the current step is committed; run again to resume
and raises for the rest, which the command (``ftrain.cli``, also behind ``recipes/train.py``) turns into its other
exit codes: 65 stopped on an unhealthy step (``UnhealthyError``), 2 a refused resume (``ResumeRefused``), 130 Ctrl-C,
1 any other error.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from ftrain import health, tags, warm
from ftrain.checkpoint import layout
from ftrain.checkpoint.run_dir import CONFIG_NAME, SAMPLES_DIR, TENSORBOARD_DIR
from ftrain.checkpointer import Checkpointer
from ftrain.config import Config, DebugConfig, to_yaml
from ftrain.data import build_dataloader
from ftrain.distributed import close_distributed, init_distributed, max_over_ranks, sum_over_ranks
from ftrain.gc_policy import StepGarbageCollector
from ftrain.health import HealthPolicy
from ftrain.metrics import Progress
from ftrain.model import GPT, build_model, num_parameters
from ftrain.preemption import EXIT_PREEMPTED
from ftrain.state import seed_rank_rngs

logger = logging.getLogger("ftrain")

EXIT_OK = 0


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


class SampleRecorder:
    """Appends which sequences each step consumed, for checking exactly-once data across restarts.

    Lines are JSON: ``{"step", "rank", "attempt", "indices"}``; ``attempt`` is this process's start time, so
    steps redone after a resume can be told from the ones they replace (keep the latest attempt per step).
    """

    def __init__(self, run_dir: Path, rank: int, attempt: float) -> None:
        path = run_dir / SAMPLES_DIR / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")
        self.rank = rank
        self.attempt = attempt

    def write(self, step: int, indices: torch.Tensor) -> None:
        line = {"step": step, "rank": self.rank, "attempt": self.attempt, "indices": indices.tolist()}
        self.handle.write(json.dumps(line) + "\n")
        self.handle.flush()


class DebugFaults:
    """The ``debug.*`` test hooks: make rank 0's loss NaN or 100 times larger, or write a NaN into a parameter, at
    given steps, once per process. For seeing rollback and the commit rule at work; never on in a real run."""

    def __init__(self, debug: DebugConfig, is_main: bool) -> None:
        self.nan_at = set(debug.nan_at_steps) if is_main else set()
        self.poison_at = set(debug.poison_param_at_steps) if is_main else set()
        self.spike_at = set(debug.spike_at_steps) if is_main else set()

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if step in self.nan_at:
            self.nan_at.discard(step)
            logger.warning("debug.nan_at_steps: the loss of step %d is made NaN on rank 0", step)
            return loss * float("nan")
        if step in self.spike_at:
            self.spike_at.discard(step)
            logger.warning("debug.spike_at_steps: the loss of step %d is made 100 times larger on rank 0", step)
            return loss * 100
        return loss

    def after_update(self, model: torch.nn.Module, step: int) -> None:
        if step in self.poison_at:
            self.poison_at.discard(step)
            parameter = next(model.parameters())
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            with torch.no_grad():
                local.view(-1)[0] = float("nan")
            logger.warning("debug.poison_param_at_steps: a NaN was written into a parameter after step %d", step)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=cfg.train.weight_decay)


# A rehearsal holds the model, its gradients and AdamW's two moments (fp32: 16 bytes a parameter) once more, for a
# moment, beside the training process's own: only for models for which that is small.
REHEARSAL_MAX_BYTES = 1 << 30
REHEARSAL_BYTES_PER_PARAMETER = 16


def can_rehearse(cfg: Config) -> bool:
    """Whether a warm parent should rehearse this run's step (``rehearse_step``): CPU training only, decided without
    asking CUDA anything (a parent that initialises CUDA cannot fork usable children), and a model whose training
    state fits ``REHEARSAL_MAX_BYTES`` (counted on the meta device: nothing allocated)."""
    if not (cfg.train.device == "cpu" or (cfg.train.device == "auto" and torch.version.cuda is None)):
        return False
    with torch.device("meta"):
        parameters = num_parameters(GPT(cfg.model))
    return parameters * REHEARSAL_BYTES_PER_PARAMETER <= REHEARSAL_MAX_BYTES


def rehearse_step(cfg: Config) -> None:
    """In a warm parent (``ftrain.warm``): build this run's model and optimizer and take one training step, a
    state-dict read and the optimizer-state set-up of a restore, on a process group of torch's ``fake`` backend
    (no peer, no thread), then let it all go. What a process does the first time (FSDP2's set-up, DTensor's
    sharding decisions for each op and shape, first calls into the kernels) stays in the parent's memory, and the
    training processes forked from it after a failure skip it.

    The parent never touches CUDA, so this runs only for CPU training; the rest of what it runs in (one intra-op
    thread, nothing left behind): ``warm.rehearsal``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ftrain._torch_compat import init_optimizer_state

    with warm.rehearsal():
        model = build_model(cfg.model, torch.device("cpu"), cfg.train.seed)
        optimizer = build_optimizer(model, cfg)
        init_optimizer_state(optimizer)  # as a restore does (ftrain.checkpoint.local), before any step
        tokens = torch.zeros(cfg.train.batch_size, cfg.model.seq_len, dtype=torch.long)
        model(tokens, tokens).backward()
        if cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            getattr(norm, "full_tensor", lambda: norm)()  # as train_step reads the global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        get_state_dict(model, optimizer)


class Trainer:
    """The recipe: builds model, optimizer, schedule and data from the config and trains them under
    ``ftrain.Checkpointer``, the same public class a user puts under a loop of their own."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = init_distributed(cfg.train.device, cfg.train.timeout_s)
        self.run_dir = Path(cfg.run.dir)
        self.device = self.env.device
        self.started = time.perf_counter()
        self.last_loss: float | None = None

        # Build order: the model before the optimizer (its state refers to the parameters), the data loader
        # before the checkpointer that records its position. Nothing is written before the lock is taken.
        self.model = build_model(cfg.model, self.device, cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg)
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
            cfg.data,
            cfg.model.seq_len,
            cfg.train.batch_size,
            self.env.rank,
            self.env.world_size,
            cfg.train.seed,
            vocab_size=cfg.model.vocab_size,
        )
        seed_rank_rngs(cfg.train.seed, self.env.rank, step=0)
        self.checkpointer = Checkpointer.from_config(
            cfg.checkpoint,
            self.run_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dataloader=self.dataloader,
            seed=cfg.train.seed,
            model_signature=vars(cfg.model),
            run_name=cfg.run.name,
            dist_context=self.env.context(),
            health=HealthPolicy(
                on_unhealthy=cfg.train.on_unhealthy,
                spike_factor=cfg.train.spike_factor,
                max_rollbacks=cfg.train.max_rollbacks,
                rollback_skip_batches=cfg.train.rollback_skip_batches,
            ),
        )
        self._faults = DebugFaults(cfg.debug, self.env.is_main)
        try:
            self.checkpointer.load()
            self._write_config()  # after the load: a refused start (another model, no such step) writes nothing
        except BaseException:
            self.checkpointer.abort()
            raise
        self.metrics = self.checkpointer.metrics
        self._warn_if_schedule_changed()
        logger.info(
            "model %.2fM parameters, %d rank(s) on %s, checkpoint.mode=%s",
            num_parameters(self.model) / 1e6,
            self.env.world_size,
            self.device,
            cfg.checkpoint.mode,
        )

    @property
    def step(self) -> int:
        return self.checkpointer.step

    def _write_config(self) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_NAME).write_text(to_yaml(self.cfg))

    def _warn_if_schedule_changed(self) -> None:
        """A resume whose schedule keys (train.max_steps, lr, warmup...) differ from the checkpoint's moves the
        LR at once; say so with the numbers rather than let the curve jump silently."""
        if not self.step or not self.env.is_main:
            return
        saved = self.scheduler.get_last_lr()[0]
        now = [factor(self.step) * base for factor, base in zip(self.scheduler.lr_lambdas, self.scheduler.base_lrs)][0]
        if not math.isclose(saved, now, rel_tol=1e-6, abs_tol=0.0):
            logger.warning(
                "the LR schedule differs from the checkpoint's (train.max_steps, lr, warmup_steps or "
                "min_lr_ratio changed): LR at step %d goes from %.3e to %.3e",
                self.step,
                saved,
                now,
            )

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> int:
        cfg = self.cfg
        if self.step >= cfg.train.max_steps:
            logger.info("nothing to do: step %d >= train.max_steps %d", self.step, cfg.train.max_steps)
            self.checkpointer.close()  # the writer process may be starting (async_process): let it finish, tidy up
            return EXIT_OK
        collector = StepGarbageCollector(cfg.train.gc_interval)
        try:
            return self._loop(collector)
        finally:
            collector.close()

    def _loop(self, collector: StepGarbageCollector) -> int:
        cfg = self.cfg
        ckpt = self.checkpointer
        progress = Progress(self.step, cfg.train.max_steps, cfg.log.interval)
        tokens_per_step = cfg.train.batch_size * cfg.model.seq_len * self.env.world_size
        batches = iter(self.dataloader)
        record = None
        if cfg.data.record_samples:  # one attempt id for all ranks of this launch
            record = SampleRecorder(self.run_dir, self.env.rank, max_over_ranks([time.time()], self.device)[0])
        step = self.step
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            indices, inputs, targets = next(batches)
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm = self.train_step(inputs.to(self.device), targets.to(self.device), step + 1)
            step += 1
            if record:
                record.write(step, indices)
            mean_loss = sum_over_ranks([loss.item()], self.device)[0] / self.env.world_size
            step_time = time.perf_counter() - started
            self.last_loss = mean_loss
            self.metrics.log(
                {
                    tags.LOSS: mean_loss,
                    tags.LR: lr,
                    tags.STEP_TIME_S: step_time,
                    tags.TOKENS_PER_S: tokens_per_step / step_time,
                },
                step,
            )
            progress.maybe_print(step, mean_loss, lr, tokens_per_step / step_time)
            if ckpt.maybe_save(step, last=step == cfg.train.max_steps, loss=mean_loss, grad_norm=grad_norm):
                ckpt.close()
                return EXIT_PREEMPTED if step < cfg.train.max_steps else EXIT_OK
            if not ckpt.healthy and cfg.train.on_unhealthy == health.ROLLBACK:
                step = ckpt.rollback()
                batches = iter(self.dataloader)  # the loader continues after the skipped batches
                progress = Progress(step, cfg.train.max_steps, cfg.log.interval)
                continue
            collector.step(step)
        ckpt.close()
        return EXIT_OK

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, float | None]:
        """One optimizer step (the ``step``-th); returns the loss and the global gradient norm (None without
        clipping)."""
        self.model.train()
        loss = self._faults.loss(self.model(inputs, targets), step)
        loss.backward()
        grad_norm = None
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        # No staging wait here: the checkpointer's optimizer hook makes it before the parameters change.
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._faults.after_update(self.model, step)
        return loss.detach(), grad_norm

    def summary(self) -> str:
        """What a finished or preempted run prints last."""
        latest = layout.latest_complete(self.checkpointer.manager.root)
        loss = self.last_loss
        return (
            f"done: step {self.step}/{self.cfg.train.max_steps} in {time.perf_counter() - self.started:.1f} s"
            + (f", final loss {loss:.4f}" if loss is not None else "")
            + f"; last checkpoint {latest.dir if latest else 'none'}"
            + f"; curves: tensorboard --logdir {self.run_dir / TENSORBOARD_DIR}"
        )

    def close(self) -> None:
        """Release everything after ``fit`` returned (its last save is already committed)."""
        self.checkpointer.close()
        if self.env.is_main:
            logger.info(self.summary())
        close_distributed()

    def abort(self) -> None:
        """On an error path: release the lock and handlers without waiting for a save in flight."""
        if hasattr(self, "checkpointer"):
            self.checkpointer.abort()
