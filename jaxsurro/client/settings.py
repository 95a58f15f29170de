"""What every client module shares: settings, errors, the checks of send()'s arguments, MPI detection.

Numpy only (no sockets, no JAX, no mpi4py). Settings come from explicit arguments, else the
environment variables the launcher sets for every solver it starts (ENV_* below, docs/protocol.md
section 2), else defaults. The argument checks are the ones both the single-process client
(:mod:`jaxsurro.client.simulation`) and the MPI-parallel one (:mod:`jaxsurro.client.parallel`)
apply, written once here. :func:`launched_by_mpi` is the one rule, for the solvers and for the
server's ranks (jaxsurro.server.distributed), saying whether an MPI launcher started this process
as one of several ranks (docs/architecture.md, sections "Four sides" and "MPI lockstep").
"""

from __future__ import annotations

import math
import operator
import os
import re
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxsurro import protocol

ENV_SERVER = "JAXSURRO_SERVER"
ENV_TOKEN = "JAXSURRO_TOKEN"
ENV_SIM_ID = "JAXSURRO_SIM_ID"
ENV_TIMEOUT = "JAXSURRO_TIMEOUT"
ENV_WIRE_DTYPE = "JAXSURRO_WIRE_DTYPE"
ENV_ATTEMPT = "JAXSURRO_ATTEMPT"  # 1 for a simulation's first run, 2 for its first restart...
# The client id of a persistent client the launcher started (u32, decimal): the server maps the
# simulations it hands out to that job. Unset: each process draws a random id.
ENV_CLIENT_ID = "JAXSURRO_CLIENT_ID"
# The server's CURVE public key (Z85, 40 characters) when the run encrypts its traffic (server.encryption).
ENV_SERVER_KEY = "JAXSURRO_SERVER_KEY"
CURVE_KEY_CHARACTERS = 40

DEFAULT_TIMEOUT = 60.0  # seconds
DEFAULT_WIRE_DTYPE = "float32"
ANY_SIMULATION = protocol.ANY_SIMULATION

_HOW_TO_SET = (
    "The jaxsurro launcher sets it for every solver it starts; to run a solver by hand, export it "
    "or pass the matching argument to jaxsurro.client.connect()."
)


class ClientConfigurationError(ValueError):
    """A missing or invalid client setting (environment variable or argument)."""


class ServerUnreachable(ConnectionError):
    """The server did not answer the HELLO within the timeout."""


