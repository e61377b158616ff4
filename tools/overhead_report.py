#!/usr/bin/env python3
"""What checkpointing cost an ftrain run; the same as the installed ``ftrain-report`` command (``ftrain.report``).

    python tools/overhead_report.py RUN_DIR [--json] [--plot PATH | --no-plot]
"""

import sys

from ftrain.report import main

if __name__ == "__main__":
    sys.exit(main())
