"""The run directory: its file names, its creation and the resolved configuration it holds.

``runs/<study>-<timestamp>/`` holds everything a run writes (see the README's table);
every module names its files through the constants here, so the layout is written once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jaxsurro.config import Config, dumps

CONFIG = "config.toml"  # the resolved configuration; loads back to the same run
METRICS = "metrics.jsonl"  # one JSON object per log point
SIMULATIONS = "simulations.csv"  # the simulation table
SUMMARY = "summary.json"  # the run's totals, written at its end
PARAMS = "params.msgpack"  # trained parameters (flax.serialization.msgpack_restore)
MODEL = "model.json"  # the surrogate's architecture, fields and scaling (jaxsurro.surrogate.load)
SERVER_LOG = "server.log"  # rank 0's log; rank r > 0 writes server-rank<r>.log
LOGS = "logs"  # each simulation's output
CHECKPOINTS = "checkpoints"  # step-<N>/: everything a resumed run needs (jaxsurro.server.checkpoint)
CHECKPOINT_PREFIX = "step-"  # checkpoints/step-<N>/ is complete; .step-<N>.partial/ is being written
TENSORBOARD = "tensorboard"  # TensorBoard event files, with [log] tensorboard = true
DATASET = "dataset"  # offline mode: one file per simulation (jaxsurro.server.dataset)
SERVER_JOB_ID = "server-job-id"  # "<scheduler> <job id>" of a submitted server


def create(config: Config, run_dir: Path | None = None) -> Path:
    """The run directory (a new ``<output_dir>/<study>-<timestamp>[-n]`` unless given), with ``config.toml``."""
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(config.study.output_dir) / f"{config.study.name}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(dumps(config))
    return run_dir


def resume_arguments(args: argparse.Namespace) -> bool:
    """``--resume``: the CONFIG argument names a run directory; ``args.run_dir`` becomes that directory and
    ``args.config`` its resolved configuration. False, after printing why, when it holds none."""
    args.run_dir = Path(args.config)
    if not (args.run_dir / CONFIG).is_file():
        print(f"error: --resume needs a run directory; {args.run_dir / CONFIG} does not exist", file=sys.stderr)
        return False
    args.config = str(args.run_dir / CONFIG)
    return True


def server_log_name(rank: int) -> str:
    return SERVER_LOG if rank == 0 else f"server-rank{rank}.log"


@contextlib.contextmanager
def logging_to(path: Path, verbose: bool = False) -> Iterator[None]:
    """Sends the ``jaxsurro`` loggers' records to ``path`` for the duration of the block."""
    root = logging.getLogger("jaxsurro")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def console_logging(level: int = logging.WARNING) -> None:
    """The server's records of ``level`` and above on stderr, for the command line."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("[jaxsurro] %(levelname)s: %(message)s"))
    logger = logging.getLogger("jaxsurro")
    logger.addHandler(console)
    logger.propagate = False  # libraries that configure the root logger (absl, via orbax) must not repeat it
