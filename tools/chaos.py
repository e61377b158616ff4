#!/usr/bin/env python3
"""Kill a training run at random moments and check it recovers bit for bit; the same as the installed
``ftrain-chaos`` command (``ftrain.harness.chaos_cli``).

    python tools/chaos.py --workdir /tmp/chaos --kills 10 --seed 0      (--help for the rest)
"""

import sys

from ftrain.harness.chaos_cli import main

if __name__ == "__main__":
    sys.exit(main())
