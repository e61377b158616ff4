"""``ftrain-train``: the training recipe as a command.

    ftrain-train [--config FILE.yaml] [key=value ...]                 # one rank
    torchrun --standalone --nproc_per_node=2 -m ftrain train [...]    # N ranks (or: torchrun ... --no-python ftrain-train)
    ftrain-train --help | --print-config [...]

Exit codes: 0 finished, 75 preempted after saving (run again to resume), 65 stopped on an unhealthy step
(train.on_unhealthy=stop, or max_rollbacks spent), 1 error, 2 bad configuration (nothing written), 130 interrupted
by Ctrl-C (SIGINT; nothing damaged, run again to resume). A run that stopped for a preemption signal also leaves
``RUN_DIR/PREEMPTED`` (torchrun itself exits 1 when it is signalled, so a scheduler can look for this file
instead); the next start of the run removes it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ftrain import warm
from ftrain.config import Config, ConfigError, keys, load_config, format_value, to_yaml

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it
CONFIG_ERROR_GRACE_S = 10.0  # how long ranks other than local rank 0 wait before exiting on a config error

logger = logging.getLogger("ftrain")

USAGE = """\
usage: ftrain-train [--config FILE.yaml ...] [key=value ...]
       ftrain-train --print-config [--config FILE.yaml ...] [key=value ...]
       torchrun --standalone --nproc_per_node=N -m ftrain train [--config FILE.yaml ...] [key=value ...]

Train a byte-level GPT with fault-tolerant checkpoints. Settings are the built-in defaults below, then each
--config file, then each key=value (YAML values: key=[a,b], key=1e-4, key="").

options:
  -h, --help        show this help (every config key with its type, default and meaning) and exit
  --print-config    print the resolved config as YAML and exit (nothing is run or written)
  --config FILE     a YAML file of sections and keys (only those that differ from the defaults)

exit codes: 0 finished; 75 preempted by a signal after saving (run the same command again to resume; the run
directory holds a PREEMPTED file); 65 stopped on an unhealthy step (NaN/Inf loss or grad norm, or a spike); 1 error;
2 bad configuration, data or run directory (one line on stderr,
nothing written); 130 interrupted by Ctrl-C (nothing damaged: run the same command again to resume)."""


def help_text() -> str:
    """The usage, then one row per config key: name, type, default, comment (a blank line between sections)."""
    infos = keys()
    rows = [(info.key, info.type, format_value(info.default), info.help) for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [USAGE, "", "config keys:"]
    section = None
    for info, row in zip(infos, rows):
        head = info.key.split(".", 1)[0]
        if section is not None and head != section:
            lines.append("")
        section = head
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return "\n".join(lines)


def _print(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) is not an error."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run the recipe; returns (or exits with) one of the exit codes above."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _print(help_text())
        return EXIT_OK
    print_only = "--print-config" in argv
    argv = [arg for arg in argv if arg != "--print-config"]
    try:
        cfg = load_config(argv)
        if print_only:
            _print(to_yaml(cfg).rstrip("\n"))
            return EXIT_OK
        from ftrain.preflight import preflight  # noqa: PLC0415 - after --help, which must not pay for it

        preflight(cfg)
    except ConfigError as exc:
        if _local_rank() == 0:  # under torchrun every rank finds the same problem: say it once per node
            print(f"ftrain: config error: {exc}", file=sys.stderr)
        else:
            # torchrun stops every worker as soon as one has exited with an error: the others leave after local
            # rank 0 has had its chance to say why (it ends the job when it exits, so this costs no time then)
            time.sleep(CONFIG_ERROR_GRACE_S)
        return EXIT_CONFIG
    if cfg.train.warm_restarts:
        why_not = warm.available()
        if not why_not:
            warm.preload("ftrain.trainer")
            from ftrain.trainer import can_rehearse, rehearse_step

            rehearse = (lambda: rehearse_step(cfg)) if can_rehearse(cfg) else None
            return warm.run(lambda: _train(cfg), cfg.train.warm_restarts, cfg.train.timeout_s, rehearse)
        if _local_rank() == 0 and why_not != warm.NOT_UNDER_TORCHRUN:  # a single process: nothing to keep warm
            print(f"ftrain: train.warm_restarts: off ({why_not})", file=sys.stderr)
    return _train(cfg)


def _train(cfg: Config) -> int:
    from ftrain.checkpoint import CheckpointError
    from ftrain.checkpoint.errors import ResumeRefused
    from ftrain.health import EXIT_UNHEALTHY, UnhealthyError
    from ftrain.metrics import setup_logging
    from ftrain.trainer import Trainer, is_peer_failure

    setup_logging(_rank(), cfg.log.level)
    trainer = None
    try:
        trainer = Trainer(cfg)
        code = trainer.fit()  # a preempted run leaves RUN_DIR/PREEMPTED (ftrain.Checkpointer writes it)
        trainer.close()
        trainer = None
    except UnhealthyError as exc:
        print(f"ftrain: stopped: {exc}", file=sys.stderr)
        code = EXIT_UNHEALTHY
    except ResumeRefused as exc:  # found before anything in the run directory changed
        if _local_rank() == 0:
            print(f"ftrain: config error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"ftrain: interrupted (SIGINT) on rank {_rank()}; run the same command again to resume", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except (CheckpointError, ValueError) as exc:
        print(f"ftrain: error: {exc}", file=sys.stderr)
        code = EXIT_ERROR
        warm.end_for_good()  # ftrain stopped the run on purpose (on_failure=abort, a failed final save, ...)
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            logger.exception("training failed")
        else:
            print(f"ftrain: error: lost contact with another rank: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        code = EXIT_ERROR
    except BaseException:
        logger.exception("training failed")
        code = EXIT_ERROR
    if trainer is not None:
        trainer.abort()  # the lock and signal handlers go; a save in flight is not waited for
    warm.exit_now(code)  # on every path (see there why)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


if __name__ == "__main__":
    sys.exit(main())
