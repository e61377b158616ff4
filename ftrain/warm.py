"""Warm restarts: a training process that dies is replaced by a fork of a warm parent, without a new torchrun round.

Under torchrun the process torchrun starts for a rank becomes a *warm parent*: it imports torch, DCP, the optimizer
machinery and the recipe (no thread, no process group, no CUDA context), then forks the training process. When a
training process ends with a failure (a signal such as SIGKILL, an exception, a lost peer), every rank's parent
ends its own training process too, the parents meet at a barrier in torchrun's store, and each forks a new one for
the next *generation*, which joins a process group under a key space of its own and resumes from the newest
local snapshot all ranks hold. A fork of a warm process reaches its first step in a fraction of the time a fresh
process needs (``docs/bench.md``).

What stays with torchrun: a warm parent that dies (or a node that is lost) ends the round as before, and
torchrun's own restart (``--max-restarts``) starts fresh processes. Outcomes that are not failures (finished,
preempted, unhealthy, bad configuration, Ctrl-C), and errors with which ftrain stops a run on purpose
(``end_for_good``: ``checkpoint.on_failure=abort``, a failed final save), end the parent with the same exit code.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn

from ftrain.faults import GENERATION_ENV

logger = logging.getLogger("ftrain")

NOT_FAILURES = frozenset({0, 2, 65, 75, 130})  # ftrain's exit codes that end a run on purpose
NOT_UNDER_TORCHRUN = "not under torchrun"
TRAINING_PROCESS_NAME = "ftrain-train"  # the process name (comm) of a warm parent's training process
POLL_S = 0.05  # how often a training parent looks at the store for another rank's failure
BARRIER_POLL_S = 0.005  # how often a parent that is waiting for the others' parents after a failure looks
REHEARSED_ENV = "FTRAIN_WARM_REHEARSED"  # set in a training process whose parent had rehearsed a step
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def generation() -> int:
    """This training process's generation (0 unless it was forked again after a failure)."""
    return int(os.environ.get(GENERATION_ENV, "0") or 0)


def rehearsed() -> bool:
    """Whether this training process was forked from a parent that had rehearsed a step (see ``run``)."""
    return os.environ.get(REHEARSED_ENV, "") == "1"


def available() -> str:
    """'' when warm restarts can run here, else why not (one line)."""
    if not hasattr(os, "fork"):
        return "this platform cannot fork"
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return NOT_UNDER_TORCHRUN
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "torchrun's agent store is not shared with the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE)"
    if threading.active_count() > 1:
        return "this process already runs threads (forking it is unsafe)"
    return ""


def preload(*modules: str) -> None:
    """Import what every training process needs, once, in the parent: its forks start with it. ``modules``: more
    to import (the recipe's trainer)."""
    import importlib

    import torch  # noqa: F401

    from ftrain._torch_compat import import_dynamo

    import_dynamo()  # the optimizer's first use imports it: about half of a fresh start
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    import ftrain.checkpointer  # noqa: F401

    for module in modules:
        importlib.import_module(module)


def run_with_warm_restarts(
    main: Callable[[], int | None],
    restarts: int = 3,
    timeout_s: float = 300.0,
    rehearse: Callable[[], None] | None = None,
) -> int:
    """Run a training script's ``main`` (your own loop on ``ftrain.Checkpointer``) so that under torchrun a
    training process that dies is replaced by a fork of a warm parent, in the same torchrun round; returns the
    exit code to end with (``sys.exit`` it). ``main`` returns an exit code (None = 0) or raises.

    What ``main`` must do: everything that starts a thread, a process group or CUDA happens inside it (imports at
    module level are fine and are what the forks reuse), and it resumes with ``Checkpointer.load()`` as always:
    the replacement resumes from the newest local snapshot every rank holds. A plain
    ``dist.init_process_group()`` works: every generation of training processes gets a store of its own.
    ``restarts=0``, or not under torchrun, calls ``main`` once in this process.

    ``rehearse`` (optional, CPU training only): one training step on throwaway objects (build the model as ``main``
    does, ``fully_shard`` it if ``main`` does, forward, backward, optimizer step; DDP's all-reduce cannot run on
    the fake process group: leave a DDP model unwrapped). The parent runs it once, after the first
    training process's first ``maybe_save``, inside ``rehearsal()`` (torch's ``fake`` process group, one intra-op
    thread, the RNG state put back), so that what a process does the first time stays in the parent and the
    replacements forked after a failure skip it. It must start no thread (no data loader workers) and never touch
    CUDA: a parent with a CUDA context cannot fork usable children (after such a rehearsal, failures are left to
    torchrun)."""
    why_not = available()
    if restarts <= 0 or why_not:
        if restarts > 0 and why_not != NOT_UNDER_TORCHRUN and os.environ.get("LOCAL_RANK", "0") == "0":
            logger.warning("warm restarts off: %s", why_not)
        return _exit_code(main)
    preload()
    in_rehearsal = None if rehearse is None else (lambda: _run_in_rehearsal(rehearse))
    return run(lambda: exit_now(_exit_code(main)), restarts, timeout_s, in_rehearsal)


