"""Launch an ftrain run; the same as the installed ``ftrain-train`` command (``ftrain.cli``).

    torchrun --standalone --nproc_per_node=2 recipes/train.py [--config FILE.yaml] [key=value ...]
    python recipes/train.py [...]                      # one rank, no torchrun
    python recipes/train.py --help                     # every config key with its type, default and meaning

Exit codes: 0 finished, 75 preempted after saving (run again to resume), 1 error, 2 bad configuration.
"""

import sys

from ftrain.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
