"""jaxsurro: online training of neural surrogates from streamed ensemble runs.

Four sides, one package each: ``jaxsurro.core`` (the pure math), ``jaxsurro.client``
(the solver side: numpy and pyzmq only), ``jaxsurro.server`` (what runs in a server
rank) and ``jaxsurro.launcher`` (scheduler backends). Submodules load on first use, so
that ``from jaxsurro import client`` in a solver process never pulls in JAX.
"""

import importlib
import pkgutil

__version__ = "0.1.0"

_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__))


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jaxsurro' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
