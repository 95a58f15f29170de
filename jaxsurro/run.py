"""``python -m jaxsurro.run CONFIG``: runs a study end to end and writes its run directory.

The run directory holds the resolved configuration (``config.toml``), ``metrics.jsonl``,
the simulation table (``simulations.csv``), ``summary.json``, the trained parameters
(``params.msgpack``), the server log and each simulation's output under ``logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxsurro import validation as validation_cache
from jaxsurro.config import Config, ConfigError, dumps, load_config
from jaxsurro.progress import Progress
from jaxsurro.distributed import World
from jaxsurro.online import train_online
from jaxsurro.server import plan_simulations, produce_validation_set
from jaxsurro.validation import ValidationSet

log = logging.getLogger("jaxsurro")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so that every clean-up path runs, as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def make_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.study.output_dir) / f"{config.study.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


@contextlib.contextmanager
def logging_to(run_dir: Path, name: str = "server.log", verbose: bool = False) -> Iterator[None]:
    """Sends the run's log to ``run_dir/name`` for the duration of the block."""
    root = logging.getLogger("jaxsurro")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.FileHandler(run_dir / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def console_logging() -> None:
    """Warnings and errors of the server on stderr, for the command line."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("[jaxsurro] %(levelname)s: %(message)s"))
    logging.getLogger("jaxsurro").addHandler(console)


def run(config: Config, run_dir: Path | None = None, show_progress: bool = True,
        world: World | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Runs a study on this server rank; returns the run directory and, on rank 0, the summary.

    Under ``mpirun -n R`` / ``srun -n R`` every rank calls this; rank 0 also runs the launcher,
    validates and writes the run directory's files.
    """
    world = world or World.detect()
    if world.is_root:
        run_dir = run_dir or make_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dumps(config))
    run_dir = world.broadcast(run_dir, config.server.startup_timeout, "the run directory")
    log_name = "server.log" if world.is_root else f"server-rank{world.rank}.log"
    with logging_to(run_dir, log_name):
        return run_dir, _run(config, run_dir, show_progress and world.is_root, world)


def _run(config: Config, run_dir: Path, show_progress: bool, world: World) -> dict[str, Any] | None:
    started = time.monotonic()
    log.info("run directory %s, server rank %d of %d", run_dir, world.rank, world.size)
    validation = None
    if world.is_root:
        validation = _validation_set(config, run_dir, show_progress)
    # The other ranks wait here while rank 0 prepares; a dead rank 0 ends the MPI job.
    world.broadcast(None, config.server.startup_timeout, "rank 0's validation set (server.startup_timeout)")
    table = plan_simulations(config)
    progress = Progress(config.study.n_simulations * config.solver.n_steps, enabled=show_progress)
    try:
        result = train_online(config, table, validation, run_dir, progress, world)
    finally:
        progress.close()
        if world.is_root:  # written even when the run fails or is interrupted: the table shows what happened
            table.write_csv(run_dir / "simulations.csv", config.solver.parameter_names)
    if not world.is_root:
        return None
    (run_dir / "params.msgpack").write_bytes(result.trainer.params_bytes())
    summary = result.summary
    summary["mean_field_validation_mse"] = validation_cache.mean_field_mse(validation, *config.output_range)
    summary["wall_time_s"] = time.monotonic() - started
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _validation_set(config: Config, run_dir: Path, show_progress: bool) -> ValidationSet:
    """The cached validation set, or a new one produced through the solver and cached."""
    validation = validation_cache.load_cached(config)
    if validation is not None:
        log.info("validation set loaded from %s", validation_cache.cache_path(config))
        return validation
    progress = Progress(config.train.n_validation * config.solver.n_steps, enabled=show_progress)
    try:
        validation = produce_validation_set(config, run_dir / "logs", progress)
    finally:
        progress.close()
    path = validation_cache.save(config, validation)
    log.info("validation set produced and cached in %s", path)
    return validation


def _abort_peers(code: int) -> None:
    """Under MPI, a rank that fails takes the whole server down: its peers may wait in a collective."""
    world = World.detect()
    if world.distributed:
        sys.stderr.flush()
        world.comm.Abort(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment TOML file, e.g. experiments/heat.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration value (TOML literal); repeatable")
    parser.add_argument("--run-dir", type=Path, help="write here instead of a new directory under study.output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dumps(config), end="")
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    console_logging()
    try:
        run_dir, summary = run(config, args.run_dir, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\n[jaxsurro] interrupted: every simulation job was cancelled", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("[jaxsurro] terminated: every simulation job was cancelled", file=sys.stderr)
        return int(exc.code)
    except (RuntimeError, TimeoutError) as exc:  # a stall, a failed validation set, a dead thread or peer rank
        print(f"[jaxsurro] error: {exc}", file=sys.stderr)
        _abort_peers(1)
        return 1
    if summary is None:  # a server rank other than 0: rank 0 reports for everyone
        return 0
    print(f"[jaxsurro] finished {summary['simulations_finished']}/{summary['simulations_planned']} simulations, "
          f"{summary['unique_samples_received']} samples received, {summary['samples_trained']} trained; "
          f"validation MSE {summary['final_validation_mse']:.4g} (mean-field baseline "
          f"{summary['mean_field_validation_mse']:.4g}); {summary['wall_time_s']:.0f} s")
    print(f"[jaxsurro] run directory: {run_dir}")
    if summary["simulations_failed"]:
        print(f"[jaxsurro] {summary['simulations_failed']} simulation(s) failed every attempt; their output is "
              f"in {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