class SimulationRejected(ConnectionError):
    """The server refused the HELLO; `reason` is its short code (bad_token, unknown_simulation, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Settings(NamedTuple):
    """Resolved connection settings."""

    server: str  # control address of server rank 0, e.g. tcp://10.0.0.1:5555
    token: bytes  # 16 raw bytes
    sim_id: int  # or ANY_SIMULATION
    timeout: float  # seconds, > 0
    wire_dtype: np.dtype  # little-endian float32 or float64
    fields: dict[str, tuple[int, ...]] | None = None  # declared at HELLO: every field of a step and its shape
    server_key: bytes | None = None  # the server's CURVE public key (Z85): encrypt every socket; None: clear text


def _missing(name: str, expected: str) -> ClientConfigurationError:
    """Error for an unset variable, saying what it should hold and who sets it."""
    return ClientConfigurationError(f"{name} is not set: expected {expected}. {_HOW_TO_SET}")


def _invalid(name: str, expected: str, got: Any) -> ClientConfigurationError:
    """Error for a bad value, saying what was expected and what came."""
    return ClientConfigurationError(f"{name}: expected {expected}, got {got!r}. {_HOW_TO_SET}")


def _given_or_environment(
    value: Any, argument: str, env: Mapping[str, str], variable: str, expected: str
) -> tuple[Any, str]:
    """``(value, argument)`` when the argument is given, else ``(env[variable], variable)``: what to check
    and the name to blame; raises _missing when neither is set (an empty variable is unset)."""
    if value is not None:
        return value, argument
    if not env.get(variable):
        raise _missing(variable, expected)
    return env[variable], variable


def resolve_settings(
    server: str | None = None,
    token: bytes | str | None = None,
    sim_id: int | None = None,
    timeout: float | None = None,
    wire_dtype: Any = None,
    environ: Mapping[str, str] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from explicit arguments, else the JAXSURRO_* environment variables, else defaults."""
    env = os.environ if environ is None else environ

    address_form = "the server's control address tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)"
    server, server_source = _given_or_environment(server, "server", env, ENV_SERVER, address_form)
    if not isinstance(server, str) or "://" not in server:
        raise _invalid(server_source, address_form, server)

    token_form = f"the run token, {2 * protocol.TOKEN_BYTES} hexadecimal characters"
    token, token_source = _given_or_environment(token, "token", env, ENV_TOKEN, token_form)
    if isinstance(token, bytes) and len(token) == protocol.TOKEN_BYTES:
        raw_token = token
    elif isinstance(token, str):
        try:
            raw_token = protocol.token_from_hex(token)
        except ValueError:
            raise _invalid(token_source, token_form, token) from None
    else:
        raise _invalid(token_source, f"{token_form} or {protocol.TOKEN_BYTES} raw bytes", token)

    sim_form = f"the simulation id, an integer in [0, 2**64 - 1) or 'any' (= {ANY_SIMULATION})"
    sim_given, sim_source = _given_or_environment(sim_id, "sim_id", env, ENV_SIM_ID, sim_form)
    if sim_id is None:
        sim_given = sim_given.strip()
        try:
            sim_id = ANY_SIMULATION if sim_given.lower() == "any" else int(sim_given)
        except ValueError:
            raise _invalid(ENV_SIM_ID, sim_form, sim_given) from None
    if isinstance(sim_id, bool) or not isinstance(sim_id, int | np.integer) or not 0 <= sim_id <= ANY_SIMULATION:
        raise _invalid(sim_source, sim_form, sim_given)

    timeout_form = "a positive number of seconds (default 60)"
    if timeout is None:
        text = env.get(ENV_TIMEOUT, "").strip()
        timeout_source, timeout_given = ENV_TIMEOUT, text
        try:
            timeout = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise _invalid(ENV_TIMEOUT, timeout_form, text) from None
    else:
        timeout_source, timeout_given = "timeout", timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (timeout > 0 and math.isfinite(timeout))
    ):
        raise _invalid(timeout_source, timeout_form, timeout_given)

    dtype_form = "'float32' (default: halves the traffic) or 'float64'"
    if wire_dtype is None:
        wire_dtype = env.get(ENV_WIRE_DTYPE, "").strip() or DEFAULT_WIRE_DTYPE
        dtype_source = ENV_WIRE_DTYPE
    else:
        dtype_source = "wire_dtype"
    try:
        dtype = np.dtype(wire_dtype).newbyteorder("<")
    except TypeError:
        raise _invalid(dtype_source, dtype_form, wire_dtype) from None
    if dtype not in protocol.DTYPE_TO_CODE:
        raise _invalid(dtype_source, dtype_form, wire_dtype)

    server_key = env.get(ENV_SERVER_KEY, "").strip() or None
    if server_key is not None and not _is_curve_key(server_key):
        raise _invalid(
            ENV_SERVER_KEY, f"the server's CURVE public key, {CURVE_KEY_CHARACTERS} Z85 characters", server_key
        )
    return Settings(
        server,
        raw_token,
        int(sim_id),
        float(timeout),
        dtype,
        check_declared_fields(fields),
        None if server_key is None else server_key.encode(),
    )


def _is_curve_key(text: str) -> bool:
    """Whether ``text`` is a Z85-encoded 32-byte CURVE key."""
    from zmq.utils import z85

    try:
        return len(text) == CURVE_KEY_CHARACTERS and len(z85.decode(text)) == 32
    except (ValueError, KeyError, IndexError, TypeError, struct.error):  # z85 raises each for some text
        return False


