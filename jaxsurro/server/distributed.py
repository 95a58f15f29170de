"""The server's ranks: who they are and how they agree, over MPI or alone.

One server is R processes (``mpirun -n R`` or ``srun -n R``); outside MPI it is one.
:class:`World` wraps the communicator: host-side agreement uses non-blocking MPI
calls polled against a deadline, so that no wait can hang silently, and the
gradient reduction inside the jitted step uses mpi4jax (:func:`gradient_allreduce`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from jaxsurro.client import settings as client_settings

log = logging.getLogger("jaxsurro.server.distributed")

POLL_INTERVAL = 0.0005  # seconds between tests of a pending non-blocking MPI request
STEADY_POLL_SECONDS = 0.05  # tests stay POLL_INTERVAL apart this long, then back off up to 0.02 s


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process as one of several ranks (so importing mpi4py is wanted).

    The rule the solvers follow too: :func:`jaxsurro.client.settings.launched_by_mpi`.
    """
    return client_settings.launched_by_mpi(os.environ)


class CollectiveTimeout(TimeoutError):
    """A rank did not join a collective in time: it is stuck or dead."""


@dataclasses.dataclass
class World:
    """This rank and its peers; ``comm`` is None for a single-process server."""

    comm: Any = None  # mpi4py.MPI.Comm
    rank: int = 0
    size: int = 1

    @classmethod
    def detect(cls) -> World:
        """COMM_WORLD when started by an MPI launcher, else a world of one (mpi4py is not imported)."""
        if not launched_by_mpi():
            return cls()
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        return cls(comm, comm.Get_rank(), comm.Get_size())

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- host-side collectives, each with a deadline ---------------------------------------
    def _wait(self, request: Any, timeout: float, what: str) -> None:
        # MPI progresses the request only while it is tested, so the pause between tests is the
        # exchange's latency: ranks in step (a lockstep iteration) agree within one POLL_INTERVAL,
        # and only a wait longer than STEADY_POLL_SECONDS (a rank validating, checkpointing) backs off.
        started = time.monotonic()
        deadline = started + timeout
        pause = POLL_INTERVAL
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                raise CollectiveTimeout(
                    f"rank {self.rank}: no agreement on {what} within {timeout:.0f} s; a peer "
                    f"rank is stuck or dead (see its log)"
                )
            time.sleep(pause)
            if now - started > STEADY_POLL_SECONDS:
                pause = min(pause * 2, 0.02)  # little CPU when one rank waits long

    def sum(self, values: np.ndarray, timeout: float, what: str) -> np.ndarray:
        """Element-wise sum of an int64 or float64 vector over the ranks."""
        values = np.ascontiguousarray(values)
        if not self.distributed:
            return values.copy()
        from mpi4py import MPI

        total = np.empty_like(values)
        self._wait(self.comm.Iallreduce(values, total, op=MPI.SUM), timeout, what)
        return total

    def broadcast(self, value: Any, timeout: float, what: str) -> Any:
        """The root's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        self._wait(self.comm.Ibarrier(), timeout, what)  # everyone is here: the blocking bcast cannot hang
        return self.comm.bcast(value, root=0)

    def gather(self, value: Any, timeout: float, what: str) -> list[Any] | None:
        """Every rank's ``value`` on the root, in rank order (None elsewhere)."""
        if not self.distributed:
            return [value]
        self._wait(self.comm.Ibarrier(), timeout, what)
        return self.comm.gather(value, root=0)

    def allgather(self, value: Any, timeout: float, what: str) -> list[Any]:
        if not self.distributed:
            return [value]
        self._wait(self.comm.Ibarrier(), timeout, what)
        return self.comm.allgather(value)


def gradient_allreduce(world: World):
    """The train step's ``reduce_fn``: sums (grads, loss, weight) over the ranks inside the jitted step.

    Each rank contributes the sums over its own batch, so a rank with an empty batch
    (weight 0) contributes nothing. The sums travel as one flat vector, reduced on rank 0
    and broadcast: every rank receives the very same bits (an all-reduce may add in a
    different order on different ranks), applies the same update, and the parameters stay
    bitwise identical.
    """
    if not world.distributed:
        return None
    import mpi4jax
    from jax.flatten_util import ravel_pytree
    from mpi4py import MPI

    # Its own communicator: the host-side agreement on world.comm must never pair with these calls.
    comm = world.comm.Clone()

    def reduce(sums):
        flat, unravel = ravel_pytree(sums)
        total = mpi4jax.reduce(flat, op=MPI.SUM, root=0, comm=comm)
        return unravel(mpi4jax.bcast(total, root=0, comm=comm))

    return reduce
