"""The heat solver as a client that sends only the time steps routed to server rank 0.

With two server ranks, time step t of simulation j goes to rank (j + t) mod 2, so this
client starves rank 1 completely: the server must still train and end without deadlock.
"""

import importlib.util
import sys
from pathlib import Path

from jaxsurro import client

spec = importlib.util.spec_from_file_location("heat", Path(__file__).resolve().parents[2] / "solvers" / "heat.py")
heat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heat)

grid_size, n_steps = int(sys.argv[1]), int(sys.argv[2])
with client.connect() as sim:
    for t, field in enumerate(heat.simulate(sim.parameters, grid_size, n_steps)):
        if (sim.sim_id + t) % sim.n_ranks == 0:
            sim.send("temperature", t, field)
