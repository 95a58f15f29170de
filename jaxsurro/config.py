"""Experiment configuration: one TOML file loaded into typed, frozen dataclasses.

Every value is checked before anything runs. An unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError`, whose message names the full key
path, what was given and what is allowed, e.g.
``buffer.watermark (500) must not exceed buffer.capacity (300)``.

Two kinds of checks:

- :func:`load_config` / :func:`config_from_dict`: the configuration alone. Types, then every
  number finite and within the range its consumer can take: timeouts in (0, ``MAX_TIMEOUT_S``]
  (ZeroMQ takes them as int32 milliseconds), ``launcher.poll_interval`` in (0, ``MAX_POLL_INTERVAL_S``],
  seeds in [0, 2**32) (:func:`jaxsurro.core.sampling.derive_seed` makes uint32 seeds), the wire
  protocol's ranges (simulation ids below 2**64 - 1, at most 2**32 steps, dimensions below 2**32,
  sample ids ``sim · n_steps + t`` in int64), bounds representable in float32 (the network's
  inputs and outputs), and ``server.host`` of a valid form ("auto", an IPv4 address, or a host
  name: letters, digits, hyphens and dots, not all-numeric).
- :func:`machine_problems` / :func:`check_machine`: whether it can run on *this* machine, from the
  working directory the jobs run in. The entry points (``python -m jaxsurro.run``, ``.submit``,
  ``.config``) apply them through :func:`config_from_args` before they import anything heavy or
  create a run directory; readers of a finished run directory (plot, predict) do not. See
  :func:`machine_problems` for the rules (solver program and script, directories, server.host,
  a memory estimate).

Usage::

    cfg = load_config("experiments/heat.toml", overrides=["train.batch_size=64"])
    check_machine(cfg)         # raises ConfigError when it cannot run here
    print(dumps(cfg))          # the resolved configuration, as TOML
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import shutil
import socket
import struct
import sys
import threading
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tomli_w


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


# ----------------------------------------------------------------------------
# Limits of the values' consumers. The protocol's are restated here (this module imports
# nothing of the project); tests/test_config.py checks they agree with jaxsurro.protocol.
# ----------------------------------------------------------------------------

MAX_U32 = 2**32 - 1
MAX_SEED = MAX_U32  # study.seed: derive_seed mixes it into uint32 stream seeds
MAX_SIMULATIONS = 2**64 - 1  # simulation ids 0 .. S-1 stay below the protocol's "any simulation" id 2**64 - 1
MAX_STEPS = 2**32  # time steps 0 .. T-1 are u32 on the wire
MAX_DIM = MAX_U32  # each dimension of a field's shape is a u32 on the wire
MAX_SAMPLE_IDS = 2**63  # sample ids sim_id · n_steps + t are int64 in the buffers
MAX_OPTIMIZER_STEPS = 2**31 - 1  # optax counts the learning-rate schedule's steps in int32
MAX_TIMEOUT_S = (2**31 - 1) // 1000  # 2147483 s (about 24.8 days): ZeroMQ takes timeouts as int32 milliseconds
MAX_POLL_INTERVAL_S = 3600.0  # the launcher notices a job's end at most this late
MAX_LAYERS = 1000  # model.layers: a deeper stack takes longer to trace and compile than any run
MAX_NAME_CHARS = 200  # study.name: a run directory name <name>-<timestamp> stays under 255 bytes
FLOAT32_MAX = 3.4028234663852886e38  # inputs, outputs and their scaling are float32 on the network side


# ----------------------------------------------------------------------------
# Sections. Field defaults are the defaults of the experiment files; a field
# without a default must be given. Comments say the unit and the allowed range.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What is run: the ensemble's size and seed, and where results go."""

    name: str = "study"
    seed: int = 0  # every random stream of the run derives from it (core.sampling.derive_seed)
    n_simulations: int = 64  # the simulation budget S (>= 1)
    output_dir: str = "runs"  # a run directory <output_dir>/<name>-<timestamp> is made here
    cache_dir: str = ".cache/jaxsurro"  # validation sets are cached here, keyed by what determines them
    # "online": train while the ensemble streams (a buffer); "offline" (the SC23 paper's baseline): the
    # ensemble's time steps go to files under <run_dir>/dataset/, then training reads them in epochs.
    mode: Literal["online", "offline"] = "online"
    epochs: int = 1  # offline mode: passes over the dataset, each sample once per pass (>= 1)

    def check(self, errors: list[str]) -> None:
        _in_range(errors, "study.seed", self.seed, 0, MAX_SEED, "seeds are uint32: core.sampling.derive_seed")
        _in_range(errors, "study.epochs", self.epochs, 1, MAX_OPTIMIZER_STEPS, "optax counts steps in int32")
        _in_range(
            errors,
            "study.n_simulations",
            self.n_simulations,
            1,
            MAX_SIMULATIONS,
            "simulation ids are u64 on the wire, 2**64 - 1 excluded",
        )
        if (
            not self.name
            or any(c in self.name for c in "/\\ ")
            or not self.name.isprintable()
            or len(self.name) > MAX_NAME_CHARS
        ):
            errors.append(
                f"study.name ({self.name!r}) must be a non-empty name without spaces or slashes "
                f"(printable, at most {MAX_NAME_CHARS} characters)"
            )
        for name in ("output_dir", "cache_dir"):
            value = getattr(self, name)
            if not value or "\0" in value:
                errors.append(f"study.{name} ({value!r}) must be a non-empty directory path")


