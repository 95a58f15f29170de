"""The server's ensemble: simulations launched on rank 0, their data received on every rank.

:class:`Ensemble` couples a launcher (which runs the simulations) with a receiver per
server rank (which takes their messages into a sink). :func:`produce_validation_set`
uses one to collect whole trajectories; :mod:`jaxsurro.server.online` uses one to feed the
host buffers while the trainer learns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import zmq

from jaxsurro import protocol
from jaxsurro.config import Config
from jaxsurro.server.distributed import World
from jaxsurro.server.progress import Progress
from jaxsurro.server.receiver import Receiver, Sink, ValidationSink
from jaxsurro.server.validation import ValidationSet, validation_parameters
from jaxsurro.table import SimState, SimulationTable

log = logging.getLogger("jaxsurro.server.ensemble")

WAIT_SLICE = 0.5  # seconds between liveness checks while waiting for data


class StallError(RuntimeError):
    """Nothing arrived for longer than the configured timeout."""


class Launching(Protocol):
    """What the server needs of a launcher: run the table's simulations from a background thread."""

    done: threading.Event  # set once every simulation of the table has ended

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def check(self) -> None: ...


class ClientAccess(NamedTuple):
    """What a client needs to reach this ensemble's server: where, the run token, and with
    ``server.encryption = "curve"`` the server's public key (Z85, 40 characters)."""

    control_address: str
    token: bytes
    server_key: bytes | None = None


# (table, access, label) -> a launcher for that table's simulations, whose clients reach the server
# with ``access``. Built by the entry point.
LaunchFactory = Callable[[SimulationTable, ClientAccess, str], Launching]


class Ensemble:
    """A launcher running a table of simulations and, on every server rank, a receiver taking their data.

    The launcher lives on rank 0 only; every rank receives the time steps routed to it.
    """

    def __init__(
        self,
        config: Config,
        table: SimulationTable,
        sink: Sink,
        label: str,
        launch: LaunchFactory,
        world: World | None = None,
    ):
        self.config = config
        self.table = table
        self.world = world or World()
        token = protocol.new_token() if self.world.is_root else None  # one credential per ensemble
        self.token = self.world.broadcast(token, config.server.startup_timeout, "the run token")
        # The key of the per-attempt credentials: shared by the server's ranks, never sent to a client.
        secret = protocol.new_secret() if self.world.is_root else None
        secret = self.world.broadcast(secret, config.server.startup_timeout, "the credential secret")
        # server.encryption = "curve": one key pair per ensemble, the secret half on the server's ranks only.
        keys = None
        if config.server.encryption == "curve":
            if not zmq.has("curve"):
                raise RuntimeError(
                    'server.encryption = "curve" needs a libzmq built with CURVE (libsodium); this pyzmq\'s '
                    f'libzmq {zmq.zmq_version()} has none. Install pyzmq\'s wheel, or set server.encryption = "none"'
                )
            keys = zmq.curve_keypair() if self.world.is_root else None
            keys = self.world.broadcast(keys, config.server.startup_timeout, "the CURVE key pair")
        n_simulations = len(table)
        self.receiver = Receiver.from_config(
            config,
            table,
            sink,
            self.token,
            secret,
            curve_secret_key=None if keys is None else keys[1],
            rank=self.world.rank,
            n_ranks=self.world.size,
            # Rank 0 knows which simulations were submitted; the others accept any simulation of the study.
            known_simulations=None if self.world.is_root else (lambda sim_id: 0 <= sim_id < n_simulations),
        )
        self.receiver.addresses = tuple(
            self.world.allgather(
                protocol.join_endpoints(self.receiver.data_endpoints),
                config.server.startup_timeout,
                "the ranks' data addresses",
            )
        )
        self.launcher = None
        if self.world.is_root:
            access = ClientAccess(self.receiver.control_address, self.token, None if keys is None else keys[0])
            self.launcher = launch(table, access, label)

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
        """Raises what stopped a thread, or a reception that stalled (rank 0, which hears every client).

        The stall clock runs only while a simulation runs, from the later of the last message and the
        latest start: clients queued for long on a busy cluster are not a stall. (A single hung
        client is the launcher's to cancel, after its silence limit.)
        """
        self.receiver.check()
        if self.launcher is None:
            return
        self.launcher.check()
        if self.done or not self.table.running:
            return
        quiet = time.monotonic() - max(self.receiver.counters().last_message_at, self.table.last_start)
        if quiet > self.config.server.receive_timeout:
            raise StallError(
                f"no message from any client for {quiet:.0f} s while simulations run (server.receive_timeout = "
                f"{self.config.server.receive_timeout:.0f} s); simulations: {self.table.counts()}; "
                "see the simulation logs in the run directory"
            )

    def status(self) -> dict[str, int]:
        counts = self.table.counts()
        running = counts["submitted"] + counts["exited"]
        return {"running": running, "done": counts["completed"], "failed": counts["failed"]}


def produce_validation_set(config: Config, launch: LaunchFactory, progress: Progress) -> ValidationSet:
    """Runs the validation simulations through the same solver and client path and collects them.

    Called on rank 0 alone: the validation ensemble has a single receiving rank.
    """
    parameters = validation_parameters(config)
    table = SimulationTable(parameters)
    sink = ValidationSink(len(table), config.solver.n_steps, config.solver.sample_size)
    with Ensemble(config, table, sink, "validation", launch) as ensemble:
        while not ensemble.launcher.done.wait(WAIT_SLICE):
            ensemble.poll()
            progress.update(
                ensemble.receiver.counters().unique_received,
                {"validation sims done": f"{ensemble.status()['done']}/{len(table)}"},
            )
        ensemble.poll()
    failed = [r for r in table if r.state != SimState.COMPLETED]
    if failed:
        first = failed[0]
        raise RuntimeError(
            f"{len(failed)} validation simulation(s) did not complete (simulation {first.sim_id}: "
            f"{first.state.value}, {first.error or 'no error recorded'}); see the simulation logs"
        )
    missing = ensemble.receiver.stored.size - int(ensemble.receiver.stored.sum())
    if missing:
        raise RuntimeError(f"the validation simulations completed but {missing} time steps never arrived")
    return ValidationSet(parameters, sink.samples)
