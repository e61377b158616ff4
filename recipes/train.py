"""Launch an ftrain run.

    torchrun --standalone --nproc_per_node=2 recipes/train.py [--config FILE.yaml] [key=value ...]
    python recipes/train.py [...]                      # one rank, no torchrun

Exit codes: 0 finished, 75 preempted after saving (run again to resume), 1 error, 2 bad configuration.
"""

import logging
import os
import sys

from ftrain.checkpoint import CheckpointError
from ftrain.config import ConfigError, load_config
from ftrain.trainer import Trainer, is_peer_failure


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"ftrain: config error: {exc}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg)
        code = trainer.fit()
        trainer.close()
        return code
    except (CheckpointError, ValueError) as exc:
        print(f"ftrain: error: {exc}", file=sys.stderr)
        code = 1
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            logging.getLogger("ftrain").exception("training failed")
        else:
            print(f"ftrain: error: lost contact with another rank: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        code = 1
    except BaseException:
        logging.getLogger("ftrain").exception("training failed")
        code = 1
    # On the error path background saves or data workers may be stuck on a dead peer: leave now, so that
    # torchrun sees the failure and can restart the group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
