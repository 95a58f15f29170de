"""What the solvers' command lines share: argument checks, argparse types, the client, trajectory files.

``solvers/`` is a folder of standalone programs (``heat.py``, ``burgers.py``), not a package: each finds
this module next to itself, run as a script or imported by path. It needs only numpy; jaxsurro is
imported only when a solver runs as a client (``client_module``).
"""

import argparse
import functools
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# ----------------------------------------------------------------------------- checks of function arguments


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a finite float > 0, or raise an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r} of type {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and result > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {result!r}")
    return result


def check_vector(values: ArrayLike, length: int, name: str, labels: Sequence[str]) -> np.ndarray:
    """Return ``values`` as a finite float64 vector of ``length`` entries, or raise a clear error."""
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be {length} numbers ({', '.join(labels)}), got {values!r}") from error
    if vector.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) ordered ({', '.join(labels)}), got shape {vector.shape}")
    if not np.all(np.isfinite(vector)):
        bad = [label for label, value in zip(labels, vector) if not math.isfinite(value)]
        raise ValueError(f"{name} must be finite; non-finite entries: {', '.join(bad)} in {vector.tolist()}")
    return vector


def read_only(array: np.ndarray) -> np.ndarray:
    """Mark ``array`` read-only (a solver shares it through its stepper cache) and return it."""
    array.flags.writeable = False
    return array


# ----------------------------------------------------------------------------- the command line


def parse_count(text: str, minimum: int = 1) -> int:
    """argparse type: an integer >= ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def parse_finite(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def parse_positive(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = parse_finite(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def solver_parser(
    prog: str, description: str, parameter_names: Sequence[str], parameters: str, summarised: str, example: str
) -> argparse.ArgumentParser:
    """A solver's parser with ``--parameters`` (``parameters`` says what they are); the epilog says that
    a run without ``--output`` or ``--client`` prints a summary of the final ``summarised``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Without --output or --client, prints a one-line summary of the final {summarised}. Example: {example}",
    )
    parser.add_argument(
        "--parameters",
        nargs=len(parameter_names),
        type=parse_finite,
        metavar=tuple(parameter_names),
        help=f"{parameters}; required unless --client (then the server provides them)",
    )
    return parser


def add_count_argument(
    parser: argparse.ArgumentParser, flag: str, metavar: str, default: int, what: str, minimum: int = 1
) -> None:
    """An option taking an integer >= ``minimum``; ``what`` starts its help."""
    parser.add_argument(
        flag,
        type=functools.partial(parse_count, minimum=minimum),
        default=default,
        metavar=metavar,
        help=f"{what}, an integer >= {minimum} (default {default})",
    )


def add_positive_argument(parser: argparse.ArgumentParser, flag: str, default: float, what: str) -> None:
    """An option taking a finite number > 0; ``what`` starts its help."""
    parser.add_argument(flag, type=parse_positive, default=default, help=f"{what}, > 0 (default {default})")


def add_time_arguments(
    parser: argparse.ArgumentParser, default_steps: int, default_dt: float, steps: str, dt: str
) -> None:
    """``--steps T`` and ``--dt``; ``steps`` and ``dt`` name them in the help ("time steps", "time step")."""
    add_count_argument(parser, "--steps", "T", default_steps, f"number of {steps}")
    add_positive_argument(parser, "--dt", default_dt, dt)


def add_output_arguments(parser: argparse.ArgumentParser, trajectory: str, parameters: str, sent: str) -> None:
    """``--output FILE.npy`` (which writes ``trajectory``) and ``--client`` (which takes ``parameters``
    from the server and sends it ``sent``)."""
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.npy",
        help=f"write the {trajectory} to this .npy file; nothing is written unless given",
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help=f"run as a jaxsurro client: take {parameters} from the training server (settings from the "
        f"launcher's environment variables) and send {sent}, t = 0..T-1",
    )


def check_parameters_source(parser: argparse.ArgumentParser, args: argparse.Namespace, expected: str) -> None:
    """Exactly one source of parameters: ``--parameters`` (``expected`` says what they are) or ``--client``."""
    if args.client:
        if args.parameters is not None:
            parser.error("argument --parameters: not allowed with --client (the server provides the parameters)")
        if args.output is not None:
            parser.error("argument --output: not allowed with --client (the fields go to the server)")
    elif args.parameters is None:
        parser.error(f"argument --parameters: required ({expected}) unless --client is given")


def check_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--output``, when given, names a file in a directory that exists."""
    if args.output is None:
        return
    directory = args.output.parent if str(args.output.parent) else Path(".")
    if not directory.is_dir():
        parser.error(f"argument --output: directory {str(directory)!r} does not exist; create it first")
    if args.output.is_dir():
        parser.error(f"argument --output: {str(args.output)!r} is a directory; give a file name")


def client_module(program: str, needed_for: str = "--client", instead: str = "run without --client") -> Any:
    """jaxsurro.client, or a clear exit naming ``program`` when the package is not installed."""
    try:
        from jaxsurro import client
    except ModuleNotFoundError as error:
        if error.name not in ("jaxsurro", "jaxsurro.client"):
            raise
        raise SystemExit(
            f"{program} {needed_for} needs the jaxsurro package ({error}); install it with "
            f"`pip install -e .` in the repository, or {instead}"
        ) from error
    return client


def write_trajectory(path: Path, steps: Iterable[Any], shape: tuple[int, ...]) -> None:
    """Write each step's fields as ``trajectory[t]`` of a float64 ``shape`` array to ``path`` (.npy), atomically.

    The steps are written one by one into a memory-mapped temporary file next to ``path``, which
    replaces ``path`` once complete; on any error it is removed and ``path`` is left as it was.
    """
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        trajectory = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float64, shape=shape)
        for t, fields in enumerate(steps):
            trajectory[t] = fields
        trajectory.flush()
        del trajectory
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
