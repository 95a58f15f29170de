"""Solver-side API: stream each time step of a simulation to the jaxsurro training server over ZeroMQ.

Light on purpose (numpy and pyzmq only, never JAX or mpi4py) so solver processes start fast::

    from jaxsurro import client
    with client.connect() as sim:                 # HELLO/WELCOME with the server
        for t, field in enumerate(simulate(sim.parameters)):
            sim.send("temperature", t, field)     # blocks while the server's buffer is full
    # leaving the block sends FINISH to every server rank and waits until all data is delivered

Settings come from the environment variables the launcher sets (ENV_* below) or explicit arguments.
The wire format is in jaxsurro.protocol and docs/protocol.md; the client's place in the whole is in
docs/architecture.md, sections "Four sides" and "Data path".

MPI-parallel solvers pass their mpi4py communicator; every rank sends the block it owns and where it
lies in the global field, and the client's root (rank 0 of `comm`) assembles the whole field::

    with client.connect(comm=comm) as sim:       # collective; only rank 0 speaks to the server
        for t, block in enumerate(my_blocks(sim.parameters)):   # parameters on every rank
            sim.send("temperature", t, block, start=(i0, j0), global_shape=(M, N))  # collective

- Any block decomposition works: the parts must tile the global field exactly once (checked once per
  layout; a rank owning nothing passes None or an empty block). Rank-ordered slabs along axis 0 are
  gathered (MPI Gatherv) straight into the field, other layouts with one extra copy at the root.
- The server sees one ordinary client: whole fields, one HELLO, one FINISH per server rank.
- Errors at the root (settings, unreachable or refusing server, backpressure timeout, a bad
  decomposition) are broadcast, so every rank raises the same exception class; a rank's own bad
  arguments raise on that rank. No rank waits forever: every MPI wait is non-blocking and polled
  against a deadline derived from the timeout, past which ClientRankTimeout (a TimeoutError) is raised.
  After ClientRankTimeout a collective may be left pending: end the job (comm.Abort()).
- send() and finish() are collective; leaving the `with` block through an exception is local (the root
  closes without FINISH). mpi4py is never imported here: the communicator's own methods are used.

A persistent client runs simulations one after another as the server hands them out
(``JAXSURRO_SIM_ID=any``, docs/protocol.md section 9); the same loop runs the one simulation a
launcher named otherwise, so one solver code serves both::

    for sim in client.simulations(fields={"u": (128,)}):   # until the server has none left
        for t, u in enumerate(solve(sim.parameters)):
            sim.send("u", t, u)

Modules: :mod:`jaxsurro.client.settings` (settings, errors, argument checks, MPI detection),
:mod:`jaxsurro.client.simulation` (the single-process client), :mod:`jaxsurro.client.parallel` (the
MPI-parallel client, loaded only for a communicator of more than one rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from jaxsurro import protocol
from jaxsurro.client.settings import (
    ANY_SIMULATION,
    DEFAULT_TIMEOUT,
    DEFAULT_WIRE_DTYPE,
    ENV_ATTEMPT,
    ENV_CLIENT_ID,
    ENV_SERVER,
    ENV_SERVER_KEY,
    ENV_SIM_ID,
    ENV_TIMEOUT,
    ENV_TOKEN,
    ENV_WIRE_DTYPE,
    ClientConfigurationError,
    ServerUnreachable,
    Settings,
    SimulationRejected,
    launched_by_mpi,
    resolve_settings,
)
from jaxsurro.client.simulation import (
    ABORT_LINGER,
    SEND_HIGH_WATER_MARK,
    Simulation,
    SimulationContext,
    process_client_id,
)

if TYPE_CHECKING:
    from jaxsurro.client.parallel import ParallelSimulation

# The MPI-parallel client's public names, loaded on first use (see __getattr__).
_PARALLEL_NAMES = ("AssemblyPlan", "ClientRankTimeout", "MPI_MAX_ELEMENTS", "ParallelSimulation", "plan_assembly")

__all__ = [
    "ABORT_LINGER",
    "ANY_SIMULATION",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WIRE_DTYPE",
    "ENV_ATTEMPT",
    "ENV_CLIENT_ID",
    "ENV_SERVER",
    "ENV_SERVER_KEY",
    "ENV_SIM_ID",
    "ENV_TIMEOUT",
    "ENV_TOKEN",
    "ENV_WIRE_DTYPE",
    "SEND_HIGH_WATER_MARK",
    "ClientConfigurationError",
    "ServerUnreachable",
    "Settings",
    "Simulation",
    "SimulationRejected",
    "connect",
    "launched_by_mpi",
    "process_client_id",
    "resolve_settings",
    "simulations",
    *_PARALLEL_NAMES,
]

_COMMUNICATOR_METHODS = ("Get_rank", "Idup", "Igatherv", "Ibcast")


def connect(
    server: str | None = None,
    token: bytes | str | None = None,
    sim_id: int | None = None,
    timeout: float | None = None,
    wire_dtype: Any = None,
    comm: Any = None,
    fields: Any = None,
) -> Simulation | ParallelSimulation:
    """Say HELLO to the server, receive the simulation's parameters and data addresses; use as `with`.

    `fields` declares every field of a time step and its shape, e.g. ``{"u": (128,), "dudx": (128,)}``
    (``()`` for a scalar): the server then refuses at once a declaration that differs from the
    experiment's, naming the field, and send() refuses an undeclared field or shape. Without it the
    server checks each message. Arguments override the environment variables ENV_*.
    Raises ServerUnreachable when no answer comes
    within `timeout` seconds, SimulationRejected when the server refuses. With `comm`, an mpi4py
    communicator of more than one rank, it is collective: every rank calls it, rank 0 of `comm` alone
    talks to the server, and every rank gets a ParallelSimulation with the same parameters, or raises
    the root's error (see the module docstring). None or a one-rank communicator: a plain Simulation.
    """

    def open_simulation() -> Simulation:
        return Simulation.open(resolve_settings(server, token, sim_id, timeout, wire_dtype, fields=fields))

    if comm is not None:
        size = comm.Get_size() if hasattr(comm, "Get_size") else None
        if size is None or (size > 1 and not all(hasattr(comm, name) for name in _COMMUNICATOR_METHODS)):
            raise TypeError(f"comm must be an mpi4py intracommunicator such as mpi4py.MPI.COMM_WORLD, got {comm!r}")
        if size > 1:
            from jaxsurro.client import parallel

            return parallel.connect_parallel(comm, timeout, open_simulation)
    return open_simulation()


def simulations(
    server: str | None = None,
    token: bytes | str | None = None,
    sim_id: int | None = None,
    timeout: float | None = None,
    wire_dtype: Any = None,
    comm: Any = None,
    fields: Any = None,
) -> Iterator[SimulationContext]:
    """The simulations this process is to run, each connected, yielded, then finished (FINISH, delivery).

    With the simulation id ANY (``JAXSURRO_SIM_ID=any``: a persistent client) each iteration says HELLO
    for any simulation and the loop ends when the server answers ``no_simulation_left``; with a
    concrete id it runs that one simulation. Leaving the loop early (an exception, ``break``) aborts the
    current simulation without FINISH, so the server runs it again. Arguments as for :func:`connect`;
    with ``comm`` every rank iterates together (each connect is collective).
    """
    settings = resolve_settings(server, token, sim_id, timeout, wire_dtype, fields=fields)
    if settings.sim_id != ANY_SIMULATION:
        with connect(server, token, settings.sim_id, timeout, wire_dtype, comm, fields) as simulation:
            yield simulation
        return
    while True:
        try:
            simulation = connect(server, token, ANY_SIMULATION, timeout, wire_dtype, comm, fields)
        except SimulationRejected as rejected:
            if rejected.reason == protocol.NO_SIMULATION_LEFT:
                return
            raise
        with simulation:
            yield simulation


def __getattr__(name: str) -> Any:
    """The MPI-parallel client's public names, loaded on first use (jaxsurro.client.parallel)."""
    if name in _PARALLEL_NAMES:
        from jaxsurro.client import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module 'jaxsurro.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PARALLEL_NAMES))