@contextlib.contextmanager
def rehearsal() -> Iterator[None]:
    """What a warm parent's rehearsal runs in: torch's ``fake`` process group with this rank and world size (no
    peer, no thread), one intra-op thread (an OpenMP thread pool made before a fork hangs the children's parallel
    regions) and torch's CPU RNG forked. Afterwards neither the group nor the thread count nor the RNG state is
    left changed, whatever happened inside."""
    import torch
    import torch.distributed as dist

    from ftrain._torch_compat import init_fake_process_group

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            init_fake_process_group(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def _run_in_rehearsal(rehearse: Callable[[], None]) -> None:
    with rehearsal():
        rehearse()


def _exit_code(main: Callable[[], int | None]) -> int:
    """``main``'s exit code: what it returned or exited with; 1 after an exception (printed), ending the run for
    good when ftrain raised it on purpose (a ``CheckpointError``: on_failure=abort, a failed final save)."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - a training process's last word: the parent decides what follows
        import traceback

        traceback.print_exc()
        from ftrain.checkpoint.errors import CheckpointError

        if isinstance(exc, CheckpointError):
            end_for_good()
        code = 1
    return 0 if code is None else int(code)


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` now, without interpreter finalization: after an error, background saves or
    data workers may be stuck on a dead peer, and the parent or torchrun must see the failure at once; after
    success, gloo's threads may still be releasing the last collective's tensors, and if that happens while the
    interpreter finalizes, taking the GIL aborts the process (SIGABRT, exit -6 after a finished run;
    pytorch/pytorch#179291 describes it)."""
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(train: Callable[[], int], max_restarts: int, timeout_s: float, rehearse: Callable[[], None] | None = None) -> int:
    """Fork ``train`` (which does not return: it ends its process with an exit code) and replace it after a
    failure, at most ``max_restarts`` times; returns the exit code the parent should end with. ``rehearse``: run
    once in the parent when a training process has trained its first step (``trained_a_step``), to make first-use
    work that its later forks then skip; it must start no thread and leave no process group."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    forwarded: list[int] = []
    child = 0

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        if child:
            os.kill(child, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    # The parents' own key space in torchrun's store (a client connection; the children never use it).
    store = _parent_store(timeout_s)
    try:
        gen, port, rehearsed = 0, 0, False
        while True:
            parent = os.getpid()
            said_r, said_w = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(said_r)
                _keep_said_fd(said_w)
                _die_with(parent)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                os.environ[GENERATION_ENV] = str(gen)
                os.environ[REHEARSED_ENV] = "1" if rehearsed else ""
                if gen > 0:  # a store of its own for this generation's process group (see _offer_store_port)
                    os.environ.update({"MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "False"})
                os._exit(train())
            os.close(said_w)
            os.set_blocking(said_r, False)  # a forked data worker may still hold the write end open
            said = bytearray()
            peers_failed = False
            while True:
                done, status = os.waitpid(child, os.WNOHANG)
                if done:
                    break
                said += _read_all(said_r)
                if rehearse is not None and _TRAINED in said:
                    rehearsed = _rehearse(rehearse, rank)
                    rehearse = None
                    if _has_cuda_context():  # its forks could not use CUDA: torchrun's restart takes over
                        logger.error("rank %d: the rehearsal initialised CUDA; failures are left to torchrun", rank)
                        max_restarts = gen
                if gen < max_restarts and not peers_failed and _count(store, gen) > 0:
                    peers_failed = True  # another rank's training process failed: this one cannot go on
                    os.kill(child, signal.SIGKILL)
                # Wakes as soon as the child ends (SIGCHLD is blocked, so it waits here, pending, and no ending
                # between waitpid and this call is missed); otherwise looks at the store again after POLL_S.
                signal.sigtimedwait([signal.SIGCHLD], POLL_S)
            code = os.waitstatus_to_exitcode(status)
            child = 0
            said += _read_all(said_r)
            os.close(said_r)
            on_purpose = _FINAL in said
            failed = (code not in NOT_FAILURES and not on_purpose) or peers_failed
            if not failed or forwarded or gen >= max_restarts:
                return code if code >= 0 else 128 - code
            what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            if rank == 0 or not peers_failed:
                logger.warning("rank %d: training process ended (%s); forking a new one from the warm parent", rank, what)
            if rank == 0:  # before arriving, so that the others find it as soon as all have arrived
                _offer_store_port(store, gen + 1)
            store.add(_key(gen), 1)
            if not _all_arrived(store, gen, world_size, timeout_s):
                logger.error("rank %d: not every rank's warm parent came back within %.0f s: leaving it to torchrun", rank, timeout_s)
                return code if code >= 0 else 128 - code
            gen += 1
            port = int(store.get(_port_key(gen)))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def end_for_good() -> None:
    """In a training process: the error it is about to exit with ends the run on purpose (ftrain stopped it:
    ``checkpoint.on_failure=abort``, a failed final save or export, ...), so its warm parent passes the exit code
    on instead of forking again. A no-op anywhere else."""
    _say(_FINAL)


def trained_a_step() -> None:
    """In a training process: its first step is done (the parent may now rehearse, see ``run``). A no-op
    anywhere else and after the first call."""
    global _trained
    if not _trained:
        _trained = True
        _say(_TRAINED)


_FINAL = b"f"  # what a training process tells its parent through a pipe: end_for_good
_TRAINED = b"t"  # ... and trained_a_step
_said_fd: int | None = None  # in a training process: the write end of that pipe
_trained = False


def _say(message: bytes) -> None:
    if _said_fd is not None:
        try:
            os.write(_said_fd, message)
        except OSError:
            pass


def _keep_said_fd(fd: int) -> None:
    global _said_fd
    _said_fd = fd


def _read_all(read_end: int) -> bytes:
    """What the training process has said so far (non-blocking; b'' when nothing new)."""
    chunks = []
    while True:
        try:
            chunk = os.read(read_end, 64)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _rehearse(rehearse: Callable[[], None], rank: int) -> bool:
    """Run the parent's rehearsal; a failed one only costs the later forks its benefit."""
    try:
        rehearse()
    except Exception as exc:  # noqa: BLE001 - an optimisation, never a reason to stop training
        logger.warning("rank %d: the warm parent's rehearsal failed (%s); replacements start without it", rank, exc)
        return False
    return True


def _has_cuda_context() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _die_with(parent: int) -> None:
    """In a training process: be SIGKILLed when the warm parent dies (Linux), so a parent that torchrun or a user
    kills never leaves its training process running on; if the parent is already gone, end now. It is also named
    ``TRAINING_PROCESS_NAME``, so that ``ps`` and ``ftrain-chaos`` tell it from its parent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(TRAINING_PROCESS_NAME.encode()), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own signal forwarding is all there is
        pass
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PR_SET_NAME = 15


def _parent_store(timeout_s: float):  # noqa: ANN202 - a torch.distributed.Store
    import torch.distributed as dist

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    round_id = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"ftrain/{run_id}/round{round_id}/warm-parents/", client)


def _offer_store_port(store, gen: int) -> None:  # noqa: ANN001
    """Rank 0's parent: the port on which generation ``gen``'s rank 0 will host the store of its process group,
    as torch does when the agent's store is not shared (``TORCHELASTIC_USE_AGENT_STORE=False``). A new store holds
    no key of the generation that failed, so a plain ``init_process_group()`` in the new training processes cannot
    meet a dead peer's address. The port is free on rank 0's host (``MASTER_ADDR``: warm restarts need the agent's
    store shared, so rank 0 runs there) when it is chosen; as with torchrun's own choice of a free port, another
    process could take it before the new training process binds it (then that generation fails and the next one
    gets another port)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        store.set(_port_key(gen), str(probe.getsockname()[1]))


def _port_key(gen: int) -> str:
    return f"gen{gen}/store-port"


def _key(gen: int) -> str:
    return f"gen{gen}/ended"


def _count(store, gen: int) -> int:  # noqa: ANN001
    return int(store.add(_key(gen), 0))


def _all_arrived(store, gen: int, world_size: int, timeout_s: float) -> bool:  # noqa: ANN001
    """Wait until every rank's parent has counted its failure of generation ``gen``. Polled (briefly: every
    parent arrives within a poll of the others) rather than a blocking ``store.wait``, so that a signal from
    torchrun is handled at once."""
    deadline = time.monotonic() + timeout_s
    while _count(store, gen) < world_size:
        if time.monotonic() > deadline:
            return False
        time.sleep(BARRIER_POLL_S)
    return True
