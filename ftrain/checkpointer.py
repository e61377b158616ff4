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

import dataclasses
import inspect
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from ftrain import faults, processes, tags
from ftrain.checkpoint import keys, layout, safe_types
from ftrain.checkpoint.collectives import DistContext, max_over_ranks, sum_over_ranks
from ftrain.checkpoint.compat import RunSignature, model_fingerprint
from ftrain.checkpoint.errors import CheckpointError, describe_error
from ftrain.checkpoint.local import (
    LocalModelState,
    LocalOptimizerState,
    LocalProgressState,
    LocalSnapshots,
    Owner,
    agree_on_step,
    default_directory,
)
from ftrain.checkpoint.lock import LockedError, RunLock
from ftrain.checkpoint.manager import CheckpointManager, SaveStats
from ftrain.checkpoint.options import (
    AUTO,
    EXPORT_NONE,
    LOCAL_OFF,
    MODE_ASYNC_PROCESS,
    ON_FAILURE_ABORT,
    CheckpointOptions,
    describe_options,
    option_names,
    option_parameters,
)
from ftrain.checkpoint.path_limits import check_path_limits
from ftrain import health as health_words
from ftrain.health import HealthMonitor, HealthPolicy, UnhealthyError
from ftrain.interval import LocalSchedule, SaveSchedule
from ftrain.preemption import EXIT_PREEMPTED, PreemptionFlag
from ftrain.run_status import RunStatus, StatusWriter, read_status
from ftrain.state import OPTIMIZER_FRESH, ModelOptimizerState, ModelState, OptimizerState, TrainProgress

logger = logging.getLogger("ftrain")

CHECKPOINTS_DIR = "checkpoints"  # under the run directory
TENSORBOARD_DIR = "tb"  # under the run directory, when the checkpointer opens its own writer
RUN_ID_NAME = layout.RUN_ID_NAME  # under the run directory: a random id made at its first use
PREEMPTED_NAME = "PREEMPTED"  # under the run directory: {"step", "signal", "time"} after a preemption save
_RESERVED_NAMES = ("app", *keys.DEFAULT_STATE_KEYS.values())

__all__ = ["Checkpointer", "EXIT_PREEMPTED"]


