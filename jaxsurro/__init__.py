"""jaxsurro: online training of neural surrogates from streamed ensemble runs.

Submodules load on first use (``jaxsurro.reservoir``, ``jaxsurro.train``...), so that
``from jaxsurro import client`` in a solver process never pulls in JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = frozenset({
    "buffers", "cli", "client", "config", "distributed", "launcher", "model", "online", "parallel",
    "parallel_client", "plot", "progress", "protocol", "receiver",
    "reservoir", "run", "sampling", "server", "train", "trainer", "validation",
})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jaxsurro' has no attribute {name!r}")
