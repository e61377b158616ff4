"""Launch an ftrain run; the same as the installed ``ftrain-train`` command (``ftrain.cli``).

    torchrun --standalone --nproc_per_node=2 recipes/train.py [--config FILE.yaml] [key=value ...]
    python recipes/train.py [...]                      # one rank, no torchrun
    python recipes/train.py --help                     # every config key with its type, default and meaning

Exit codes: those of ``ftrain-train`` (see ``ftrain.cli``): 0 finished, 75 preempted after saving (run again to
resume), 65 stopped on an unhealthy step, 1 error, 2 bad configuration (nothing written), 130 interrupted by Ctrl-C.
"""

import sys

from ftrain.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
