"""The server's ensemble: simulations launched on rank 0, their data received on every rank.

:class:`Ensemble` couples a launcher (which runs the simulations) with a receiver per
server rank (which takes their messages into a sink). :func:`produce_validation_set`
uses one to collect whole trajectories; :mod:`jaxsurro.online` uses one to feed the
host buffers while the trainer learns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxsurro import client, protocol
from jaxsurro.config import Config
from jaxsurro.distributed import World
from jaxsurro.launcher import (
    JobSpec,
    Launcher,
    SimState,
    SimulationTable,
    make_scheduler,
)
from jaxsurro.progress import Progress
from jaxsurro.receiver import Receiver, Sink, ValidationSink
from jaxsurro.sampling import BoxSampler
from jaxsurro.validation import ValidationSet, validation_parameters

log = logging.getLogger("jaxsurro.server")

ENV_ATTEMPT = "JAXSURRO_ATTEMPT"  # 1 for a simulation's first run, 2 for its first restart...
WAIT_SLICE = 0.5  # seconds between liveness checks while waiting for data


class StallError(RuntimeError):
    """Nothing arrived for longer than the configured timeout."""


def job_factory(config: Config, token: bytes, control_address: str, log_dir: Path,
                label: str) -> Callable[[int, int], JobSpec]:
    """Builds the job of one simulation attempt: the solver command with the client's settings."""
    argv = tuple(config.solver.argv())
    base_env = {
        client.ENV_SERVER: control_address,
        client.ENV_TOKEN: token.hex(),
        client.ENV_TIMEOUT: repr(config.server.client_timeout),
        client.ENV_WIRE_DTYPE: config.solver.wire_dtype,
    }

    def job_for(sim_id: int, attempt: int) -> JobSpec:
        return JobSpec(name=f"{config.study.name}-{label}-{sim_id}", argv=argv,
                       env={**base_env, client.ENV_SIM_ID: str(sim_id), ENV_ATTEMPT: str(attempt)},
                       log_path=log_dir / f"{label}-{sim_id:05d}.log", cwd=Path.cwd())

    return job_for


class Ensemble:
    """A launcher running a table of simulations and, on every server rank, a receiver taking their data.

    The launcher lives on rank 0 only; every rank receives the time steps routed to it.
    """

    def __init__(self, config: Config, table: SimulationTable, sink: Sink, log_dir: Path, label: str,
                 world: World | None = None, on_done: Callable[[], None] | None = None):
        self.config = config
        self.table = table
        self.world = world or World()
        token = protocol.new_token() if self.world.is_root else None  # one credential per ensemble
        self.token = self.world.broadcast(token, config.server.startup_timeout, "the run token")
        n_simulations = len(table)
        self.receiver = Receiver(
            table=table, sink=sink, token=self.token, field=config.solver.field,
            field_shape=config.solver.field_shape, wire_dtype=config.solver.wire_dtype,
            n_steps=config.solver.n_steps, host=config.server.host, rank=self.world.rank, n_ranks=self.world.size,
            # Rank 0 knows which simulations were submitted; the others accept any simulation of the study.
            known_simulations=None if self.world.is_root else (lambda sim_id: 0 <= sim_id < n_simulations))
        self.receiver.addresses = tuple(self.world.allgather(
            self.receiver.data_address, config.server.startup_timeout, "the ranks' data addresses"))
        self.launcher = None
        if self.world.is_root:
            self.launcher = Launcher(
                table, make_scheduler(config.launcher.scheduler, config.launcher.client_options,
                                      config.launcher.slurm_mode),
                job_factory(config, self.token, self.receiver.control_address, log_dir, label),
                max_concurrent=config.launcher.max_concurrent, max_attempts=config.launcher.max_attempts,
                poll_interval=config.launcher.poll_interval, output_tail_lines=config.launcher.output_tail_lines,
                finish_grace=config.server.client_timeout, on_done=on_done)

    def __enter__(self) -> Ensemble:
        self.receiver.start()
        if self.launcher is not None:
            self.launcher.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.launcher is not None:
                self.launcher.shutdown()
        finally:
            self.receiver.stop()

    @property
    def done(self) -> bool:
        """Rank 0: whether every simulation has ended. Other ranks: always False (they are told)."""
        return self.launcher is not None and self.launcher.done.is_set()

    def poll(self) -> None:
        """Raises what stopped a thread, or a reception that stalled (rank 0, which hears every client)."""
        self.receiver.check()
        if self.launcher is None:
            return
        self.launcher.check()
        quiet = time.monotonic() - self.receiver.last_message_at
        if not self.done and quiet > self.config.server.receive_timeout:
            raise StallError(f"no message from any client for {quiet:.0f} s (server.receive_timeout = "
                             f"{self.config.server.receive_timeout:.0f} s); simulations: {self.table.counts()}; "
                             "see the simulation logs in the run directory")

    def status(self) -> dict[str, int]:
        counts = self.table.counts()
        running = counts["submitted"] + counts["exited"]
        return {"running": running, "done": counts["completed"], "failed": counts["failed"]}


def produce_validation_set(config: Config, log_dir: Path, progress: Progress) -> ValidationSet:
    """Runs the validation simulations through the same solver and client path and collects them.

    Called on rank 0 alone: the validation ensemble has a single receiving rank.
    """
    parameters = validation_parameters(config)
    table = SimulationTable(parameters)
    sink = ValidationSink(len(table), config.solver.n_steps, config.solver.field_shape)
    with Ensemble(config, table, sink, log_dir, "validation") as ensemble:
        while not ensemble.launcher.done.wait(WAIT_SLICE):
            ensemble.poll()
            progress.update(ensemble.receiver.unique_received,
                            {"validation sims done": f"{ensemble.status()['done']}/{len(table)}"})
        ensemble.poll()
    failed = [r for r in table if r.state != SimState.COMPLETED]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{len(failed)} validation simulation(s) did not complete (simulation {first.sim_id}: "
                           f"{first.state.value}, {first.error or 'no error recorded'}); see {log_dir}")
    missing = ensemble.receiver.stored.size - int(ensemble.receiver.stored.sum())
    if missing:
        raise RuntimeError(f"the validation simulations completed but {missing} time steps never arrived")
    return ValidationSet(parameters, sink.fields)


def plan_simulations(config: Config) -> SimulationTable:
    """The study's simulation table, parameters drawn by the configured sampler (the same on every rank)."""
    solver = config.solver
    kind = config.breed.base_sampler if config.sampler.kind == "breed" else config.sampler.kind
    sampler = BoxSampler(kind, solver.low, solver.high, config.sampler_seed)
    return SimulationTable(sampler.draw(config.study.n_simulations))
