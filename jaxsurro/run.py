"""``python -m jaxsurro.run CONFIG``: runs a study end to end and writes its run directory.

The run directory holds the resolved configuration (``config.toml``), ``metrics.jsonl``,
the simulation table (``simulations.csv``), ``summary.json``, the trained parameters
(``params.msgpack``), the server log and each simulation's output under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxsurro import rundir
from jaxsurro.config import Config, add_config_arguments, config_from_args, dumps

# Everything else loads inside the functions that use it: a bad configuration is refused by main()
# before JAX, the server or the launcher are imported (tests/test_bad_configs.py times it).
if TYPE_CHECKING:
    from jaxsurro.launcher import JobSpec, Launcher
    from jaxsurro.server.distributed import World
    from jaxsurro.server.ensemble import ClientAccess, LaunchFactory
    from jaxsurro.server.online import Requests
    from jaxsurro.server.trainer import Trainer
    from jaxsurro.server.validation import ValidationSet
    from jaxsurro.table import SimulationTable

log = logging.getLogger("jaxsurro")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so that every clean-up path runs, as for Ctrl-C."""


class Signals:
    """SIGTERM, SIGINT and SIGUSR1, as the run takes them.

    While the training loop runs, SIGTERM and SIGINT ask it to write a checkpoint and stop (status
    "interrupted"), and SIGUSR1 asks for a checkpoint; a second SIGTERM or SIGINT, or one before the
    loop, stops at once (every simulation job is still cancelled).
    """

    def __init__(self) -> None:
        from jaxsurro.server.online import Requests

        self.requests = Requests()
        self.signal = 0  # the last stopping signal received

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGUSR1, lambda signum, frame: self.requests.checkpoint.set())

    def _stop(self, signum: int, frame: Any) -> None:
        self.signal = signum
        if self.requests.active and not self.requests.stop.is_set():
            self.requests.stop.set()
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(128 + signum)


def plan_simulations(config: Config) -> SimulationTable:
    """The study's simulation table, parameters drawn by the configured sampler (the same on every rank)."""
    from jaxsurro.core.sampling import plan_parameters
    from jaxsurro.table import SimulationTable

    kind = config.breed.base_sampler if config.sampler.kind == "breed" else config.sampler.kind
    return SimulationTable(
        plan_parameters(kind, config.study.n_simulations, config.solver.low, config.solver.high, config.study.seed)
    )


def client_environment(config: Config, access: ClientAccess) -> dict[str, str]:
    """The client settings every solver job gets (jaxsurro.client.ENV_*), but which simulation to run."""
    from jaxsurro import client

    environment = {
        client.ENV_SERVER: access.control_address,
        client.ENV_TOKEN: access.token.hex(),
        client.ENV_TIMEOUT: repr(config.server.client_timeout),
        client.ENV_WIRE_DTYPE: config.solver.wire_dtype,
    }
    if access.server_key is not None:
        environment[client.ENV_SERVER_KEY] = access.server_key.decode()
    return environment


def job_factory(config: Config, access: ClientAccess, log_dir: Path, label: str) -> Callable[[int, int], JobSpec]:
    """Builds the job of one simulation attempt: the solver command with the client's settings."""
    from jaxsurro import client
    from jaxsurro.launcher import JobSpec

    argv = tuple(config.solver.argv())
    base_env = client_environment(config, access)

    def job_for(sim_id: int, attempt: int) -> JobSpec:
        return JobSpec(
            name=f"{config.study.name}-{label}-{sim_id}",
            argv=argv,
            env={**base_env, client.ENV_SIM_ID: str(sim_id), client.ENV_ATTEMPT: str(attempt)},
            log_path=log_dir / f"{label}-{sim_id:05d}.log",
            cwd=Path.cwd(),
        )

    return job_for


