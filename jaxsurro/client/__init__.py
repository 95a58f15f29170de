"""Solver-side API (numpy and pyzmq only, never JAX): stream a simulation's time steps to the server."""

from jaxsurro.client.simulation import *  # noqa: F403  (interim: split into settings/simulation/parallel)
from jaxsurro.client.simulation import __getattr__  # noqa: F401