class Checkpointer:
    """Checkpoints a training run into ``{run_dir}/checkpoints`` and resumes it bit for bit.

    Args:
        run_dir: the run directory; ``checkpoints/``, ``LOCK`` and (without ``writer``) ``tb/`` live under it.
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
        self.options = _checkpoint_options(options, option_values)
        self.run_dir = Path(run_dir)
        check_path_limits(self.run_dir, self.options.local_dir)  # one line, before any lock or directory
        self.model = model
        self.optimizer = optimizer
        self.dataloader = dataloader
        self.extra = dict(extra or {})
        for name in self.extra:
            if name in _RESERVED_NAMES or not name or "." in name:
                raise ValueError(f"extra state name {name!r} is reserved or not a plain name (no '.')")
        self.ctx = dist_context or DistContext.current(_model_device(model), self.options.timeout_s)
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
        self._last_call: float | None = None
        self._loaded = False
        self._closed = False
        self._writer = writer
        self._metrics: Any = None
        self._status = StatusWriter(self.run_dir, False, _blank_status())
        self._recovery: dict[str, float] | None = None
        _require_stateful_loader(dataloader)
        _show_ftrain_logs(self.ctx.is_main)
        _give_loader_a_generator(dataloader)
        self.progress = TrainProgress(
            scheduler,
            dataloader,
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.device,
            torch.initial_seed() if seed is None else seed,
            health=self._monitor,  # its window of recent losses is saved with the progress
        )
        self.lock = self._take_lock()  # before anything under run_dir is written
        try:
            signature = RunSignature(
                model_signature if model_signature is not None else model_fingerprint(model), run_name=run_name
            )
            self.manager = CheckpointManager(self.run_dir / CHECKPOINTS_DIR, self.options, self.ctx, signature)
            self.local = self._open_local_tier(signature)
            self.preemption = PreemptionFlag(self.options.signals)  # last: nothing after it can fail
        except BaseException:
            self._release_lock()  # a constructor that fails leaves no lock behind
            raise
        self._local_states = {
            keys.DEFAULT_STATE_KEYS[keys.MODEL]: LocalModelState(model),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: LocalOptimizerState(optimizer),
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: LocalProgressState(self.progress),
            **self.extra,
        }
        self._finished = False
        self._extra_checked = False
        self._snapshot_call_s = 0.0
        self._export: Any = None  # the safetensors export in flight
        self._hooks = [optimizer.register_step_pre_hook(self._before_update)]
        if _has_persistent_buffers(model):  # forward changes them (e.g. batch-norm statistics)
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
        return self._metrics

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
        tier = self._load_local()
        result = None
        if tier is None:
            if self.manager.enabled or self.options.resume != AUTO:
                result = self.manager.load(self._states_for_marker, optional_prefixes=TrainProgress.OPTIONAL_PREFIXES)
                self._warn_if_resharded()
            self._start_timeline()  # after the load: a refused start changes nothing
            if result is not None:
                tier = "durable"
            elif self.options.initial_load:  # no checkpoint of its own: start from these weights
                self._warm_start()
            if self.local is not None:
                self.local.drop_after(self.progress.step)  # later snapshots belong to a timeline left behind
        tier = tier or "fresh"
        self.step = self.progress.step
        load_s = result.load_s if result is not None else max_over_ranks([time.perf_counter() - started], self.ctx.device)[0]
        if self.ctx.is_main:  # this start holds the lock: an earlier preemption is no longer the run's last word
            (self.run_dir / PREEMPTED_NAME).unlink(missing_ok=True)
        if self.ctx.is_main and self.manager.enabled:
            for path in layout.remove_incomplete(self.manager.root):
                logger.info("removed incomplete checkpoint %s (left by an interrupted save)", path)
            for path in layout.set_aside_newer(self.manager.root, self.step):
                logger.warning("checkpoint newer than step %d moved aside to %s", self.step, path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self._metrics = self._open_metrics()
        if tier != "fresh":
            self._metrics.log({tags.CKPT_LOAD_S: load_s}, self.step)
        self._start_status(load_s if tier != "fresh" else 0.0, tier)
        self.schedule.start(self.step)
        self.local_schedule.start(self.step)
        if self.schedule.auto and self.manager.enabled:
            self._announce_interval("starts at")
        self._loaded = True
        self._loaded_at = time.perf_counter()
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
        now = time.perf_counter()
        if not self._metrics.logged(tags.STEP_TIME_S, step):  # the loop did not log it: ftrain-report needs it
            self._metrics.log({tags.STEP_TIME_S: now - (self._last_call or self._loaded_at)}, step)
        if self._last_call is not None:
            # a background write that ran during any part of this step slowed it, even if it has finished since
            self.schedule.observe_step(now - self._last_call, save_in_flight=self.manager.busy_since(self._last_call))
            self.local_schedule.observe_step(now - self._last_call)
        self._last_call = now
        self._status.step(step, finished=last)
        if self._recovery is not None:
            self._log_recovery()
        problem = self._monitor.judge(loss, grad_norm)
        poisoned = self.manager.nonfinite_pending()
        if poisoned and not problem:
            problem = f"a saved tensor held NaN or Inf ({self.manager.last_error})"
        self._health_record = {"judged": loss is not None or grad_norm is not None, "loss": loss, "grad_norm": grad_norm}
        stop, failed, unhealthy = sum_over_ranks(
            [
                float(self.preemption.requested is not None),
                float(self.manager.failed_pending() and not poisoned),
                float(bool(problem)),
            ],
            self.ctx.device,
        )
        if failed and self.options.on_failure == ON_FAILURE_ABORT:
            raise CheckpointError(
                f"stopping because checkpoint.on_failure=abort and a background save failed: "
                f"{self.manager.last_error or 'on another rank'}"
            )
        self.healthy = not unhealthy
        keep = self.options.keep_every
        # a step that retention keeps forever is saved whatever the interval (auto's steps fall anywhere)
        save_due = bool(stop) or last or self.schedule.due(step) or bool(keep and step % keep == 0)
        snapshotted = False
        if unhealthy:
            self._on_unhealthy(step, problem or "on another rank")
            if self.health.on_unhealthy != health_words.IGNORE:
                return bool(stop)  # never save an unhealthy step
        else:
            self._monitor.record(loss)
            # A durable save always comes with a snapshot of its step: the save writes from the snapshot's copy,
            # so the step costs one copy, not two.
            if self.local is not None and (self.local_schedule.due(step) or save_due):
                snapshotted = self._snapshot(step)
            if self.local is not None and self.local_schedule.review_due(step):
                self._review_local_interval()
        if last and not stop:
            self._finished = True
        if stop:
            self.preempted = self.preemption.requested or "a signal on another rank"
            logger.warning("stop requested (%s): saving step %d and exiting", self.preempted, step)
            self._save(step, from_snapshot=snapshotted)
            self.wait()
            self._mark_preempted(step)
            return True
        if save_due:
            self._save(step, from_snapshot=snapshotted)
        if self.options.export != EXPORT_NONE and (last or (self.options.keep_every and step % self.options.keep_every == 0)):
            self._export_weights(step)
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
        self.manager.load(self._states_for_marker, TrainProgress.OPTIONAL_PREFIXES, candidates=candidates)
        self.step = self.progress.step
        if self.local is not None:
            self.local.drop_after(self.step)  # newer snapshots hold the steps that went bad
        self.schedule.start(self.step)
        self.local_schedule.start(self.step)
        skipped = self._skip_batches(self.health.batches_to_skip(failed_step, self.step))
        if hasattr(self._metrics, "restart_from"):
            self._metrics.restart_from(self.step)  # the curve continues from the restored step
        self._metrics.log({tags.HEALTH_ROLLBACKS: float(self.rollbacks)}, self.step)
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
        if self.manager.enabled and self._already_saved(step):
            raise CheckpointError(
                f"step {step} is already saved in {layout.step_dir(self.manager.root, step)}: a committed "
                "checkpoint is never rewritten"
            )
        self._save(step, from_snapshot=False)

    def _already_saved(self, step: int) -> bool:
        """Whether ``step`` is committed or being saved (rank 0 decides for every rank). Collective."""
        mine = self.manager.in_flight(step) or (
            self.ctx.is_main and (layout.step_dir(self.manager.root, step) / layout.MARKER).exists()
        )
        return bool(max_over_ranks([1.0 if mine else 0.0], self.ctx.device)[0])

    def _save(self, step: int, from_snapshot: bool) -> None:
        """``from_snapshot``: the local snapshot of ``step`` was just taken, with no change to the state since."""
        if not self.manager.enabled:
            return
        self._check_extra_state()
        if self._already_saved(step):  # e.g. the last step of a run whose final checkpoint exists already
            if self.ctx.is_main:
                logger.info("step %d is already saved; not saving it again", step)
            return
        self._metrics.flush()  # the curve up to this step must be on disk before its checkpoint can commit
        self.schedule.saved(step)
        lent = None
        if from_snapshot and self.local is not None and self.manager.takes_prestaged:
            lent = self.local.lend(step, in_use=lambda: self.manager.in_flight(step))
        # The marker records the health this step was committed with (its tensors are finite: the writer checks).
        health = {**self._health_record, "healthy": self.healthy, "finite_tensors": True}
        fields: dict[str, Any] = {"health": health}
        if not self.optimizer.state:  # it is saved as having no state (see ftrain.state.OptimizerState)
            fields[OPTIMIZER_FRESH] = True
        staging = _state_bytes(self.model, self.optimizer) if self.manager.mode == MODE_ASYNC_PROCESS else 0
        self._log_save(
            self.manager.save(step, self._states(), marker_fields=fields, prestaged=lent, staging_bytes=staging)
        )

    def wait(self) -> SaveStats | None:
        """Wait until the checkpoint in flight is committed; a failed save raises ``CheckpointError``."""
        self._require_open("wait")
        stats = self.manager.wait()
        self._log_save(stats)
        if self._metrics is not None:
            self._metrics.flush()
        if stats is not None and not stats.ok:
            raise CheckpointError(f"checkpoint of step {stats.step} failed: {stats.error or 'on another rank'}")
        return stats

    def close(self) -> None:
        """Wait for the last commit, then release the lock, the signal handlers and the hooks. Idempotent."""
        if self._closed:
            return
        try:
            export_failed = self._finish_export()
            stats = self.manager.close()
            self._log_save(stats)
            if stats is not None and not stats.ok:
                raise CheckpointError(
                    f"final checkpoint of step {stats.step} failed: {stats.error or 'on another rank'}"
                )
            if export_failed:  # the promised artifact does not exist: as for a failed final save
                raise CheckpointError(f"safetensors export failed: {export_failed}")
            if self.local is not None and self._snapshots_redundant():
                self.local.remove()  # finished and committed, or nothing newer than the durable checkpoint
        finally:
            self._shut()
            self._release_group()

    def _snapshots_redundant(self) -> bool:
        """Whether the local snapshots can go at a clean close: the run finished, or (not preempted: those keep
        them, to resume from memory) its latest committed checkpoint is of the current step, e.g. a run started
        again after its final commit, which has nothing to do."""
        if self._finished:
            return True
        latest = layout.latest_complete(self.manager.root) if self.manager.enabled else None
        return self.preempted is None and latest is not None and latest.step >= self.step

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
    def _states(self) -> dict[str, Any]:
        return {
            keys.DEFAULT_STATE_KEYS[keys.MODEL]: ModelState(self.model),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: OptimizerState(self.model, self.optimizer),
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: self.progress,
            **self.extra,
        }

    def _states_for_marker(self, marker: dict[str, Any]) -> dict[str, Any]:
        """What to load a checkpoint into: its marker says where the model and the optimizer are."""
        if keys.state_keys(marker) == keys.LEGACY_STATE_KEYS:  # format_version 1: one "app" state
            return {"app": ModelOptimizerState(self.model, self.optimizer), "train": self.progress.for_loading(), **self.extra}
        optimizer = OptimizerState(self.model, self.optimizer, fresh=bool(marker.get(OPTIMIZER_FRESH)))
        return {
            **self._states(),
            keys.DEFAULT_STATE_KEYS[keys.OPTIMIZER]: optimizer,
            keys.DEFAULT_STATE_KEYS[keys.PROGRESS]: self.progress.for_loading(),
        }

    def _check_extra_state(self) -> None:
        """Refuse ``extra`` state that no resume could load (the safe loader reads tensors, numbers, strings,
        bytes, None and containers of them; a numpy array or a datetime would need code to load)."""
        for name, state in self.extra.items():
            problem = safe_types.unloadable_entry(state.state_dict())
            if problem:
                raise CheckpointError(f"extra state {name!r}: {problem}")

    def _snapshot(self, step: int) -> bool:
        """A local snapshot of ``step``; with ``local_interval=auto``, its cost steers the interval. True if taken."""
        assert self.local is not None
        if self.local.disabled:
            return False
        if not self._extra_checked:  # before the first snapshot, as before the first save
            self._check_extra_state()
            self._extra_checked = True
        if self.local.background_cpu_s is not None:  # the previous snapshot's background work is done by now
            self.local_schedule.observe_snapshot(self._snapshot_call_s + self.local.background_cpu_s)
        called = time.perf_counter()
        # A resume may start right after this step: the curve up to it must be out of this process (a syscall).
        self._metrics.flush()
        self.local.snapshot(step, self._local_states)
        self._snapshot_call_s = time.perf_counter() - called
        faults.pause_point("after_local_snapshot", step)
        return True

    def _review_local_interval(self) -> None:
        """``local_interval=auto``: every rank re-evaluates at the same steps and they take the largest proposal."""
        agreed = int(max_over_ranks([float(self.local_schedule.propose())], self.ctx.device)[0])
        if self.local_schedule.set(agreed) and self.ctx.is_main:
            logger.info(
                "checkpoint.local_interval=auto now %d step(s) (budget %.1f%% of training time)",
                agreed,
                100 * self.options.overhead_budget,
            )
        if self._metrics is not None:
            measured = {tags.LOCAL_INTERVAL: float(agreed)}
            if self.local_schedule.cost_s is not None:
                measured[tags.LOCAL_SNAPSHOT_S] = self.local_schedule.cost_s
            self._metrics.log(measured, self.step)

    def _mark_preempted(self, step: int) -> None:
        """Rank 0 writes ``PREEMPTED`` once every rank's save of ``step`` is committed: what a scheduler checks to
        requeue (torchrun itself exits 1 when signalled). The next ``load()`` removes it."""
        if not self.ctx.is_main:
            return
        record = {"step": step, "signal": self.preempted, "time": time.time()}
        try:
            layout.write_json_durably(self.run_dir / PREEMPTED_NAME, record)
        except OSError as exc:  # the checkpoint is committed; the marker is a courtesy to the scheduler
            logger.warning("could not write %s: %s", self.run_dir / PREEMPTED_NAME, exc)

    def _warm_start(self) -> None:
        """The run has no checkpoint of its own: start from ``initial_load``'s weights (collective)."""
        from ftrain.checkpoint import warm_start

        line = warm_start.load_initial(
            Path(self.options.initial_load).expanduser(),
            self.model,
            exclude=list(self.options.exclude_from_loading),
            model_only=self.options.initial_load_model_only,
            optimizer=self.optimizer,
            process_group=self.ctx.process_group,
        )
        if self.ctx.is_main:
            logger.info(line)

    def _export_weights(self, step: int) -> None:
        """Write the model's weights as safetensors to ``{run_dir}/exports/step_N`` (collective: the gather
        happens now, rank 0 writes in the background; one export in flight)."""
        from ftrain.checkpoint import export

        self._finish_export()
        self._export = export.export_model_async(
            self.model,
            export.export_dir(self.run_dir, step),
            export.parse_dtype(self.options.export_dtype),
            info={"step": step},
        )

    def _finish_export(self) -> str:
        """Wait for the export in flight; returns why it failed ('' if it did not, or there was none)."""
        pending, self._export = self._export, None
        if pending is None:
            return ""
        try:
            path = pending.result(timeout=self.options.timeout_s)
        except Exception as exc:  # like a failed background save: logged, counted, on_failure decides
            self.manager.failures += 1
            logger.error("safetensors export failed: %s", describe_error(exc))
            if self.options.on_failure == ON_FAILURE_ABORT:
                raise CheckpointError(f"safetensors export failed: {describe_error(exc)}") from None
            return describe_error(exc)
        if path is not None:
            logger.info("exported the model's weights to %s", path)
        return ""

    def _open_local_tier(self, signature: RunSignature) -> LocalSnapshots | None:
        if str(self.options.local_interval).strip() == LOCAL_OFF or not self.manager.enabled:
            return None
        directory = Path(self.options.local_dir) if self.options.local_dir else default_directory(self.run_dir)
        run_id = (self.run_dir / RUN_ID_NAME).read_text().strip()  # a deleted and re-made run is another run
        fields = {
            **signature.marker_fields(),
            "run_id": run_id,
            "timeline": _read_timeline(self.run_dir),
            "states": sorted([*keys.DEFAULT_STATE_KEYS.values(), *self.extra]),
        }
        owner = Owner(run_id, str(self.run_dir.resolve()))
        return LocalSnapshots(
            directory, self.ctx.rank, self.ctx.world_size, fields, owner=owner, default=not self.options.local_dir
        )

    def _load_local(self) -> str | None:
        """Resume from the local tier when every rank holds a snapshot newer than the latest durable checkpoint
        (``resume=auto`` only). Returns "local", or None for the durable path. Collective."""
        if self.local is None or self.options.resume != AUTO:
            return None
        latest = layout.latest_complete(self.manager.root)
        candidates = self.local.complete_steps(verify_data=False)
        while True:  # at most once per slot
            step = agree_on_step(candidates, latest.step if latest else 0, self.ctx.process_group)
            if step is None:
                return None
            # Only the snapshot about to be used has its data summed: if it fails on any rank, every rank drops
            # that step and they agree again (on the other slot's step, or on the durable path).
            if not max_over_ranks([0.0 if self.local.verify(step) else 1.0], self.ctx.device)[0]:
                break
            candidates = [candidate for candidate in candidates if candidate != step]
        problem = ""
        try:
            self.local.restore(step, self._local_states)
        except Exception as exc:  # e.g. damaged between the check and the read: the durable tier takes over
            problem = f"{type(exc).__name__}: {exc}"
        if max_over_ranks([1.0 if problem else 0.0], self.ctx.device)[0]:
            logger.warning("local snapshot of step %d unusable (%s); loading the durable checkpoint", step, problem or "on another rank")
            return None
        if self.ctx.is_main:
            logger.info("resumed from the local snapshot of step %d (%s)", step, self.local.root.parent)
        return "local"

    def _start_timeline(self) -> None:
        """This attempt does not continue the local snapshots' timeline (a durable resume, a rewind, a fresh start):
        a new timeline begins, recorded in the run directory before anything else changes, so that no snapshot of
        the old one is ever resumed, whatever the local tier setting of this attempt. Collective."""
        if not self.manager.enabled:
            return
        timeline = [uuid.uuid4().hex if self.ctx.is_main else ""]
        if self.ctx.is_main:
            layout.write_text_durably(self.run_dir / layout.TIMELINE_NAME, timeline[0] + "\n")
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(timeline, src=0, group=self.ctx.process_group)
        if self.local is not None:
            self.local.set_signature({**self.local.signature, "timeline": timeline[0]})

    def _start_status(self, load_s: float, tier: str) -> None:
        """Rank 0: read what the previous attempt left in STATUS (what the failure cost), then start ours."""
        if not self.ctx.is_main:
            return
        previous = read_status(self.run_dir)
        now = time.time()
        started = processes.start_time()
        if previous is not None and self.step and not previous.finished and previous.step >= self.step:
            self._recovery = {
                "previous_step_at": previous.step_at,
                tags.RECOVERY_STEPS_REDONE: float(previous.step - self.step),
                tags.RECOVERY_STARTUP_S: now - started,
                tags.RECOVERY_LOAD_S: load_s,
            }
        self._status = StatusWriter(self.run_dir, True, RunStatus(started, self.step, tier, now, self.step, now))

    def _log_recovery(self) -> None:
        recovery, self._recovery = self._recovery, None
        assert recovery is not None
        lost = self._status.status.first_step_at - recovery.pop("previous_step_at")
        self._metrics.log({tags.RECOVERY_TIME_LOST_S: lost, **recovery}, self.step)
        logger.info(
            "recovered: %.2f s lost (start-up %.2f s, of which loading %.2f s), %d step(s) redone, from the %s "
            "tier's step %d",
            lost,
            recovery[tags.RECOVERY_STARTUP_S],
            recovery[tags.RECOVERY_LOAD_S],
            recovery[tags.RECOVERY_STEPS_REDONE],
            self._status.status.tier,
            self._status.status.resumed_from,
        )

    def _on_unhealthy(self, step: int, problem: str) -> None:
        self.unhealthy_reason = problem
        if self.health.on_unhealthy == health_words.STOP:
            self._log_save(self.manager.wait())  # the newest healthy checkpoint finishes committing
            raise UnhealthyError(f"step {step} unhealthy: {problem} (train.on_unhealthy=stop)")
        if self.health.on_unhealthy == health_words.IGNORE and self.ctx.is_main:
            logger.warning("step %d unhealthy (%s); going on (on_unhealthy=ignore)", step, problem)

    def _skip_batches(self, count: int) -> int:
        """Move the data loader (and the global data position) ``count`` batches on."""
        loader = self.dataloader
        if loader is None or count <= 0:
            return 0
        batches = iter(loader)
        skipped = 0
        for _ in range(count):
            try:
                next(batches)
            except StopIteration:
                break
            skipped += 1
        if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(loader.state_dict())  # the loop's next iter() starts after the skipped batches
        self.progress.skip_batches(skipped)
        return skipped

    def _before_update(self, *_: Any) -> None:
        # A background save may still be copying the state this optimizer step or forward is about to change.
        self.manager.wait_for_staging()
        if self.local is not None:
            self.local.wait()

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

    def _take_lock(self) -> RunLock | None:
        """Rank 0 takes the run directory's lock; every rank learns whether it succeeded."""
        lock, problem = None, ""
        if self.ctx.is_main:
            lock = RunLock(self.run_dir)
            try:
                lock.acquire()
                _ensure_run_id(self.run_dir)
            except (LockedError, OSError) as exc:
                problem = str(exc)
                if lock.path.exists() and isinstance(exc, OSError):
                    lock.release()
                lock = None
        if max_over_ranks([1.0 if problem else 0.0], self.ctx.device)[0]:
            raise LockedError(problem or "the run directory is in use by another job (see rank 0)")
        return lock

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _shut(self) -> None:
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.preemption.close()
        self._status.close()
        if self.local is not None:
            self.local.close()
        if self._metrics is not None:
            self._metrics.flush()
            if self._writer is None:
                self._metrics.close()
        self._release_lock()

    def _open_metrics(self) -> Any:
        if self._writer is not None:
            return _WriterAdapter(self._writer)
        from ftrain.metrics import Metrics  # TensorBoard is imported only by the process that writes events

        return Metrics(self.run_dir / TENSORBOARD_DIR, self.ctx.is_main, self.step)

    def _log_save(self, stats: SaveStats | None) -> None:
        if stats is None or self._metrics is None:
            return
        scalars = {
            tags.CKPT_BLOCKING_S: stats.blocking_s,
            tags.CKPT_STAGING_S: stats.staging_s,
            tags.CKPT_FAILURES: float(self.manager.failures),
        }
        if stats.ok:
            scalars.update(
                {
                    tags.CKPT_SAVE_S: stats.save_s,
                    tags.CKPT_WRITE_S: stats.write_s,
                    tags.CKPT_SIZE_BYTES: float(stats.size_bytes),
                    tags.CKPT_WRITE_GBPS: stats.write_gbps,
                }
            )
        self._metrics.log(scalars, stats.step)
        if self.schedule.auto and stats.ok:
            agreed = int(max_over_ranks([float(self.schedule.propose(stats.blocking_s))], self.ctx.device)[0])
            if self.schedule.set(agreed):
                self._announce_interval("now")

    def _announce_interval(self, when: str) -> None:
        cost = f", measured cost {self.schedule.cost_s:.3f} s per checkpoint" if self.schedule.cost_s is not None else ""
        if self.ctx.is_main:
            logger.info(
                "checkpoint.interval=auto %s %d steps (budget %.1f%% of training time%s)",
                when,
                self.schedule.interval,
                100 * self.options.overhead_budget,
                cost,
            )
        if self._metrics is not None:
            self._metrics.log({tags.CKPT_INTERVAL: float(self.schedule.interval)}, self.step)

    def _warn_if_resharded(self) -> None:
        source = self.progress.resharded_from
        if source is None or not self.ctx.is_main:
            return
        if self.progress.sampler is None:
            logger.warning(
                "resumed a checkpoint of %d ranks on %d: the data loader has no global position, so its per-rank "
                "positions are lost and it starts over; RNGs re-seeded",
                source,
                self.ctx.world_size,
            )
            return
        logger.warning(
            "resharded from %d to %d ranks: data continues at epoch %d, sequence %d of its order; "
            "RNGs re-seeded, so this run is not bit-identical to one on %d ranks",
            source,
            self.ctx.world_size,
            self.progress.data_position["epoch"],
            self.progress.data_position["cursor"],
            source,
        )