def client_job_factory(config: Config, access: ClientAccess, log_dir: Path, label: str) -> Callable[[int], JobSpec]:
    """Builds the job of one persistent client: the solver command asking for any simulation, under
    the client id the launcher gave it (launcher.persistent_clients)."""
    from jaxsurro import client
    from jaxsurro.launcher import JobSpec

    argv = tuple(config.solver.argv())
    base_env = client_environment(config, access)

    def client_job(client_id: int) -> JobSpec:
        return JobSpec(
            name=f"{config.study.name}-{label}-client{client_id}",
            argv=argv,
            env={**base_env, client.ENV_SIM_ID: "any", client.ENV_CLIENT_ID: str(client_id)},
            log_path=log_dir / f"{label}-client{client_id:04d}.log",
            cwd=Path.cwd(),
        )

    return client_job


def launch_factory(config: Config, log_dir: Path) -> LaunchFactory:
    """How the server starts a table's simulations: the configured scheduler backend behind a launcher."""
    from jaxsurro.core.sampling import BoxSampler, derive_seed
    from jaxsurro.launcher import Launcher, make_scheduler
    from jaxsurro.server.distributed import World

    launcher = config.launcher
    if launcher.on_exhausted == "redraw" and World.detect().size > 1:
        raise RuntimeError(
            'launcher.on_exhausted = "redraw" needs a single server rank: the other ranks label a '
            "simulation's time steps with their own copy of its parameters, which a redraw on rank 0 does not reach"
        )

    def launch(table: SimulationTable, access: ClientAccess, label: str) -> Launcher:
        scheduler = make_scheduler(launcher.scheduler, launcher.client_options, launcher.slurm_mode)
        redraw = None
        if launcher.on_exhausted == "redraw" and label == "sim":  # the validation set stays as it is
            # The plan's own sampler stream, continued past the planned points (Halton: the next points of
            # the same sequence, so a redraw never repeats a planned simulation).
            kind = config.breed.base_sampler if config.sampler.kind == "breed" else config.sampler.kind
            sampler = BoxSampler(kind, config.solver.low, config.solver.high, derive_seed(config.study.seed, "sampler"))
            sampler.draw(len(table))

            def redraw() -> Sequence[float]:  # one parameter vector
                return sampler.draw(1)[0]

        return Launcher(
            table,
            scheduler,
            job_factory(config, access, log_dir, label),
            max_concurrent=launcher.max_concurrent,
            max_attempts=launcher.max_attempts,
            poll_interval=launcher.poll_interval,
            output_tail_lines=launcher.output_tail_lines,
            finish_grace=config.server.client_timeout,
            silence_timeout=launcher.silence_timeout,
            redraw=redraw,
            max_redraws=launcher.max_redraws,
            persistent_clients=launcher.persistent_clients,
            client_job=client_job_factory(config, access, log_dir, label),
        )

    return launch


def run(
    config: Config,
    run_dir: Path | None = None,
    show_progress: bool = True,
    world: World | None = None,
    requests: Requests | None = None,
    resume: bool = False,
) -> tuple[Path, dict[str, Any] | None]:
    """Runs a study on this server rank; returns the run directory and, on rank 0, the summary.

    Under ``mpirun -n R`` / ``srun -n R`` every rank calls this; rank 0 also runs the launcher,
    validates and writes the run directory's files. ``resume``: continue the run in ``run_dir``
    from its latest checkpoint (with as many ranks as wrote it).
    """
    from jaxsurro.server.distributed import World

    world = world or World.detect()
    if config.study.mode == "offline":  # refused by every rank at once, before anything is made
        from jaxsurro.server.offline import check_single_rank

        check_single_rank(world)
        if resume:
            raise RuntimeError(
                '--resume continues online runs; an offline run (study.mode = "offline") writes no checkpoints: '
                "start it again"
            )
    if world.is_root:
        run_dir = rundir.create(config, run_dir)
    run_dir = world.broadcast(run_dir, config.server.startup_timeout, "the run directory")
    with rundir.logging_to(run_dir / rundir.server_log_name(world.rank)):
        return run_dir, _run(config, run_dir, show_progress and world.is_root, world, requests, resume)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    from jaxsurro.server import checkpoint

    return checkpoint.latest(run_dir / rundir.CHECKPOINTS)


