"""``ftrain.Checkpointer``: fault tolerance under your own model, optimizer, data and training loop.

    ckpt = ftrain.Checkpointer("runs/exp1", model=model, optimizer=optimizer, scheduler=scheduler,
                               dataloader=loader, interval=100)
    step = ckpt.load()                        # 0 = fresh start
    while step < max_steps:
        step += 1
        ...                                   # forward, backward, optimizer.step()
        if ckpt.maybe_save(step, last=step == max_steps):
            break                             # a preemption signal arrived: step is saved, exit now
    ckpt.close()                              # waits for the last commit

The recipe's ``Trainer`` runs on this same class.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from ftrain import faults, tags, warm
from ftrain.checkpoint import keys, layout
from ftrain.checkpoint.collectives import DistContext, max_over_ranks
from ftrain.checkpoint.compat import RunSignature, model_fingerprint
from ftrain.checkpoint.errors import CheckpointError
from ftrain.checkpoint.local import open_for_run
from ftrain.checkpoint.lock import RunLock
from ftrain.checkpoint.manager import CheckpointManager, SaveStats
from ftrain.checkpoint.options import AUTO, MODE_ASYNC_PROCESS, MODE_OFF, CheckpointOptions
from ftrain.checkpoint.options import merge_options, show_options_in_signature
from ftrain.checkpoint.path_limits import check_path_limits
from ftrain.checkpoint.run_dir import RunDirectory
from ftrain.checkpoint.run_dir import CHECKPOINTS_DIR, PREEMPTED_NAME, RUN_ID_NAME, TENSORBOARD_DIR  # noqa: F401 (kept importable from here)
from ftrain import health as health_words
from ftrain.health import HealthMonitor, HealthPolicy, UnhealthyError
from ftrain.interval import LocalSchedule, SaveSchedule
from ftrain.local_snapshots import LocalSnapshotting
from ftrain.model_weights import Exports, warm_start
from ftrain.preemption import EXIT_PREEMPTED, PreemptionFlag
from ftrain.state import OPTIMIZER_FRESH, TrainProgress
from ftrain.step_agreement import StepAgreement
from ftrain.step_timing import StepTimer
from ftrain.telemetry import Telemetry, show_ftrain_logs
from ftrain.user_objects import SavedStates, check_extra_names, give_loader_a_generator, has_persistent_buffers
from ftrain.user_objects import model_device, require_stateful_loader, skip_batches, state_bytes

logger = logging.getLogger("ftrain")

__all__ = ["Checkpointer", "EXIT_PREEMPTED"]


class Checkpointer:
    """Checkpoints a training run into ``{run_dir}/checkpoints`` (or ``checkpoint_dir``: another path, or
    ``s3://bucket/prefix``) and resumes it bit for bit.

    Args:
        run_dir: the run directory; ``LOCK``, ``checkpoints/`` (unless ``checkpoint_dir`` says otherwise) and
            (without ``writer``) ``tb/`` live under it.
        model: the ``nn.Module`` being trained: plain, DDP, or FSDP2 ``fully_shard``'ed.
        optimizer: its optimizer. The wait for a background save to finish copying the state happens by
            itself before the optimizer next steps (an optimizer step pre-hook), and before the next forward
            when the model has buffers, so there is no staging call to forget.
        scheduler: optional LR scheduler (anything with ``state_dict``/``load_state_dict``).
        dataloader: optional data loader whose position is saved per rank, e.g. torchdata's
            ``StatefulDataLoader``. Load before creating its iterator. A loader without ``generator=`` gets one:
            otherwise creating its iterator after a resume would draw on the restored global RNG.
        extra: more ``Stateful`` objects, saved and restored under their names.
        writer: a TensorBoard ``SummaryWriter`` for the ``checkpoint/*`` scalars; default: one of its own
            under ``{run_dir}/tb`` (see ``metrics``).
        seed: re-seeds the RNGs when resuming on another world size (default ``torch.initial_seed()``).
        model_signature: what identifies the model in the commit marker; a checkpoint of another model is
            refused. Default: a fingerprint of the names, shapes and dtypes of the model's state.
        run_name: recorded in the commit marker.
        dist_context: rank, device and checkpoint process group; default: found from ``torch.distributed``.
        health: what an unhealthy step is and what to do about it (``ftrain.health.HealthPolicy``); steps are
            judged from the ``loss``/``grad_norm`` given to ``maybe_save``.
        options: a ``ftrain.CheckpointOptions`` with every option below; keyword options given as well replace
            its fields.

    Options, as keywords or fields of ``options`` (the ``checkpoint.*`` keys of the recipe's config, with the same
    meaning and defaults; an impossible value is a one-line ``ValueError`` naming the key):

        [every field of CheckpointOptions: filled in from it when this module loads]

    Saved under these names: ``model``, ``optimizer``, ``train`` (step, scheduler, every rank's RNGs and data
    position) and the names of ``extra``. The commit marker records them (``state_keys``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        dataloader: Any = None,
        extra: Mapping[str, Stateful] | None = None,
        writer: Any = None,
        seed: int | None = None,
        model_signature: dict[str, Any] | None = None,
        run_name: str = "",
        dist_context: DistContext | None = None,
        health: HealthPolicy | None = None,
        options: CheckpointOptions | None = None,
        **option_values: Any,  # every field of CheckpointOptions by name: see the signature made below the class
    ) -> None:
        self.options = merge_options(options, option_values)
        self.run_dir = Path(run_dir)
        check_path_limits(self.run_dir, self.options.local_dir)  # one line, before any lock or directory
        self.model = model
        self.optimizer = optimizer
        self.dataloader = dataloader
        self.extra = dict(extra or {})
        check_extra_names(self.extra)
        self.ctx = dist_context or DistContext.current(model_device(model), self.options.timeout_s)
        if self.options.mode == MODE_ASYNC_PROCESS and self.ctx.process_group is None:
            raise ValueError(
                "checkpoint.mode=async_process needs torch.distributed initialized (DCP's writer process joins the "
                "job's process group): run under torchrun or call init_process_group first, or use mode='async'"
            )
        self._own_group = dist_context is None and self.ctx.process_group is not None  # made here: close() ends it
        self.step = 0
        self.preempted: str | None = None  # the signal that stopped the run, once maybe_save returned True
        self.health = health or HealthPolicy()
        self._monitor = HealthMonitor(self.health)
        self.healthy = True  # False after maybe_save judged a step unhealthy, until rollback()
        self.unhealthy_reason = ""
        self.rollbacks = 0
        self._health_record: dict[str, Any] = {"judged": False}
        self.schedule = SaveSchedule(self.options.interval, self.options.overhead_budget, self.options.max_interval_s)
        self.local_schedule = LocalSchedule(self.options.local_interval, self.options.overhead_budget)
        self._loaded = False
        self._closed = False
        self._run = RunDirectory(self.run_dir, self.ctx)
        self._telemetry = Telemetry(self.run_dir, self.ctx.is_main, self.options.overhead_budget, writer)
        require_stateful_loader(dataloader)
        show_ftrain_logs(self.ctx.is_main)
        give_loader_a_generator(dataloader)
        self.progress = TrainProgress(
            scheduler,
            dataloader,
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.device,
            torch.initial_seed() if seed is None else seed,
            health=self._monitor,  # its window of recent losses is saved with the progress
        )
        self._run.take_lock()  # before anything under run_dir is written
        try:
            signature = RunSignature(
                model_signature if model_signature is not None else model_fingerprint(model), run_name=run_name
            )
            storage = self._run.open_checkpoints(self.options.dir) if self.options.mode != MODE_OFF else self._run.checkpoints
            self.manager = CheckpointManager(storage, self.options, self.ctx, signature)
            states = [*keys.DEFAULT_STATE_KEYS.values(), *self.extra]
            self.local = open_for_run(self._run, self.options, self.ctx, signature, states) if self.manager.enabled else None
            self.preemption = PreemptionFlag(self.options.signals)  # last: nothing after it can fail
        except BaseException:
            self._run.release_lock()  # a constructor that fails leaves no lock behind
            raise
        self._states = SavedStates(model, optimizer, self.progress, self.extra)
        self._snapshotting = LocalSnapshotting(
            self.local, self.local_schedule, self.schedule, self._states, self.manager, self._run, self.ctx,
            self._telemetry,
        )
        self._exports = Exports(self.options, model, self.run_dir, self.manager)
        self._agreement = StepAgreement(self.preemption, self.manager, self._monitor, self.options.on_failure, self.ctx)
        self._timer = StepTimer(self.schedule, self.local_schedule, self.manager, self._telemetry)
        self._finished = False
        self._hooks = [optimizer.register_step_pre_hook(self._before_update)]
        if has_persistent_buffers(model):  # forward changes them (e.g. batch-norm statistics)
            self._hooks.append(model.register_forward_pre_hook(self._before_update))

    @classmethod
    def from_config(cls, cfg: CheckpointOptions, run_dir: str | Path, **kwargs: Any) -> "Checkpointer":
        """Build from the ``checkpoint`` config section (a ``CheckpointOptions``); ``kwargs`` as for the
        constructor (an option among them replaces the section's)."""
        return cls(run_dir, options=cfg, **kwargs)

    # ----------------------------------------------------------------------------------------------- public
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def metrics(self) -> Any:
        """The TensorBoard writer the checkpointer logs to (rank 0; a no-op elsewhere), after ``load()``:
        ``metrics.log({tag: value}, step)``. Log your own scalars through it to keep one events file per run;
        it is flushed before each commit, so a killed run's curve is whole up to its last checkpoint."""
        return self._telemetry.metrics

    @property
    def lock(self) -> RunLock | None:
        """The run directory's lock (rank 0, while open; None elsewhere)."""
        return self._run.lock

    def load(self) -> int:
        """Restore the latest usable checkpoint (per ``resume``) and return its step; 0 is a fresh start.

        Falls back past damaged checkpoints, refuses a checkpoint of another model in one line, restores every
        rank's RNGs and data position, removes what interrupted saves left, and sets newer checkpoints aside
        when resuming an older one. Collective: every rank calls it.
        """
        self._require_open("load")
        if self._loaded:
            raise CheckpointError("Checkpointer.load() was already called")
        self.manager.start_writer()  # async_process: the writer process starts while we load
        started = time.perf_counter()
        tier = "local" if self._snapshotting.resume(self.options.resume) else None
        result = None
        if tier is None:
            if self.manager.enabled or self.options.resume != AUTO:
                result = self.manager.load(self._states.for_marker, optional_prefixes=TrainProgress.OPTIONAL_PREFIXES)
                self._telemetry.warn_if_resharded(self.progress, self.ctx.world_size)
            self._snapshotting.start_timeline()  # after the load: a refused start changes nothing
            if result is not None:
                tier = "durable"
            elif self.options.initial_load:  # no checkpoint of its own: start from these weights
                warm_start(self.options, self.model, self.optimizer, self.ctx)
            self._snapshotting.drop_after(self.progress.step)  # later snapshots belong to a timeline left behind
        tier = tier or "fresh"
        self.step = self.progress.step
        load_s = result.load_s if result is not None else max_over_ranks([time.perf_counter() - started], self.ctx.device)[0]
        self._run.clear_preempted()  # this start holds the lock: an earlier preemption is no longer the last word
        if self.ctx.is_main and self.manager.enabled:
            for path in layout.remove_incomplete(self.manager.root):
                logger.info("removed incomplete checkpoint %s (left by an interrupted save)", path)
            for path in layout.set_aside_newer(self.manager.root, self.step):
                logger.warning("checkpoint newer than step %d moved aside to %s", self.step, path)
            self.manager.find_committed()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self._telemetry.open(self.step)
        if tier != "fresh":
            self.metrics.log({tags.CKPT_LOAD_S: load_s}, self.step)
        self._telemetry.start_status(self.step, load_s if tier != "fresh" else 0.0, tier)
        self.schedule.start(self.step)
        self.local_schedule.start(self.step)
        if self.schedule.auto and self.manager.enabled:
            self._telemetry.announce_interval("starts at", self.schedule, self.step)
        self._loaded = True
        self._timer.start()
        return self.step

    def maybe_save(
        self, step: int, *, last: bool = False, loss: float | None = None, grad_norm: float | None = None
    ) -> bool:
        """Call once after every optimizer step with the number of steps done. Saves every ``interval`` steps
        and at ``last``; returns True when a preemption signal arrived on any rank: ``step`` is then saved
        and committed, and the loop should stop (exit with ``ftrain.EXIT_PREEMPTED``). Collective.

        ``loss``/``grad_norm`` (optional) judge the step's health on every rank at once: an unhealthy step is
        never saved. Then ``healthy`` is False and, with ``on_unhealthy="rollback"``, the loop should call
        ``rollback()``; with ``"stop"`` this raises ``ftrain.health.UnhealthyError``.
        """
        self._require_loaded("maybe_save")
        self._advance_to(step)
        warm.trained_a_step()  # once, under warm restarts: the warm parent may rehearse now
        faults.pause_point(faults.STEP_DONE, step)
        self._timer.step_done(step, last)
        verdict = self._agreement.agree(loss, grad_norm)
        self._health_record = {"judged": loss is not None or grad_norm is not None, "loss": loss, "grad_norm": grad_norm}
        stop, unhealthy = verdict.stop, verdict.unhealthy
        self.healthy = not unhealthy
        keep = self.options.keep_every
        # a step that retention keeps forever is saved whatever the interval (auto's steps fall anywhere)
        save_due = bool(stop) or last or self.schedule.due(step) or bool(keep and step % keep == 0)
        snapshotted = False
        if unhealthy:
            self._on_unhealthy(step, verdict.reason)
            if self.health.on_unhealthy != health_words.IGNORE:
                return bool(stop)  # never save an unhealthy step
        else:
            self._monitor.record(loss)
            snapshotted = self._snapshotting.after_healthy_step(step, save_due)  # with a save, always (its staging)
        if last and not stop:
            self._finished = True
        if stop:
            self.preempted = self.preemption.requested or "a signal on another rank"
            logger.warning("stop requested (%s): saving step %d and exiting", self.preempted, step)
            self._save_then_mark(step, snapshotted)
            self.wait()
            self._run.mark_preempted(step, self.preempted)
            return True
        if save_due:
            self._save_then_mark(step, snapshotted)
        self._exports.after_step(step, last)
        return False

    def rollback(self) -> int:
        """Restore the newest healthy checkpoint in-process (every state, RNGs and data position included), skip
        the batches that led to the unhealthy step, and return the restored step. Collective.

        The loop must then continue from the returned step and create its data iterator anew.
        """
        self._require_loaded("rollback")
        failed_step = self.step
        self.rollbacks += 1
        if self.rollbacks > self.health.max_rollbacks:
            raise UnhealthyError(
                f"step {failed_step} unhealthy ({self.unhealthy_reason}) after {self.health.max_rollbacks} "
                f"rollback(s) (max_rollbacks): stopping"
            )
        self._log_save(self.manager.wait())  # a save in flight is of an earlier, healthy step: let it finish
        candidates = [d for d in reversed(layout.complete_steps(self.manager.root)) if d.step <= failed_step]
        if not self.manager.enabled or not candidates:
            raise UnhealthyError(f"step {failed_step} unhealthy ({self.unhealthy_reason}) and no checkpoint to roll back to")
        self.manager.load(self._states.for_marker, TrainProgress.OPTIONAL_PREFIXES, candidates=candidates)
        self.step = self.progress.step
        self._snapshotting.drop_after(self.step)  # newer snapshots hold the steps that went bad
        self.schedule.start(self.step)
        self.local_schedule.start(self.step)
        skipped = skip_batches(self.dataloader, self.progress, self.health.batches_to_skip(failed_step, self.step))
        if hasattr(self.metrics, "restart_from"):
            self.metrics.restart_from(self.step)  # the curve continues from the restored step
        self.metrics.log({tags.HEALTH_ROLLBACKS: float(self.rollbacks)}, self.step)
        (logger.warning if self.ctx.is_main else logger.debug)(
            "rollback: step %d was unhealthy (%s); restored step %d, skipped %d batch(es)",
            failed_step,
            self.unhealthy_reason,
            self.step,
            skipped,
        )
        self.healthy, self.unhealthy_reason = True, ""
        return self.step

    def save(self, step: int) -> None:
        """Start a checkpoint of ``step`` now (asynchronous in the async modes). Collective. A step that is
        already committed (or being saved) is refused: a committed checkpoint is never rewritten."""
        self._require_loaded("save")
        self._advance_to(step)
        self._save(step, from_snapshot=False, refuse_saved=True)

    def _already_saved(self, step: int) -> bool:
        """Whether ``step`` is committed or being saved (rank 0 decides for every rank, from what it found at
        ``load`` and committed since: no request to the store on the training thread). Collective."""
        mine = self.manager.in_flight(step) or (self.ctx.is_main and self.manager.is_committed(step))
        return bool(max_over_ranks([1.0 if mine else 0.0], self.ctx.device)[0])

    def _save_then_mark(self, step: int, snapshotted: bool) -> None:
        try:
            self._save(step, from_snapshot=snapshotted)
        finally:
            self._snapshotting.after_save(step, snapshotted)

    def _save(self, step: int, from_snapshot: bool, refuse_saved: bool = False) -> None:
        """``from_snapshot``: the local snapshot of ``step`` was just taken, with no change to the state since.
        A step already committed or being saved is never written again: ``refuse_saved`` raises, else it is
        skipped (e.g. the last step of a run whose final checkpoint exists already)."""
        if not self.manager.enabled:
            return
        self._states.check_extra()
        if self._already_saved(step):
            if refuse_saved:
                raise CheckpointError(
                    f"step {step} is already saved in {self.manager.storage.describe(layout.step_name(step))}: a committed "
                    "checkpoint is never rewritten"
                )
            if self.ctx.is_main:
                logger.info("step %d is already saved; not saving it again", step)
            return
        self.metrics.flush()  # the curve up to this step must be on disk before its checkpoint can commit
        self.schedule.saved(step)
        lent = self._snapshotting.lend(step) if from_snapshot else None
        # The marker records the health this step was committed with (its tensors are finite: the writer checks).
        health = {**self._health_record, "healthy": self.healthy, "finite_tensors": True}
        fields: dict[str, Any] = {"health": health}
        if not self.optimizer.state:  # it is saved as having no state (see ftrain.state.OptimizerState)
            fields[OPTIMIZER_FRESH] = True
        staging = state_bytes(self.model, self.optimizer) if self.manager.mode == MODE_ASYNC_PROCESS else 0
        self._log_save(
            self.manager.save(step, self._states.durable(), marker_fields=fields, prestaged=lent, staging_bytes=staging)
        )

    def wait(self) -> SaveStats | None:
        """Wait until the checkpoint in flight is committed; a failed save raises ``CheckpointError``."""
        self._require_open("wait")
        stats = self.manager.wait()
        self._log_save(stats)
        if self.metrics is not None:
            self.metrics.flush()
        if stats is not None and not stats.ok:
            raise CheckpointError(f"checkpoint of step {stats.step} failed: {stats.error or 'on another rank'}")
        return stats

    def close(self) -> None:
        """Wait for the last commit, then release the lock, the signal handlers and the hooks. Idempotent."""
        if self._closed:
            return
        try:
            export_failed = self._exports.finish()
            stats = self.manager.close()
            self._log_save(stats)
            if stats is not None and not stats.ok:
                raise CheckpointError(
                    f"final checkpoint of step {stats.step} failed: {stats.error or 'on another rank'}"
                )
            if export_failed:  # the promised artifact does not exist: as for a failed final save
                raise CheckpointError(f"safetensors export failed: {export_failed}")
            self._snapshotting.remove_if_redundant(self.step, self._finished, self.preempted)
        finally:
            self._shut()
            self._release_group()

    def _release_group(self) -> None:
        """Destroy the checkpoint process group this Checkpointer made (never one it was given), once nothing uses
        it: its gloo threads stop now, while the interpreter is whole, rather than at interpreter exit (where gloo
        threads still holding a collective's tensors can abort a finished process; pytorch/pytorch#179291)."""
        if not self._own_group:
            return
        self._own_group = False
        try:
            dist.destroy_process_group(self.ctx.process_group)
        except (KeyError, ValueError):
            pass  # gone already: the user destroyed every group (destroy_process_group()) before closing us

    def abort(self) -> None:
        """Release the lock, handlers and hooks without waiting for a save in flight (an error path)."""
        if not self._closed:
            self._shut()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---------------------------------------------------------------------------------------------- private
    def _on_unhealthy(self, step: int, problem: str) -> None:
        self.unhealthy_reason = problem
        if self.health.on_unhealthy == health_words.STOP:
            self._log_save(self.manager.wait())  # the newest healthy checkpoint finishes committing
            raise UnhealthyError(f"step {step} unhealthy: {problem} (train.on_unhealthy=stop)")
        if self.health.on_unhealthy == health_words.IGNORE and self.ctx.is_main:
            logger.warning("step %d unhealthy (%s); going on (on_unhealthy=ignore)", step, problem)

    def _before_update(self, *_: Any) -> None:
        # A background save may still be copying the state this optimizer step or forward is about to change.
        self.manager.wait_for_staging()
        self._snapshotting.wait()

    def _advance_to(self, step: int) -> None:
        if step < self.progress.step:
            raise ValueError(f"step {step} is behind the checkpointer's step {self.progress.step}; steps only grow")
        while self.progress.step < step:
            self.progress.advance()
        self.step = step

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise CheckpointError(
                f"Checkpointer.{what}() after close() or abort(): this checkpointer no longer holds the run "
                "directory; make a new one to go on"
            )

    def _require_loaded(self, what: str) -> None:
        self._require_open(what)
        if not self._loaded:
            raise CheckpointError(f"call Checkpointer.load() before {what}(): it restores the latest checkpoint")

    def _shut(self) -> None:
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.preemption.close()
        self._snapshotting.close()
        self._telemetry.close()
        self._run.release_lock()

    def _log_save(self, stats: SaveStats | None) -> None:
        """A save's scalars; with ``interval=auto``, its cost steers the interval (the ranks agree)."""
        if stats is None or self.metrics is None:
            return
        self._telemetry.log_save(stats, self.manager.failures)
        if self.schedule.auto and stats.ok:
            agreed = int(max_over_ranks([float(self.schedule.propose(stats.blocking_s))], self.ctx.device)[0])
            if self.schedule.set(agreed):
                self._telemetry.announce_interval("now", self.schedule, self.step)


show_options_in_signature(Checkpointer, "        [every field of CheckpointOptions: filled in from it when this module loads]")