class _WriterAdapter:
    """A user's ``SummaryWriter`` behind the interface of ``ftrain.metrics.Metrics``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._last_step: dict[str, int] = {}

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
            self._last_step[name] = step

    def logged(self, tag: str, step: int) -> bool:
        return self._last_step.get(tag) == step

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()


def _checkpoint_options(given: CheckpointOptions | None, values: dict[str, Any]) -> CheckpointOptions:
    """The options ``given`` (or the defaults) with the keyword ``values`` in place of their fields, checked."""
    names = option_names()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"Checkpointer got unknown option(s) {', '.join(unknown)}; options are {', '.join(sorted(names))}")
    if given is None:
        given = CheckpointOptions()
    elif not isinstance(given, CheckpointOptions):
        if not dataclasses.is_dataclass(given):
            raise TypeError(f"options must be a ftrain.CheckpointOptions, not {type(given).__name__}")
        given = CheckpointOptions(**dataclasses.asdict(given))
    chosen = dataclasses.replace(given, **values)  # a copy: the caller's object is never changed
    chosen.validate()
    return chosen


def _show_options_in_signature(cls: type) -> None:
    """Give ``cls.__init__`` a signature and docstring with every option as a keyword parameter, made from the
    fields of ``CheckpointOptions`` (``help()``, ``inspect.signature`` and editors' call tips show them)."""
    init = cls.__init__
    params = [p for p in inspect.signature(init).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    init.__signature__ = inspect.Signature([*params, *option_parameters()], return_annotation=None)
    marker = "        [every field of CheckpointOptions: filled in from it when this module loads]"
    cls.__doc__ = cls.__doc__.replace(marker, describe_options(indent=" " * 8))


_show_options_in_signature(Checkpointer)


def _ensure_run_id(run_dir: Path) -> None:
    """Give the run directory an identity of its own, once: local snapshots of a run directory that was deleted
    and made again under the same path must never be taken for this run's."""
    path = run_dir / RUN_ID_NAME
    if not path.is_file():
        layout.write_text_durably(path, uuid.uuid4().hex + "\n")


def _read_timeline(run_dir: Path) -> str:
    try:
        return (run_dir / layout.TIMELINE_NAME).read_text().strip()
    except OSError:
        return ""


def _blank_status() -> RunStatus:
    return RunStatus(attempt_started=0.0, resumed_from=0, tier="fresh", ready_at=0.0, step=0, step_at=0.0)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        local = getattr(tensor, "_local_tensor", tensor)  # DTensor (FSDP2): the shard's device
        return local.device
    return torch.device("cpu")


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of model and optimizer state (an optimizer with no state yet: as much as Adam's)."""
    local = [getattr(t, "_local_tensor", t) for t in (*model.parameters(), *model.buffers())]
    size = sum(t.nbytes for t in local)
    optim = [getattr(v, "_local_tensor", v) for state in optimizer.state.values() for v in state.values()]
    tensors = [t for t in optim if isinstance(t, torch.Tensor)]
    return size + (sum(t.nbytes for t in tensors) if tensors else 2 * size)


def _has_persistent_buffers(model: nn.Module) -> bool:
    buffers = {name for name, _ in model.named_buffers()}
    return bool(buffers & set(model.state_dict().keys()))


def _show_ftrain_logs(is_main: bool) -> None:
    """Make the library's own lines ("resumed from ...", "checkpoint step N committed ...") visible in a loop
    that configured no logging (Python shows only warnings then): a handler on the ``ftrain`` logger, INFO on
    rank 0 and warnings elsewhere. A program that configured logging itself keeps its own setup."""
    library = logging.getLogger("ftrain")
    if library.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [ftrain] %(message)s", "%H:%M:%S"))
    library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO if is_main else logging.WARNING)


def _require_stateful_loader(dataloader: Any) -> None:
    """A loader whose position cannot be saved would resume at its start: refuse it before anything is taken."""
    if dataloader is not None and not (hasattr(dataloader, "state_dict") and hasattr(dataloader, "load_state_dict")):
        raise ValueError(
            f"dataloader={type(dataloader).__name__} cannot save its position (no state_dict/load_state_dict): use "
            "torchdata.stateful_dataloader.StatefulDataLoader (a drop-in DataLoader), or save your own position "
            "with extra="
        )


def _give_loader_a_generator(dataloader: Any) -> None:
    """Creating a ``DataLoader`` iterator draws its base seed from the loader's ``generator`` or, without one,
    from the global torch RNG, which a resume has just restored: that draw would shift every later random
    number (dropout masks) and the resumed run would differ from step one on. A generator of its own, seeded
    from the global seed, keeps the global stream untouched."""
    if dataloader is not None and hasattr(dataloader, "generator") and dataloader.generator is None:
        dataloader.generator = torch.Generator().manual_seed(torch.initial_seed())
