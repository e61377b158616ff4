#!/usr/bin/env python3
"""Inspect and manage ftrain checkpoints; the same as the installed ``ftrain-ckpt`` command.

    python tools/ckpt.py {list,show,verify,convert,prune} ...   (--help on each)
"""

import sys

from ftrain.ckpt_cli import main

if __name__ == "__main__":
    sys.exit(main())