PLACEHOLDERS = ("python", "n_steps", "dt", "grid_size")  # filled into solver.command and field shapes
MAX_FIELD_NDIM = 4  # the wire protocol carries shapes of rank 0 to 4
MAX_FIELD_NAME_BYTES = 64


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    """One named field of every time step (``[[solver.fields]]``).

    ``shape`` is a list of 0 to 4 sizes (``[]``: a scalar), each an integer or the placeholder
    ``"{grid_size}"``; an integer alone is a flat size (``shape = 128`` is ``[128]``).
    """

    name: str
    shape: tuple[int | str, ...] | int
    weight: float = 1.0  # the field's weight c_f in the training loss (>= 0; weights are normalized)
    bounds: tuple[float, float] | None = None  # physical range of valid values, when known

    def resolved_shape(self, grid_size: int) -> tuple[int, ...]:
        dims = (self.shape,) if isinstance(self.shape, int) else self.shape
        return tuple(grid_size if d == "{grid_size}" else int(d) for d in dims)

    def check(self, errors: list[str], path: str) -> None:
        if not self.name or len(self.name.encode()) > MAX_FIELD_NAME_BYTES:
            errors.append(
                f"{path}.name ({self.name!r}) must be a non-empty name of at most {MAX_FIELD_NAME_BYTES} bytes"
            )
        dims = (self.shape,) if isinstance(self.shape, int) else self.shape
        if len(dims) > MAX_FIELD_NDIM:
            errors.append(
                f"{path}.shape ({list(dims)}) has {len(dims)} dimensions; the protocol carries at most "
                f"{MAX_FIELD_NDIM}: flatten the field (an integer shape is a flat size)"
            )
        for d in dims:
            if isinstance(d, str) and d != "{grid_size}":
                errors.append(f'{path}.shape entry {d!r} must be an integer or "{{grid_size}}"')
            elif isinstance(d, int) and d < 1:
                errors.append(f"{path}.shape entry {d} must be at least 1")
            elif isinstance(d, int) and d > MAX_DIM:
                errors.append(
                    f"{path}.shape entry {d} must be at most {MAX_DIM} (2**32 - 1: dimensions are u32 on the wire)"
                )
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            errors.append(f"{path}.weight ({self.weight}) must be a finite number >= 0")
        if self.bounds is not None:
            lo, hi = self.bounds
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                errors.append(f"{path}.bounds ([{lo}, {hi}]) must be finite with low < high")
            else:
                _float32_bounds(errors, f"{path}.bounds", lo, hi)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The solver program that each client runs, and the fields each of its time steps carries."""

    command: tuple[str, ...]  # argv template; {python}, {n_steps}, {dt}, {grid_size} are filled in
    parameters: dict[str, tuple[float, float]]  # name -> (low, high) bounds, in solver order
    fields: tuple[FieldConfig, ...]  # [[solver.fields]]: every field of a time step, in sample order
    grid_size: int = 16  # a size handed to the solver ({grid_size}) and usable in field shapes
    n_steps: int = 100  # time steps per simulation (each one is a training sample)
    dt: float = 0.01  # physical time per step; the network's time input is (t + 1) * dt
    wire_dtype: Literal["float32", "float64"] = "float32"  # dtype of fields on the wire

    @property
    def field_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each field's name and resolved shape, in sample order."""
        return {f.name: f.resolved_shape(self.grid_size) for f in self.fields}

    @property
    def sample_size(self) -> int:
        """Elements of one flat training sample: every field of a time step."""
        return sum(math.prod(shape) for shape in self.field_shapes.values())

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    @property
    def low(self) -> tuple[float, ...]:
        return tuple(lo for lo, _ in self.parameters.values())

    @property
    def high(self) -> tuple[float, ...]:
        return tuple(hi for _, hi in self.parameters.values())

    def argv(self, python: str = sys.executable) -> list[str]:
        """The solver's command line with its placeholders filled in."""
        values = {"python": python, "n_steps": self.n_steps, "dt": self.dt, "grid_size": self.grid_size}
        return [part.format(**values) for part in self.command]

    def check(self, errors: list[str]) -> None:
        if not self.command:
            errors.append(
                "solver.command must not be empty: give the solver's argv, e.g. "
                '["{python}", "solvers/heat.py", "--client"]'
            )
        for i, part in enumerate(self.command):
            try:
                part.format(python="", n_steps=0, dt=0.0, grid_size=0)
            except (KeyError, IndexError, ValueError) as exc:
                errors.append(
                    f"solver.command[{i}] ({part!r}) has an unknown placeholder {exc}; "
                    "allowed: {python}, {n_steps}, {dt}, {grid_size}"
                )
        if not self.parameters:
            errors.append("solver.parameters must name at least one parameter with its [low, high] bounds")
        for name, (lo, hi) in self.parameters.items():
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                errors.append(f"solver.parameters.{name} ([{lo}, {hi}]) must be finite bounds with low < high")
            else:
                _float32_bounds(errors, f"solver.parameters.{name}", lo, hi)
        if not self.fields:
            errors.append(
                'solver.fields must declare at least one field, e.g. [[solver.fields]] name = "u", shape = [128]'
            )
        names = [f.name for f in self.fields]
        for i, field in enumerate(self.fields):
            field.check(errors, f"solver.fields[{i}]")
            if names.count(field.name) > 1 and names.index(field.name) == i:
                errors.append(f"solver.fields: the name {field.name!r} is declared {names.count(field.name)} times")
        if self.fields and not sum(f.weight for f in self.fields) > 0:
            errors.append("solver.fields: at least one field needs a weight > 0 in the loss")
        _in_range(errors, "solver.grid_size", self.grid_size, 1, MAX_DIM, "2**32 - 1: dimensions are u32 on the wire")
        _in_range(errors, "solver.n_steps", self.n_steps, 1, MAX_STEPS, "2**32: time steps are u32 on the wire")
        if not (self.dt > 0 and math.isfinite(self.dt)):
            errors.append(f"solver.dt ({self.dt}) must be a positive number")
        elif not (_float32(self.dt) > 0 and math.isfinite(_float32(self.n_steps * self.dt))):
            errors.append(
                f"solver.dt ({self.dt}) must be a positive number whose times (t + 1) · dt up to "
                f"solver.n_steps ({self.n_steps}) are positive and finite in float32 (the network's time input)"
            )


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How simulation parameters are drawn within the solver's bounds."""

    kind: Literal["uniform", "halton", "lhs", "breed"] = "halton"  # "breed": see the [breed] section

    def check(self, errors: list[str]) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class BreedConfig:
    """Breed active learning (sampler.kind = "breed"); defaults from the Breed paper's Table 1.

    sigma is the proposal width in the parameters' physical units: 5.0 on the temperature
    scale, which is 5.0 / (500 - 100) = 0.0125 in the unit cube the bounds map to (the
    parameters must then share one span). sigma_unit gives the unit-cube width directly.
    """

    sigma: float = 5.0  # proposal width, physical units (all parameters must share one span)
    sigma_unit: float | None = None  # proposal width in the unit cube; overrides sigma when given
    window: int = 200  # N: the last N simulations whose score was updated
    period: int = 200  # P: training batches between resampling rounds
    r_start: float = 0.5  # r_s: share of bred points at the first round
    r_end: float = 0.9  # r_e: share of bred points once the schedule has grown
    r_cycles: float = 3.0  # r_c: rounds for the share to grow from r_s to r_e
    base_sampler: Literal["uniform", "halton", "lhs"] = "uniform"  # draws the points that are not bred
    min_finished: int = 10  # completed simulations needed before the first resampling round
    importance_weights: bool = False  # divide the scores by the proposal density (true importance weights)

    def check(self, errors: list[str]) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            errors.append(f"breed.sigma ({self.sigma}) must be a positive number (physical units)")
        if self.sigma_unit is not None and not 0 < self.sigma_unit <= 1:
            errors.append(f"breed.sigma_unit ({self.sigma_unit}) must be in (0, 1] (unit-cube units)")
        _at_least(errors, "breed.window", self.window, 1)
        _at_least(errors, "breed.period", self.period, 1)
        for name in ("r_start", "r_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                errors.append(f"breed.{name} ({getattr(self, name)}) must be within [0, 1]")
        if not (self.r_cycles > 0 and math.isfinite(self.r_cycles)):
            errors.append(f"breed.r_cycles ({self.r_cycles}) must be positive (a finite number of rounds)")
        _at_least(errors, "breed.min_finished", self.min_finished, 1)


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """The host buffer between the receiver and the trainer (SC23 paper, section 3.2.3)."""

    kind: Literal["fifo", "firo", "reservoir"] = "reservoir"
    capacity: int = 2000  # samples held in memory
    watermark: int = 200  # samples needed before training starts (FIRO, Reservoir)

    def check(self, errors: list[str]) -> None:
        pass  # its size rules involve train.batch_size: Config.check applies buffer_capacity_problems


def buffer_capacity_problems(
    kind: str,
    capacity: int,
    watermark: int,
    batch_size: int | None = None,
    *,
    names: tuple[str, str, str] = ("buffer.capacity", "buffer.watermark", "train.batch_size"),
) -> list[str]:
    """The host buffers' size rules, stated once: what keeps a buffer of this kind and size from working.

    One sentence per broken rule, empty when the sizes work; ``batch_size=None`` skips the batch rule.
    The configuration reports them at load under the keys' paths (the default ``names``);
    :mod:`jaxsurro.server.buffers` raises them when a buffer is built and when a batch is asked for
    (docs/architecture.md, "Buffers").
    """
    cap, mark, batch = names
    problems = []
    if capacity < 1:
        problems.append(f"{cap} ({capacity}) must be at least 1")
    if watermark < 0:
        problems.append(f"{mark} ({watermark}) must be at least 0")
    elif watermark > capacity:
        problems.append(
            f"{mark} ({watermark}) must not exceed {cap} ({capacity}): a watermark above the capacity is never reached"
        )
    elif kind == "firo" and watermark == capacity:
        problems.append(
            f"{mark} ({watermark}) must be below {cap} ({capacity}) for a FIRO buffer: it releases "
            "batches only above the watermark, and it cannot hold more than its capacity"
        )
    elif kind == "reservoir" and watermark < 1:
        problems.append(f"{mark} ({watermark}) must be at least 1 for a reservoir: it draws from stored samples")
    if batch_size is not None and kind in ("fifo", "firo") and batch_size > capacity:
        problems.append(
            f"{batch} ({batch_size}) must not exceed {cap} ({capacity}) for a {kind.upper()} buffer: "
            "it evicts what it reads and blocks the producer when full, so a full batch would never fit"
        )
    return problems


BUILTIN_MODELS = ("mlp", "conv")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The surrogate network: by default an MLP from (parameters, time) to every field of a time step."""

    name: str = "mlp"  # "mlp", "conv", a name given to register_model, or "package.module:factory"
    hidden: int = 256  # H units per hidden layer
    layers: int = 2  # L hidden layers
    output_range: tuple[float, float] | None = None  # every field's range; default: each field's, from validation

    def check(self, errors: list[str]) -> None:
        if self.name not in BUILTIN_MODELS and ":" not in self.name:
            errors.append(
                f"model.name ({self.name!r}) must be one of {', '.join(BUILTIN_MODELS)} or name a factory "
                "as 'package.module:factory' (a model registered in your own module)"
            )
        _at_least(errors, "model.hidden", self.hidden, 1)  # its upper limit is the memory estimate's
        _in_range(
            errors, "model.layers", self.layers, 0, MAX_LAYERS, "a deeper stack takes longer to compile than any run"
        )
        if self.output_range is not None:
            lo, hi = self.output_range
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                errors.append(f"model.output_range ([{lo}, {hi}]) must be finite with low < high")
            else:
                _float32_bounds(errors, "model.output_range", lo, hi)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: batches, optimizer, validation."""

    batch_size: int = 128
    learning_rate: float = 1e-3
    halve_every_samples: int = 1_000_000  # the learning rate halves every this many samples
    validation_every: int = 100  # batches between validations
    n_validation: int = 16  # validation simulations (Halton parameters), run once and cached
    batch_timeout: float = 300.0  # seconds the trainer waits for a batch before reporting a stall
    # Online mode, once reception ends: "drain" the buffers (the SC23 paper: training ends when they are
    # empty), or an integer N: drain them, then train N more batches drawn uniformly, with replacement,
    # from what the buffers held when reception ended.
    after_reception: Literal["drain"] | int = "drain"

    def check(self, errors: list[str]) -> None:
        _at_least(errors, "train.batch_size", self.batch_size, 1)
        if isinstance(self.after_reception, int):
            _in_range(
                errors,
                "train.after_reception",
                self.after_reception,
                0,
                MAX_OPTIMIZER_STEPS,
                "optax counts steps in int32",
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            errors.append(f"train.learning_rate ({self.learning_rate}) must be a positive number")
        _at_least(errors, "train.halve_every_samples", self.halve_every_samples, 1)
        _at_least(errors, "train.validation_every", self.validation_every, 1)
        _at_least(errors, "train.n_validation", self.n_validation, 1)
        _seconds(errors, "train.batch_timeout", self.batch_timeout)


@dataclasses.dataclass(frozen=True)
class LauncherConfig:
    """How the ensemble is run: where, how many at once, how failures are handled."""

    scheduler: Literal["local", "slurm", "oar"] = "local"
    slurm_mode: Literal["jobs", "steps"] = "jobs"  # sbatch job per client, or srun steps in the server's allocation
    max_concurrent: int = 2  # m: simulations running at the same time
    # > 0: this many persistent clients, each running simulations one after another as the server hands
    # them out (the solver loops over jaxsurro.client.simulations()); 0: a job per simulation.
    persistent_clients: int = 0
    max_attempts: int = 2  # tries per simulation before it is reported failed
    poll_interval: float = 0.2  # seconds between scheduler polls (a backend may ask for more)
    output_tail_lines: int = 20  # lines of a failed simulation's output shown in its report
    client_options: tuple[str, ...] = ()  # scheduler options of each client job, e.g. ["--time=00:10:00"]
    server_options: tuple[str, ...] = ()  # scheduler options of the server job (python -m jaxsurro.submit)
    server_ranks: int = 1  # R: server ranks started by python -m jaxsurro.submit
    # Slurm: seconds before the server job's time limit at which it writes a checkpoint, stops and requeues
    # itself to resume (#SBATCH --signal=B:USR1@N; Slurm may warn up to a minute early); 0: no warning.
    warning_seconds: int = 300
    # Seconds a running simulation may send nothing before it is cancelled as hung and retried; not given:
    # derived from the solver's observed pace (jaxsurro.launcher.supervisor.SilenceLimit).
    silence_timeout: float | None = None
    on_exhausted: Literal["fail", "redraw"] = "fail"  # after max_attempts: fail, or run with new parameters
    max_redraws: int = 3  # "redraw": new parameters at most this many times per simulation, then it fails

    def check(self, errors: list[str]) -> None:
        for name in ("client_options", "server_options"):
            for i, option in enumerate(getattr(self, name)):
                if not option.startswith("-") or "\n" in option:
                    errors.append(
                        f"launcher.{name}[{i}] ({option!r}) must be one scheduler option with its "
                        "value, starting with '-' and without newlines (e.g. \"--time=00:10:00\" for "
                        'Slurm, "-l nodes=1/core=1,walltime=00:10:00" for OAR)'
                    )
        _at_least(errors, "launcher.server_ranks", self.server_ranks, 1)
        _at_least(errors, "launcher.max_concurrent", self.max_concurrent, 1)
        _in_range(errors, "launcher.persistent_clients", self.persistent_clients, 0, 65535, "clients run as jobs")
        _at_least(errors, "launcher.max_attempts", self.max_attempts, 1)
        _seconds(errors, "launcher.poll_interval", self.poll_interval, MAX_POLL_INTERVAL_S)
        _at_least(errors, "launcher.output_tail_lines", self.output_tail_lines, 0)
        if self.silence_timeout is not None:
            _seconds(errors, "launcher.silence_timeout", self.silence_timeout)
        _at_least(errors, "launcher.max_redraws", self.max_redraws, 1)
        _in_range(errors, "launcher.warning_seconds", self.warning_seconds, 0, 65535, "Slurm's --signal limit")
        if self.on_exhausted == "redraw" and self.server_ranks > 1:
            errors.append(
                f'launcher.on_exhausted = "redraw" needs a single server rank, not launcher.server_ranks = '
                f"{self.server_ranks}: the other ranks label a simulation's time steps with their own copy of "
                "its parameters, which a redraw on rank 0 does not reach"
            )


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The training server's network side."""

    host: str = "127.0.0.1"  # address each server rank binds and gives to clients; "auto": its host name
    startup_timeout: float = 3600.0  # seconds the other ranks wait for rank 0 to prepare (validation set)
    client_timeout: float = 60.0  # seconds a client waits for the server before failing
    receive_timeout: float = 600.0  # seconds without any message before the server reports a stall
    # Rejected messages of any one reason as a share of all messages: above the first, a warning at every
    # metrics record; above the second (once 100 messages arrived), the run stops rather than train on garbage.
    alarm_rejection_fraction: float = 0.01
    stop_rejection_fraction: float = 0.25
    # "curve": every socket is encrypted and authenticated with ZeroMQ CURVE; the server draws a key pair
    # per run and clients get its public key in JAXSURRO_SERVER_KEY. "none": clear text (a trusted network).
    encryption: Literal["none", "curve"] = "none"
    # How a client on the host of a server rank sends to it: "ipc", a Unix socket (Linux; less CPU per
    # byte than TCP loopback), or "tcp" like every other client.
    local_transport: Literal["ipc", "tcp"] = "ipc"

    def check(self, errors: list[str]) -> None:
        problem = host_problem(self.host)
        if problem:
            errors.append(f"server.host ({self.host!r}) {problem}")
        for name in ("client_timeout", "startup_timeout", "receive_timeout"):
            _seconds(errors, f"server.{name}", getattr(self, name))
        for name in ("alarm_rejection_fraction", "stop_rejection_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                errors.append(f"server.{name} ({getattr(self, name)}) must be a fraction in (0, 1]")
        if self.alarm_rejection_fraction > self.stop_rejection_fraction:
            errors.append(
                f"server.alarm_rejection_fraction ({self.alarm_rejection_fraction}) must not exceed "
                f"server.stop_rejection_fraction ({self.stop_rejection_fraction})"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of a running study, for ``python -m jaxsurro.run --resume RUN_DIR``."""

    every_seconds: float = 300.0  # also on SIGTERM, SIGINT (then the run stops) and SIGUSR1
    keep: int = 2  # the latest complete checkpoints kept; older ones are deleted

    def check(self, errors: list[str]) -> None:
        _seconds(errors, "checkpoint.every_seconds", self.every_seconds)
        _in_range(errors, "checkpoint.keep", self.keep, 1, 1000, "each holds every rank's buffer")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What a run writes besides metrics.jsonl."""

    tensorboard: bool = False  # also write TensorBoard event files in <run_dir>/tensorboard

    def check(self, errors: list[str]) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment."""

    study: StudyConfig
    solver: SolverConfig
    sampler: SamplerConfig
    buffer: BufferConfig
    model: ModelConfig
    train: TrainConfig
    launcher: LauncherConfig
    server: ServerConfig
    breed: BreedConfig
    log: LogConfig
    checkpoint: CheckpointConfig

    @property
    def breed_sigma_unit(self) -> tuple[float, ...]:
        """Breed's proposal width in the unit cube, one per parameter in solver order.

        The paper's members are N(λ, σ²I) in the parameter space, so a physical σ is σ / (high_i −
        low_i) along parameter i (equal components when the spans are equal); sigma_unit, already in
        the unit cube, is the same for every parameter.
        """
        if self.breed.sigma_unit is not None:
            return (float(self.breed.sigma_unit),) * len(self.solver.parameters)
        return tuple(self.breed.sigma / (hi - lo) for lo, hi in self.solver.parameters.values())

    def check(self, errors: list[str]) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).check(errors)
        errors.extend(
            buffer_capacity_problems(
                self.buffer.kind, self.buffer.capacity, self.buffer.watermark, self.train.batch_size
            )
        )
        if self.sampler.kind == "breed" and self.breed.sigma_unit is None:
            spans = sorted({round(hi - lo, 12) for lo, hi in self.solver.parameters.values()})
            if len(spans) > 1:
                errors.append(
                    f"breed.sigma ({self.breed.sigma}) is in physical units, which needs every parameter "
                    f"to share one span; the spans are {spans}: give breed.sigma_unit (unit cube) instead"
                )
        if self.sampler.kind == "breed" and self.breed.min_finished > self.study.n_simulations:
            errors.append(
                f"breed.min_finished ({self.breed.min_finished}) must not exceed study.n_simulations "
                f"({self.study.n_simulations})"
            )
        if self.sampler.kind == "breed" and self.breed.window > self.study.n_simulations:
            errors.append(
                f"breed.window ({self.breed.window}) must not exceed study.n_simulations "
                f"({self.study.n_simulations}): a window larger than the study is never filled"
            )
        if self.study.n_simulations * self.solver.n_steps > MAX_SAMPLE_IDS:
            errors.append(
                f"study.n_simulations ({self.study.n_simulations}) × solver.n_steps ({self.solver.n_steps}) "
                f"must be at most 2**63: sample ids sim_id · n_steps + t are int64"
            )
        self._check_mode(errors)
        transitions = self.train.halve_every_samples // max(self.train.batch_size, 1)
        if transitions > MAX_OPTIMIZER_STEPS:
            errors.append(
                f"train.halve_every_samples ({self.train.halve_every_samples}) must be at most 2**31 - 1 "
                f"batches of train.batch_size ({self.train.batch_size}), i.e. "
                f"{MAX_OPTIMIZER_STEPS * max(self.train.batch_size, 1)} samples: the schedule counts steps in int32"
            )

    def _check_mode(self, errors: list[str]) -> None:
        """The keys that belong to one of study.mode's two modes, and what offline mode cannot do."""
        study = self.study
        if study.mode == "online":
            if study.epochs > 1:
                errors.append(
                    f'study.epochs ({study.epochs}) applies to study.mode = "offline"; an online run trains '
                    "as the data arrive (see train.after_reception to train longer)"
                )
            return
        if self.train.after_reception != "drain":
            errors.append(
                f'train.after_reception ({self.train.after_reception!r}) applies to study.mode = "online"; '
                "an offline run trains study.epochs passes over its dataset"
            )
        if self.sampler.kind == "breed":
            errors.append(
                'sampler.kind = "breed" needs study.mode = "online": Breed steers the ensemble by the '
                "losses of training while it runs, and an offline run trains after it ends"
            )
        if self.launcher.server_ranks > 1:
            errors.append(
                f'study.mode = "offline" runs on one server rank, not launcher.server_ranks = '
                f"{self.launcher.server_ranks}: its dataset is written and read by a single process"
            )
        batches = study.epochs * -(-study.n_simulations * self.solver.n_steps // max(self.train.batch_size, 1))
        if batches > MAX_OPTIMIZER_STEPS:
            errors.append(
                f"study.epochs ({study.epochs}) × the batches of one pass over study.n_simulations "
                f"({study.n_simulations}) × solver.n_steps ({self.solver.n_steps}) samples must be at most "
                f"2**31 - 1 steps (train.batch_size {self.train.batch_size}): optax counts steps in int32"
            )


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads a TOML experiment file, applies ``section.key=value`` overrides and validates."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(apply_overrides(raw, overrides), source=str(path))


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Builds and validates a :class:`Config` from plain data (as read from TOML)."""
    errors: list[str] = []
    config = _build(Config, raw, "", errors)
    if not errors:
        config.check(errors)
    if errors:
        lines = "\n  - ".join(errors)
        raise ConfigError(f"{source}: invalid configuration:\n  - {lines}")
    return config


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with each ``section.key=value`` set; values are TOML literals."""
    result = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.batch_size=64")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word is taken as a string: buffer.kind=fifo
        *sections, leaf = key.split(".")
        node = result
        for depth, name in enumerate(sections):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(sections[: depth + 1])} is not a section")
            else:
                child = node[name] = dict(child)
            node = child
        node[leaf] = value
    return result


def _build(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    """Converts a mapping to dataclass ``cls``, recording type and key errors with their paths."""
    where = path or "the file"
    if not isinstance(raw, Mapping):
        errors.append(f"{where} must be a table, got {type(raw).__name__} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields)
            errors.append(f"{_join(path, key)} is not a known key; allowed in {where}: {allowed}")
    values = {}
    missing = False
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in raw:
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                values[name] = _build(hint, raw[name], key_path, errors)
            elif _is_table_array(hint):
                values[name] = _build_array(typing.get_args(hint)[0], raw[name], key_path, errors)
            else:
                values[name] = _coerce(raw[name], hint, key_path, errors)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, key_path, errors)
        elif field.default is dataclasses.MISSING:
            errors.append(f"{key_path} is required and missing")
            missing = True
    return None if missing else cls(**values)


def _is_table_array(hint: Any) -> bool:
    """``tuple[SomeDataclass, ...]``: an array of tables in TOML (``[[section.key]]``)."""
    args = typing.get_args(hint)
    return (
        typing.get_origin(hint) is tuple
        and len(args) == 2
        and args[1] is Ellipsis
        and dataclasses.is_dataclass(args[0])
    )


def _build_array(cls: type, raw: Any, path: str, errors: list[str]) -> tuple[Any, ...] | None:
    if not isinstance(raw, list | tuple):
        errors.append(f"{path} must be an array of tables ([[{path}]]), got {type(raw).__name__} {raw!r}")
        return None
    items = [_build(cls, item, f"{path}[{i}]", errors) for i, item in enumerate(raw)]
    return None if any(item is None for item in items) else tuple(items)


_SENTINEL = object()


def _coerce(value: Any, hint: Any, path: str, errors: list[str]) -> Any:
    """Checks ``value`` against a type hint; ints are accepted where floats are expected."""
    result = _convert(value, hint)
    if result is _SENTINEL:
        errors.append(f"{path} ({value!r}) must be {_describe(hint)}")
        return None
    return result


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        for option in args:
            if option is not type(None):
                converted = _convert(value, option)
                if converted is not _SENTINEL:
                    return converted
        return _SENTINEL
    if origin is Literal:
        return value if value in args and isinstance(value, str | int) else _SENTINEL
    if hint is bool:
        return value if isinstance(value, bool) else _SENTINEL
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _SENTINEL
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return _SENTINEL
    if hint is str:
        return value if isinstance(value, str) else _SENTINEL
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _SENTINEL
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0]) for v in value]
        elif len(value) == len(args):
            items = [_convert(v, a) for v, a in zip(value, args, strict=True)]
        else:
            return _SENTINEL
        return _SENTINEL if any(i is _SENTINEL for i in items) else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            return _SENTINEL
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            converted = _convert(v, value_type)
            if converted is _SENTINEL or _convert(k, key_type) is _SENTINEL:
                return _SENTINEL
            out[k] = converted
        return out
    raise TypeError(f"unsupported configuration type {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "absent"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a table of {_describe(args[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _at_least(errors: list[str], path: str, value: int, minimum: int) -> None:
    if value < minimum:
        errors.append(f"{path} ({value}) must be at least {minimum}")


def _in_range(errors: list[str], path: str, value: int, minimum: int, maximum: int, why: str) -> None:
    """``minimum <= value <= maximum``, in the words of :func:`_at_least` below; ``why`` explains the maximum."""
    if value < minimum:
        errors.append(f"{path} ({value}) must be at least {minimum}")
    elif value > maximum:
        errors.append(f"{path} ({value}) must be at most {maximum} ({why})")


def _seconds(errors: list[str], path: str, value: float, maximum: float = MAX_TIMEOUT_S) -> None:
    """A duration: positive, finite and at most ``maximum`` seconds (it ends up as a C timeout)."""
    if not (value > 0 and math.isfinite(value) and value <= maximum):
        limit = "int32 milliseconds in ZeroMQ" if maximum == MAX_TIMEOUT_S else "the launcher reacts this late"
        errors.append(f"{path} ({value}) must be positive (seconds), finite and at most {maximum:.10g} s ({limit})")


def _float32(value: float) -> float:
    """``value`` rounded to float32 (inf beyond its range), as the network side will hold it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _float32_bounds(errors: list[str], path: str, lo: float, hi: float) -> None:
    """Finite bounds with ``lo < hi`` that stay so in float32, span included (the scaling divides by it)."""
    if not (
        abs(lo) <= FLOAT32_MAX and abs(hi) <= FLOAT32_MAX and _float32(lo) < _float32(hi) and hi - lo <= FLOAT32_MAX
    ):
        errors.append(
            f"{path} ([{lo}, {hi}]) must stay distinct and finite in float32, span included "
            f"(|bound| and high - low at most {FLOAT32_MAX:.4g}): the network side scales in float32"
        )


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
HOST_FORMS = '"auto", an IPv4 address (e.g. "127.0.0.1") or a host name (letters, digits, hyphens, dots)'


def host_problem(host: str) -> str | None:
    """What is wrong with ``server.host``'s form (no look-up), or None: see :data:`HOST_FORMS`.

    IPv6 addresses are refused: the receiver binds with ZeroMQ's default, IPv4 only. A name whose
    labels are all numbers is a malformed IPv4 address, not a host name.
    """
    if host == "auto":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if address.version == 6:
            return f"is an IPv6 address; the server binds IPv4 only: give {HOST_FORMS}"
        if address.is_multicast:
            return f"is a multicast address, which no server can bind: give {HOST_FORMS}"
        return None
    labels = host.split(".")
    if labels and all(label.isdigit() for label in labels):
        return f"is not a valid IPv4 address (four numbers 0-255): give {HOST_FORMS}"
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return f"must be {HOST_FORMS}"
    return None


# ----------------------------------------------------------------------------
# This machine: what the configuration needs from where it runs
# ----------------------------------------------------------------------------

HOST_LOOKUP_TIMEOUT_S = 0.5  # the longest server.host's name look-up may hold up the check
SIMULATION_RECORD_BYTES = 1024  # about what one row of the simulation table takes in memory
_PYTHON_NAME = re.compile(r"python[0-9.]*(?:\.exe)?")


def check_machine(config: Config, source: str = "<config>", *, server_here: bool = True) -> None:
    """Raises :class:`ConfigError` listing :func:`machine_problems`, when there are any."""
    problems = machine_problems(config, server_here=server_here)
    if problems:
        lines = "\n  - ".join(problems)
        raise ConfigError(f"{source}: cannot run on this machine:\n  - {lines}")


def machine_problems(config: Config, *, server_here: bool = True, cwd: Path | None = None) -> list[str]:
    """What keeps ``config`` from running on this machine from ``cwd`` (default: the working directory).

    One sentence per problem, each naming its key; empty when nothing does. Nothing is started and
    nothing is written. The rules:

    - ``solver.command`` with its placeholders filled (``{python}`` is this interpreter): its
      program must be a path (relative to ``cwd``, where the jobs run) to an executable file, or a
      name found on PATH. When the program is Python (``{python}``, or named ``python``,
      ``python3``, ``python3.11``...), its script, the first argument that is not an option,
      must exist relative to ``cwd`` or as an absolute path; ``-m module`` and ``-c code`` have none.
      Other programs' arguments are the program's business and are not checked.
    - ``study.output_dir`` and ``study.cache_dir``: a directory, or creatable under a writable one.

    With ``server_here`` (the server runs on this machine: ``jaxsurro.run``, ``jaxsurro.config``;
    ``jaxsurro.submit`` checks without, its server job checks again where it runs):

    - ``server.host``: an IPv4 address must be one of this machine's (a socket binds it, port 0);
      a host name must be a network interface's name or resolve to an IPv4 address of this machine.
      The look-up runs in a thread for at most :data:`HOST_LOOKUP_TIMEOUT_S`; one that has not
      answered by then is let through, and the receiver's bind reports a bad name when it starts.
    - memory: :func:`memory_estimate` for one server rank must fit in this machine's physical memory.
    - disk, in offline mode: :func:`dataset_bytes` must fit in the free space under ``study.output_dir``.
    """
    cwd = Path.cwd() if cwd is None else cwd
    problems = solver_problems(config.solver, cwd)
    for name in ("output_dir", "cache_dir"):
        problem = _directory_problem(Path(cwd, getattr(config.study, name)))
        if problem:
            problems.append(f"study.{name} ({getattr(config.study, name)!r}) {problem}")
    if server_here:
        problem = _host_here_problem(config.server.host)
        if problem:
            problems.append(f"server.host ({config.server.host!r}) {problem}")
        problem = memory_problem(config)
        if problem:
            problems.append(problem)
        problem = disk_problem(config, cwd)
        if problem:
            problems.append(problem)
    return problems


def solver_problems(solver: SolverConfig, cwd: Path) -> list[str]:
    """The rules on ``solver.command``'s program and Python script (see :func:`machine_problems`)."""
    argv = solver.argv()
    program = argv[0]
    shown = repr(solver.command[0]) + (f" → {program!r}" if program != solver.command[0] else "")
    if os.sep in program or (os.altsep and os.altsep in program):
        path = Path(cwd, program)
        if not path.is_file():
            return [
                f"solver.command[0] ({shown}) must be the solver program; {path} is not a file "
                f"(relative paths are taken from the working directory {cwd}, where the jobs run)"
            ]
        if not os.access(path, os.X_OK):
            return [f"solver.command[0] ({shown}) must be an executable file; {path} is not executable (chmod +x)"]
    elif shutil.which(program) is None:
        return [
            f"solver.command[0] ({shown}) must be the solver program: a path, or a name found on PATH; "
            f"{program!r} is not on PATH"
        ]
    if not (solver.command[0] == "{python}" or _PYTHON_NAME.fullmatch(Path(program).name)):
        return []
    index = _python_script_index(argv)
    if index is None:
        return []
    script = Path(cwd, argv[index])
    if not script.exists():
        return [
            f"solver.command[{index}] ({solver.command[index]!r}) is the solver's Python script and must exist; "
            f"{script} does not (relative paths are taken from the working directory {cwd}, where the jobs run)"
        ]
    return []


def _python_script_index(argv: Sequence[str]) -> int | None:
    """Where a Python command line names its script: the first argument that is not an option."""
    skip_next = False
    for index, arg in enumerate(argv[1:], start=1):
        if skip_next:
            skip_next = False
        elif arg == "-":
            return None  # the program comes from standard input
        elif arg.startswith("--"):
            continue  # --version, --help...: long options take no separate value
        elif arg.startswith("-"):
            if arg[1:2] in ("c", "m"):
                return None  # -c code, -m module: no script file
            skip_next = arg in ("-W", "-X")  # the options whose value is the next argument
        else:
            return index
    return None


def _directory_problem(path: Path) -> str | None:
    """Whether a directory can be used or made at ``path``, in words, or None."""
    if path.exists():
        if not path.is_dir():
            return f"must be a directory; {path} is a file"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"must be a writable directory; {path} is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


def _host_here_problem(host: str) -> str | None:
    """Whether this machine can bind ``server.host`` (its form already checked), in words, or None."""
    if host == "auto" or host_problem(host):
        return None
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        if any(host == name for _, name in _interfaces()):
            return None  # ZeroMQ binds a network interface by its name
        addresses = _resolve(host)
        if addresses is None:
            return None  # no answer in time: the receiver's bind will say
        if not addresses:
            return (
                "does not resolve to an IPv4 address on this machine: give one of its addresses, "
                'a name that resolves to one, or "auto"'
            )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
    except OSError as exc:
        shown = "" if addresses[0] == host else f"resolves to {addresses[0]}, which "
        return (
            f"{shown}is not an address this machine can bind ({exc.strerror or exc}): give one of its "
            'addresses (e.g. "127.0.0.1"), or "auto" to bind every interface'
        )
    return None


def _interfaces() -> list[tuple[int, str]]:
    try:
        return socket.if_nameindex()
    except OSError:
        return []


def _resolve(host: str) -> list[str] | None:
    """``host``'s IPv4 addresses ([] when it does not resolve), or None when the look-up did not answer in time."""
    answer: list[list[str]] = []

    def look_up() -> None:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
            answer.append([str(info[4][0]) for info in infos])
        except (OSError, UnicodeError):
            answer.append([])

    thread = threading.Thread(target=look_up, name="jaxsurro-host-lookup", daemon=True)
    thread.start()
    thread.join(HOST_LOOKUP_TIMEOUT_S)
    return answer[0] if answer else None


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (``SC_PHYS_PAGES × SC_PAGE_SIZE``), None where unknown."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def memory_estimate(config: Config) -> list[tuple[str, int]]:
    """The big arrays one server rank holds, as (formula with its keys and values, bytes), largest first.

    Float32 throughout: the buffer (per rank; none in offline mode, whose dataset is on disk), its
    copy with ``train.after_reception = N``, the validation set (rank 0), the model's parameters
    with Adam's two moments (the whole MLP; for other models its output layer, H × sample size),
    a training batch on the host, on the device and as predictions, and the simulation table with
    the receiver's record of stored steps.
    """
    solver, train = config.solver, config.train
    size, inputs = solver.sample_size, len(solver.parameters) + 1
    hidden, layers = config.model.hidden, config.model.layers
    if config.model.name == "mlp":
        n_params, width = 0, inputs
        for _ in range(layers):
            n_params, width = n_params + (width + 1) * hidden, hidden
        n_params += (width + 1) * size
        model = f"model (mlp: model.hidden {hidden}, model.layers {layers}, {inputs} inputs → sample size {size})"
    else:
        n_params = (hidden + 1) * size
        model = f"model's output layer (model.hidden {hidden} × sample size {size})"
    capacity, batch, n_val, n_steps = config.buffer.capacity, train.batch_size, train.n_validation, solver.n_steps
    n_sims = config.study.n_simulations
    buffer = (
        f"buffer.capacity × (sample size + inputs) × 4 B = {capacity} × ({size} + {inputs}) × 4 B",
        capacity * (size + inputs) * 4,
    )
    parts = [
        (
            f"train.n_validation × solver.n_steps × sample size × 4 B = {n_val} × {n_steps} × {size} × 4 B",
            n_val * n_steps * size * 4,
        ),
        (f"{model}: {n_params} parameters × 4 B × 3 (Adam)", n_params * 4 * 3),
        (
            f"train.batch_size × (sample size + inputs) × 4 B × 3 = {batch} × ({size} + {inputs}) × 4 B × 3",
            batch * (size + inputs) * 4 * 3,
        ),
        (
            f"study.n_simulations × ({SIMULATION_RECORD_BYTES} B + solver.n_steps) = "
            f"{n_sims} × ({SIMULATION_RECORD_BYTES} + {n_steps}) B",
            n_sims * (SIMULATION_RECORD_BYTES + n_steps),
        ),
    ]
    if config.study.mode == "online":
        parts.append(buffer)
    if isinstance(train.after_reception, int) and train.after_reception > 0:
        parts.append((f"train.after_reception's copy of the final buffer: {buffer[0]}", buffer[1]))
    return sorted(parts, key=lambda part: -part[1])


def memory_problem(config: Config, available: int | None = None) -> str | None:
    """Whether :func:`memory_estimate` exceeds ``available`` bytes (default: :func:`physical_memory`)."""
    available = physical_memory() if available is None else available
    parts = memory_estimate(config)
    total = sum(nbytes for _, nbytes in parts)
    if available is None or total <= available:
        return None
    grid = any(
        d == "{grid_size}" for f in config.solver.fields for d in (f.shape if isinstance(f.shape, tuple) else ())
    )
    layout = f"solver.fields at solver.grid_size {config.solver.grid_size}" if grid else "the solver.fields shapes"
    terms = "; ".join(f"{formula} = {_bytes(nbytes)}" for formula, nbytes in parts if nbytes * 100 >= total)
    return (
        f"the run needs about {_bytes(total)} of memory per server rank, more than this machine's "
        f"{_bytes(available)} of physical memory: {terms} (sample size {config.solver.sample_size}: {layout}); "
        "lower the values named"
    )


def dataset_bytes(config: Config) -> int:
    """What an offline run writes under ``<run_dir>/dataset/``: every time step, float32 (file headers aside)."""
    return config.study.n_simulations * config.solver.n_steps * config.solver.sample_size * 4


def disk_problem(config: Config, cwd: Path, available: int | None = None) -> str | None:
    """Offline mode: whether :func:`dataset_bytes` exceeds ``available`` bytes (default: the free space
    of the file system that holds, or will hold, ``study.output_dir``)."""
    if config.study.mode != "offline":
        return None
    path = Path(cwd, config.study.output_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    if available is None:
        try:
            available = shutil.disk_usage(path).free
        except OSError:
            return None  # the directory rules report what is wrong with the path
    needed = dataset_bytes(config)
    if needed <= available:
        return None
    solver = config.solver
    return (
        f'study.mode = "offline" writes its dataset to study.output_dir ({config.study.output_dir!r}): '
        f"study.n_simulations × solver.n_steps × sample size × 4 B = {config.study.n_simulations} × "
        f"{solver.n_steps} × {solver.sample_size} × 4 B = {_bytes(needed)}, more than the {_bytes(available)} "
        f"free on {path}; lower the values named or choose another study.output_dir"
    )


def _bytes(n: int) -> str:
    """``n`` bytes for people: 512 B, 1.5 GiB, 7.28 PiB."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"


# ----------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------


def to_dict(config: Config) -> dict[str, Any]:
    """The configuration as plain TOML-serializable data (``None`` values left out)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        return value

    return {
        section.name: {
            k: plain(v) for k, v in dataclasses.asdict(getattr(config, section.name)).items() if v is not None
        }
        for section in dataclasses.fields(config)
    }


def dumps(config: Config) -> str:
    """The resolved configuration as TOML text; loading it gives the same configuration."""
    return tomli_w.dumps(to_dict(config))


def add_config_arguments(
    parser: argparse.ArgumentParser, what: str = "experiment TOML file", default: str | Path | None = None
) -> None:
    """The experiment file (optional when ``default`` is given) and its repeatable ``--set SECTION.KEY=VALUE``."""
    if default is None:
        parser.add_argument("config", help=what)
    else:
        parser.add_argument("config", nargs="?", type=Path, default=default, help=f"{what} (default {default})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value (TOML literal; bare words are strings); repeatable",
    )


def config_from_args(args: argparse.Namespace, *, server_here: bool = True) -> Config | None:
    """The configuration named by :func:`add_config_arguments`' arguments; None after printing why it is refused.

    Checks the configuration, then :func:`check_machine` (``server_here``: whether the server runs
    on this machine). Call it before importing anything heavy and before creating anything.
    """
    try:
        config = load_config(args.config, args.overrides)
        check_machine(config, str(args.config), server_here=server_here)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxsurro.config CONFIG [--set k=v ...]``: validates and prints the resolved configuration."""
    parser = argparse.ArgumentParser(prog="python -m jaxsurro.config", description=main.__doc__)
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    if config is None:
        return 2
    print(dumps(config), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
