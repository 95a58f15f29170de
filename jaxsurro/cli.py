"""The ``jaxsurro`` console script: ``jaxsurro run|plot|config ...`` wraps the ``python -m`` entry points."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "run": ("jaxsurro.run", "run a study: jaxsurro run experiments/heat.toml"),
    "plot": ("jaxsurro.plot", "plot a run directory: jaxsurro plot runs/heat-..."),
    "config": ("jaxsurro.config", "validate and print a configuration: jaxsurro config experiments/heat.toml"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<7} {text}" for name, (_, text) in COMMANDS.items())
        print(f"usage: jaxsurro COMMAND [ARGS...]\n\ncommands:\n{usage}", file=sys.stderr if args else sys.stdout)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    module, _ = COMMANDS[args[0]]
    return importlib.import_module(module).main(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
