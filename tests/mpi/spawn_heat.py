"""MPI helper for tests/test_mpi_client.py: each rank starts heat.py as a child, as a server's launcher does.

Run as ``mpirun -n 2 python tests/mpi/spawn_heat.py OUTPUT_STEM HEAT_ARGS...``: rank r runs
``python solvers/heat.py HEAT_ARGS... --output OUTPUT_STEM-r.npy`` with the rank's environment (its
MPI variables included) and exits with the child's status. The child must run serially.
"""

import subprocess
import sys
from pathlib import Path

from mpi4py import MPI

HEAT_PATH = Path(__file__).resolve().parents[2] / "solvers" / "heat.py"


def main(stem: str, heat_arguments: list[str]) -> int:
    """Run the child solver for this rank; its exit status."""
    rank = MPI.COMM_WORLD.Get_rank()
    command = [sys.executable, str(HEAT_PATH), *heat_arguments, "--output", f"{stem}-{rank}.npy"]
    return subprocess.run(command, timeout=30, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
