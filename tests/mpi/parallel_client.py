"""MPI helper for tests/test_mpi_client.py: a parallel jaxsurro client with a chosen decomposition.

Run as ``mpirun -n 3 python tests/mpi/parallel_client.py MODE`` with the JAXSURRO_* variables set:

- ``columns``: rank 0 holds nothing (part=None), the others hold column slabs of a (ROWS, COLUMNS)
  field, so the root assembles boxes rather than gathering rows in place; value(t, i, j) is exact.
- ``overlap``: ranks 1 and 2 claim overlapping parts: every rank must raise ValueError.
- ``invalid``: rank 2 passes a complex array: it raises its own TypeError, the others a ValueError.
- ``stuck``: rank 1 never calls send() (it blocks in a barrier the others never join): the root must
  raise ClientRankTimeout within the client's timeout and abort the job.

Exits 0 on success; on an error prints ``rank R: ErrorType: message`` to stderr and exits 3.
"""

import sys

import numpy as np
from mpi4py import MPI

from jaxsurro import client

ROWS, COLUMNS, N_STEPS = 7, 10, 3
SPLIT = 4  # rank 1 owns columns [0, SPLIT), rank 2 the rest


def value(time_step: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The field every test checks: exact in float64."""
    return 1000.0 * time_step + 10.0 * rows[:, None] + columns[None, :] + 0.25


def part_of(rank: int, time_step: int, mode: str) -> tuple[np.ndarray | None, tuple[int, int]]:
    """This rank's part and its start in the global field."""
    if rank == 0:
        return None, (0, 0)
    first, last = (0, SPLIT) if rank == 1 else (SPLIT, COLUMNS)
    if mode == "overlap" and rank == 2:
        first -= 1  # one column also claimed by rank 1
    part = value(time_step, np.arange(ROWS), np.arange(first, last))
    if mode == "invalid" and rank == 2:
        part = part.astype(complex)
    return part, (0, first)


def main(mode: str) -> int:
    """Connect collectively, send N_STEPS steps with the mode's decomposition, finish."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if world.Get_size() != 3:
        raise SystemExit(f"run with mpirun -n 3, got {world.Get_size()} ranks")
    try:
        with client.connect(comm=world) as sim:
            for t in range(N_STEPS):
                if mode == "stuck" and rank == 1:
                    world.Barrier()  # never completes: the others are inside send()
                part, start = part_of(rank, t, mode)
                sim.send("temperature", t, part, start=start, global_shape=(ROWS, COLUMNS))
    except Exception as error:
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if isinstance(error, client.ClientRankTimeout):
            world.Abort(3)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