def check_declared_fields(fields: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` as declared to connect(): a shape is a tuple of sizes, ``()`` a scalar, an int a flat size."""
    if fields is None:
        return None
    if not isinstance(fields, Mapping) or not fields:
        raise ClientConfigurationError(
            f"fields must map every field name of a time step to its shape, e.g. {{'u': (128,), 'dudx': (128,)}}, "
            f"got {fields!r}"
        )
    declared = {}
    for name, shape in fields.items():
        check_field_name(name)
        dims = (shape,) if isinstance(shape, int | np.integer) else shape
        try:
            dims = tuple(operator.index(d) for d in dims)
        except TypeError:
            raise ClientConfigurationError(
                f"field {name!r}: its shape must be a tuple of sizes, got {shape!r}"
            ) from None
        if len(dims) > protocol.MAX_NDIM or any(not 0 < d <= protocol.MAX_U32 for d in dims):
            raise ClientConfigurationError(
                f"field {name!r}: a shape has at most {protocol.MAX_NDIM} sizes in [1, 2**32), got {shape!r}"
            )
        declared[name] = dims
    return declared


# ----------------------------------------------------------------------------- send()'s arguments


def check_field_name(field: Any) -> bytes:
    """The UTF-8 form of a field name: TypeError unless a str, ValueError unless 1..MAX_FIELD_NAME_BYTES long."""
    if not isinstance(field, str):
        raise TypeError(f"field must be a str name such as 'temperature', got {type(field).__name__}")
    encoded = field.encode()
    if not 0 < len(encoded) <= protocol.MAX_FIELD_NAME_BYTES:
        raise ValueError(
            f"field name must be 1..{protocol.MAX_FIELD_NAME_BYTES} UTF-8 bytes, got {field!r} ({len(encoded)} bytes)"
        )
    return encoded


def check_real_array(field: str, array: Any) -> np.ndarray:
    """`array` as a NumPy array (no copy when it is one); TypeError unless it holds real numbers (float or int)."""
    values = np.asarray(array)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"field {field!r}: expected a real numeric array (float or int), got dtype {values.dtype}")
    return values


def check_time_step(time_step: Any) -> int:
    """A time step as an int in [0, 2**32): Python and NumPy integers (not bool, not float), else TypeError/ValueError.

    Cheap for a Python int (one type test and one range test): it runs once per message.
    """
    if type(time_step) is not int:
        if isinstance(time_step, bool | np.bool_):
            raise TypeError(f"time_step must be an integer, got {time_step!r}")
        try:
            time_step = operator.index(time_step)
        except TypeError:
            raise TypeError(
                f"time_step must be a non-negative integer, got {time_step!r} ({type(time_step).__name__})"
            ) from None
    if not 0 <= time_step <= protocol.MAX_U32:
        raise ValueError(f"time_step must be in [0, 2**32), got {time_step}")
    return time_step


# ----------------------------------------------------------------------------- MPI launchers

# Set by MPI launchers in every rank to the number of ranks: Open MPI's mpirun (OMPI_COMM_WORLD_SIZE),
# MPICH / Intel MPI (Hydra) and srun --mpi=pmi2 (PMI_SIZE), Slurm's srun, --mpi=pmix included
# (SLURM_STEP_NUM_TASKS). Not SLURM_NTASKS: an sbatch script itself (one process) has it too.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
# Set by PMIx launchers in every rank; it holds the rank, not the count: alone it means "several".
MPI_PMIX_RANK_VARIABLE = "PMIX_RANK"
# The processes that start MPI ranks (Open MPI 4 and 5, MPICH / Intel MPI Hydra, Slurm).
MPI_LAUNCHER_PROCESSES = frozenset(
    {
        "mpirun",
        "mpiexec",
        "orterun",
        "orted",
        "prterun",
        "prted",
        "mpiexec.hydra",
        "hydra_pmi_proxy",
        "pmi_proxy",
        "slurmstepd",
    }
)
# A mapped shared library of an MPI implementation (libmpi.so.40, libmpi.so.12, libmpi_mt.so, libmpich.so...).
_MPI_LIBRARY = re.compile(r"/lib(?:mpi|mpich)[^/]*\.so")


class ParentProcess(NamedTuple):
    """What launched_by_mpi needs to know of the parent process."""

    name: str  # its executable's name (/proc/PID/comm), e.g. "mpirun", "bash", "python3"
    uses_mpi: bool  # an MPI library is loaded in it: it is an MPI rank itself, not a launcher or a wrapper


def parent_process(pid: int | None = None) -> ParentProcess | None:
    """The parent of this process (or process `pid`) from /proc; None where /proc does not show it."""
    parent = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{parent}/comm") as comm:
            name = comm.read().strip()
    except OSError:
        return None
    uses_mpi = False
    try:
        with open(f"/proc/{parent}/maps") as maps:
            uses_mpi = any(_MPI_LIBRARY.search(line) for line in maps)
    except OSError:
        pass  # another user's process, or gone: only its name is known
    return ParentProcess(name, uses_mpi)


_FROM_PROC: Any = object()  # launched_by_mpi's default: look the parent up in /proc


def launched_by_mpi(environ: Mapping[str, str] = os.environ, parent: ParentProcess | None = _FROM_PROC) -> bool:
    """True when an MPI launcher started this process as one of several ranks (so MPI is to be initialised).

    That is, both:

    - the launcher's variables say several ranks: one of MPI_SIZE_VARIABLES holds an integer > 1, or none
      of them is set and MPI_PMIX_RANK_VARIABLE is (a PMIx launcher stating no count). A size of 1
      (``mpirun -n 1``) runs as a plain process: a world of one needs no MPI;
    - this process did not merely inherit them from an MPI rank that started it (a solver that a server
      rank launched, a subprocess of an MPI program): MPI would hang or fail there. So the parent
      (`parent`, by default read from /proc) is an MPI launcher (MPI_LAUNCHER_PROCESSES), or at least no
      MPI program itself: a wrapper between the launcher and Python (a shell script, ``uv run``, ``env``,
      a container runtime) is fine. Where /proc is missing (parent None) the variables decide.

    Both the solvers (solvers/heat.py, ``--mpi auto``) and the server's ranks
    (jaxsurro.server.distributed.World.detect) follow this rule. Never imports mpi4py.
    """
    sizes = [environ[name].strip() for name in MPI_SIZE_VARIABLES if name in environ]
    if sizes:
        several = any(size.isdigit() and int(size) > 1 for size in sizes)
    else:
        several = MPI_PMIX_RANK_VARIABLE in environ
    if not several:
        return False
    if parent is _FROM_PROC:
        parent = parent_process()
    return parent is None or parent.name in MPI_LAUNCHER_PROCESSES or not parent.uses_mpi
