"""A Burgers client that also streams a field the experiment does not declare (for the mismatch tests).

Usage: extra_field.py POINTS STEPS DT {declare|undeclared}: ``declare`` declares the extra field
at HELLO (the server refuses at once); ``undeclared`` declares nothing and sends it anyway.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "solvers"))
import burgers

from jaxsurro import client

points, steps, dt, mode = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
fields = {"u": (points,), "dudx": (points,), "bogus": (points,)} if mode == "declare" else None
with client.connect(fields=fields) as sim:
    for t, (u, dudx) in enumerate(burgers.simulate(sim.parameters, points, steps, dt)):
        sim.send("u", t, u)
        sim.send("dudx", t, dudx)
        sim.send("bogus", t, np.zeros(points))
