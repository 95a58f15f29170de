"""The heat solver as a client with the faults the launcher's supervision must catch.

Usage: faulty_heat.py GRID_SIZE N_STEPS [--hang IDS] [--short IDS] [--refuse-above T0] [--refuse-after K]
[--stamps DIR]

- ``--hang 1,4``: on attempt 1, these simulations send 3 time steps, then hang (sleep for ten
  minutes, inside the client's block, sockets open), as a solver stuck in a deadlock would.
- ``--short 2``: on attempt 1, these simulations send 5 time steps and leave the client's block
  normally: their FINISH reports 5 steps and the process exits with 0.
- ``--refuse-above 450``: every attempt of a simulation whose first parameter (T0) is above 450
  sends ``--refuse-after`` steps (default 0), prints a message and exits with 4, as a solver that
  diverges in part of the parameter space would.
- ``--stamps DIR``: after its last send before hanging, a simulation writes
  ``DIR/hung-<sim>-<attempt>`` holding its pid and the wall-clock time of that send.
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from jaxsurro import client

spec = importlib.util.spec_from_file_location("heat", Path(__file__).resolve().parents[2] / "solvers" / "heat.py")
heat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heat)


def ids(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part}


parser = argparse.ArgumentParser()
parser.add_argument("grid_size", type=int)
parser.add_argument("n_steps", type=int)
parser.add_argument("--hang", type=ids, default=set())
parser.add_argument("--short", type=ids, default=set())
parser.add_argument("--refuse-above", type=float, default=float("inf"))
parser.add_argument("--refuse-after", type=int, default=0)
parser.add_argument("--stamps", type=Path)
args = parser.parse_args()
attempt = int(os.environ["JAXSURRO_ATTEMPT"])

with client.connect() as sim:
    refuse = sim.parameters[0] > args.refuse_above
    hang = attempt == 1 and sim.sim_id in args.hang
    short = attempt == 1 and sim.sim_id in args.short
    for t, field in enumerate(heat.simulate(sim.parameters, args.grid_size, args.n_steps)):
        if refuse and t == args.refuse_after:
            print(f"T0 = {sim.parameters[0]:.1f} is above {args.refuse_above}: diverged at step {t}", flush=True)
            sys.exit(4)
        if short and t == 5:
            print(f"simulation {sim.sim_id} stops early after {t} steps", flush=True)
            break
        sim.send("temperature", t, field)
        if hang and t == 2:
            if args.stamps is not None:
                (args.stamps / f"hung-{sim.sim_id}-{attempt}").write_text(f"{os.getpid()} {time.time()!r}\n")
            print(f"simulation {sim.sim_id} hangs after step {t}", flush=True)
            time.sleep(600)
