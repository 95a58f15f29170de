"""The heat solver as a client that crashes on its first attempt for some simulations.

Used by the end-to-end tests: on attempt 1, simulations whose id is a multiple of 3
send half of their time steps, print a message and die without FINISH, as a solver
killed mid-run would. Their restart sends every step again; the server must count
each time step once.
"""

import importlib.util
import os
import sys
from pathlib import Path

from jaxsurro import client

spec = importlib.util.spec_from_file_location("heat", Path(__file__).resolve().parents[2] / "solvers" / "heat.py")
heat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heat)

grid_size, n_steps = int(sys.argv[1]), int(sys.argv[2])
attempt = int(os.environ["JAXSURRO_ATTEMPT"])
with client.connect() as sim:
    crash = attempt == 1 and sim.sim_id % 3 == 0
    for t, field in enumerate(heat.simulate(sim.parameters, grid_size, n_steps)):
        if crash and t == n_steps // 2:
            print(f"boom: simulated crash of simulation {sim.sim_id} at step {t}", flush=True)
            os._exit(3)
        sim.send("temperature", t, field)