def _run(
    config: Config, run_dir: Path, show_progress: bool, world: World, requests: Requests | None, resume: bool
) -> dict[str, Any] | None:
    from jaxsurro.server import checkpoint, metrics
    from jaxsurro.server import validation as validation_cache
    from jaxsurro.server.online import TrainingStopped, train_online
    from jaxsurro.server.progress import Progress
    from jaxsurro.server.trainer import scaling_for
    from jaxsurro.table import SimulationTable

    started = time.monotonic()
    log.info("run directory %s, server rank %d of %d", run_dir, world.rank, world.size)
    offline = config.study.mode == "offline"
    launch = launch_factory(config, run_dir / rundir.LOGS)
    validation = None
    if world.is_root:
        validation = _validation_set(config, launch, show_progress)
    # The other ranks wait here while rank 0 prepares; a dead rank 0 ends the MPI job.
    # Every rank scales its model as rank 0 does: the field ranges come from rank 0's validation set.
    scaling = world.broadcast(
        scaling_for(config, validation.samples) if world.is_root else None,
        config.server.startup_timeout,
        "rank 0's validation set (server.startup_timeout)",
    )
    resume_from = latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        raise RuntimeError(f"{run_dir / rundir.CHECKPOINTS} holds no complete checkpoint to resume from")
    table = plan_simulations(config)
    if resume_from is not None:  # the simulations as checkpointed, the same on every rank
        records = checkpoint.read_meta(resume_from)["table"] if world.is_root else None
        table = SimulationTable.from_records(world.broadcast(records, config.server.startup_timeout, "the table"))
    progress = Progress(config.study.n_simulations * config.solver.n_steps, enabled=show_progress)
    try:
        if offline:  # the ensemble to disk, then epochs over it
            from jaxsurro.server.offline import train_offline

            result = train_offline(config, table, validation, scaling, run_dir, progress, launch, world)
        else:
            result = train_online(
                config,
                table,
                validation,
                scaling,
                run_dir,
                progress,
                launch,
                world,
                requests=requests,
                resume_from=resume_from,
            )
    except TrainingStopped as stopped:
        if world.is_root:  # the latest parameters and why the run ended, whatever ended it
            _write_model(config, run_dir, stopped.trainer)
            status = "interrupted" if isinstance(stopped.__cause__, KeyboardInterrupt | SystemExit) else "failed"
            summary = {
                "status": status,
                "reason": str(stopped.__cause__) or type(stopped.__cause__).__name__,
                "batches": stopped.steps,
                "wall_time_s": time.monotonic() - started,
                "run_dir": str(run_dir),
            }
            (run_dir / rundir.SUMMARY).write_text(metrics.dumps(summary, indent=2) + "\n")
        raise stopped.__cause__ from None
    finally:
        progress.close()
        if world.is_root:  # written even when the run fails or is interrupted: the table shows what happened
            table.write_csv(run_dir / rundir.SIMULATIONS, config.solver.parameter_names)
    if not world.is_root:
        return None
    _write_model(config, run_dir, result.trainer)
    summary = {"status": result.status, **result.summary}
    weights = [field.weight for field in config.solver.fields]
    summary["mean_field_validation_mse"] = validation_cache.mean_field_mse(validation, scaling, weights)
    summary["per_step_mean_field_validation_mse"] = validation_cache.per_step_mean_field_mse(
        validation, scaling, weights
    )
    summary["parameter_mean_validation_mse"] = validation_cache.parameter_mean_mse(validation, scaling, weights)
    summary["wall_time_s"] = time.monotonic() - started
    summary["run_dir"] = str(run_dir)
    (run_dir / rundir.SUMMARY).write_text(metrics.dumps(summary, indent=2) + "\n")
    return summary


