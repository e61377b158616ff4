"""``python -m ftrain``: the installed commands, also runnable as ``python -m ftrain COMMAND [args]``.

    python -m ftrain                       # lists the commands
    python -m ftrain train key=value ...   # = ftrain-train; under torchrun: torchrun ... -m ftrain train ...
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, what it does); pyproject.toml's [project.scripts] installs each as ftrain-<name>
COMMANDS = {
    "train": ("ftrain.cli:main", "train (the recipe): --help lists every config key; exit 0/75/1/2"),
    "ckpt": ("ftrain.ckpt_cli:main", "inspect and manage checkpoints: list, show, verify, convert, prune"),
    "report": ("ftrain.report:main", "what checkpointing cost a run, from its TensorBoard scalars"),
    "chaos": ("ftrain.harness.chaos_cli:main", "kill a run at random moments and check it recovers bit for bit"),
}


def usage() -> str:
    lines = ["usage: python -m ftrain COMMAND [args]   (installed as ftrain-COMMAND)", "", "commands:"]
    lines += [f"  ftrain-{name:<8} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "Each takes --help. Under torchrun: torchrun --standalone --nproc_per_node=N -m ftrain train ..."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = argv[0].removeprefix("ftrain-")
    if name not in COMMANDS:
        print(f"ftrain: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][0].split(":")
    sys.argv = [f"ftrain-{name}", *argv[1:]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