def _write_model(config: Config, run_dir: Path, trainer: Trainer) -> None:
    """The surrogate's parameters and description, as jaxsurro.surrogate.load reads them."""
    (run_dir / rundir.PARAMS).write_bytes(trainer.params_bytes())
    (run_dir / rundir.MODEL).write_text(json.dumps(trainer.describe(config), indent=2) + "\n")


def _validation_set(config: Config, launch: LaunchFactory, show_progress: bool) -> ValidationSet:
    """The cached validation set, or a new one produced through the solver and cached."""
    from jaxsurro.server import validation as validation_cache
    from jaxsurro.server.ensemble import produce_validation_set
    from jaxsurro.server.progress import Progress

    validation = validation_cache.load_cached(config)
    if validation is not None:
        log.info("validation set loaded from %s", validation_cache.cache_path(config))
        return validation
    progress = Progress(config.train.n_validation * config.solver.n_steps, enabled=show_progress)
    try:
        validation = produce_validation_set(config, launch, progress)
    finally:
        progress.close()
    path = validation_cache.save(config, validation)
    log.info("validation set produced and cached in %s", path)
    return validation


def _abort_peers(code: int) -> None:
    """Under MPI, a rank that fails takes the whole server down: its peers may wait in a collective."""
    from jaxsurro.server.distributed import World

    world = World.detect()
    if world.distributed:
        sys.stderr.flush()
        world.comm.Abort(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.run", description=__doc__.splitlines()[0])
    add_config_arguments(parser, "experiment TOML file, e.g. experiments/heat.toml (with --resume: RUN_DIR)")
    parser.add_argument("--run-dir", type=Path, help="write here instead of a new directory under study.output_dir")
    parser.add_argument(
        "--resume", action="store_true", help="CONFIG is a run directory: continue that run from its latest checkpoint"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="what the server logs on the console (server.log always has info and above)",
    )
    args = parser.parse_args(argv)
    if args.resume and not rundir.resume_arguments(args):
        return 2
    config = config_from_args(args)
    if config is None:
        return 2
    if args.print_config:
        print(dumps(config), end="")
        return 0
    signals = Signals()
    signals.install()
    rundir.console_logging(getattr(logging, args.log_level.upper()))
    try:
        run_dir, summary = run(
            config, args.run_dir, show_progress=not args.no_progress, requests=signals.requests, resume=args.resume
        )
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
        return 128 + signals.signal if signals.signal else 0
    if summary["status"] == "interrupted":
        print(
            f"[jaxsurro] interrupted after {summary['batches']} batches: checkpoint, parameters and summary written; "
            f"continue with `python -m jaxsurro.run --resume {run_dir}`",
            file=sys.stderr,
        )
        return 128 + (signals.signal or signal.SIGTERM)
    print(
        f"[jaxsurro] finished {summary['simulations_finished']}/{summary['simulations_planned']} simulations, "
        f"{summary['unique_samples_received']} samples received, {summary['samples_trained']} trained; "
        f"validation MSE {summary['final_validation_mse']:.4g} (mean-field baseline "
        f"{summary['mean_field_validation_mse']:.4g}); {summary['wall_time_s']:.0f} s"
    )
    if summary["rejected"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(summary["rejected"].items()))
        print(
            f"[jaxsurro] rejected messages: {reasons} (the first of each is described in server.log)", file=sys.stderr
        )
    for sim_id, counts in summary["incomplete_simulations"].items():
        print(
            f"[jaxsurro] simulation {sim_id} ended incomplete: its FINISH reported {counts['finish_reported']} "
            f"time steps, the experiment expects {counts['expected']} (solver.n_steps)",
            file=sys.stderr,
        )
    print(f"[jaxsurro] run directory: {run_dir}")
    if summary["simulations_failed"]:
        print(
            f"[jaxsurro] {summary['simulations_failed']} simulation(s) failed every attempt; their output is "
            f"in {run_dir / 'logs'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
