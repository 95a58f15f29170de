"""Every bad configuration is refused by the entry points, fast and clearly, before anything starts.

Each case of the table runs ``python -m jaxsurro.run`` in a subprocess on experiments/heat.toml
with ``--set`` overrides (or on a bad file): exit status 2, stderr names the key, no traceback,
nothing created under the study's directories, and under a second, interpreter start included.
A good configuration still runs, and the refusals happen before JAX or the server are imported.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAT = ROOT / "experiments/heat.toml"
LIMIT_S = 1.0  # a refusal's wall time, the interpreter's start included
HEAVY = ("jax", "jaxlib", "flax", "optax", "mpi4py", "mpi4jax", "zmq", "scipy")  # nothing of these before the check


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]  # --set values; "{tmp}" becomes the test's directory
    fragment: str  # a distinctive part of the message, naming the key
    toml: str | None = None  # the configuration file's text instead of experiments/heat.toml
    files: tuple[str, ...] = ()  # empty files made in the test's directory first


def case(name: str, *overrides: str, fragment: str, toml: str | None = None, files: tuple[str, ...] = ()) -> Case:
    return Case(name, overrides, fragment, toml, files)


FIELDS = "solver.fields="
CASES = [
    # The ones that got past the checker at an earlier commit.
    case("client-timeout-inf", "server.client_timeout=inf", fragment="server.client_timeout (inf) must be positive"),
    case("poll-interval-inf", "launcher.poll_interval=inf", fragment="launcher.poll_interval (inf) must be positive"),
    case(
        "missing-solver-script",
        'solver.command=["{python}", "solvers/no_such_solver.py", "--client"]',
        fragment="solver.command[1] ('solvers/no_such_solver.py') is the solver's Python script and must exist",
    ),
    case(
        "missing-program",
        'solver.command=["no-such-solver-program", "--steps", "{n_steps}"]',
        fragment="solver.command[0] ('no-such-solver-program') must be the solver program",
    ),
    case("host-256", "server.host=256.1.2.3", fragment="server.host ('256.1.2.3') is not a valid IPv4 address"),
    case("seed-negative", "study.seed=-1", fragment="study.seed (-1) must be at least 0"),
    case("n-simulations-9e18", "study.n_simulations=9e18", fragment="study.n_simulations (9e+18) must be an integer"),
    case(
        "n-simulations-huge",
        "study.n_simulations=9000000000000000000",
        fragment="study.n_simulations (9000000000000000000) × solver.n_steps (50) must be at most 2**63",
    ),
    case("grid-size-huge", "solver.grid_size=1000000", fragment="solver.fields at solver.grid_size 1000000"),
    case("capacity-9e18", "buffer.capacity=9e18", fragment="buffer.capacity (9e+18) must be an integer"),
    case(
        "capacity-huge",
        "buffer.capacity=9000000000000000000",
        fragment="buffer.capacity × (sample size + inputs) × 4 B = 9000000000000000000 × (1024 + 6)",
    ),
    case("n-steps-9e12", "solver.n_steps=9e12", fragment="solver.n_steps (9000000000000.0) must be an integer"),
    case(
        "n-steps-huge",
        "solver.n_steps=9000000000000",
        fragment="solver.n_steps (9000000000000) must be at most 4294967296",
    ),
    # Hosts.
    case("host-not-here", "server.host=192.0.2.1", fragment="server.host ('192.0.2.1') is not an address this"),
    case("host-ipv6", "server.host='::1'", fragment="server.host ('::1') is an IPv6 address"),
    case("host-bad-name", "server.host='bad host'", fragment="server.host ('bad host') must be"),
    case("host-unknown-name", "server.host=no-such-host.invalid", fragment="server.host ('no-such-host.invalid')"),
    # Durations and other numbers.
    case("startup-timeout-nan", "server.startup_timeout=nan", fragment="server.startup_timeout (nan) must be"),
    case("receive-timeout-huge", "server.receive_timeout=1e12", fragment="server.receive_timeout (1000000000000.0)"),
    case("batch-timeout-negative", "train.batch_timeout=-1", fragment="train.batch_timeout (-1.0) must be positive"),
    case("learning-rate-nan", "train.learning_rate=nan", fragment="train.learning_rate (nan) must be a positive"),
    case("dt-inf", "solver.dt=inf", fragment="solver.dt (inf) must be a positive number"),
    case("bounds-inf", "solver.parameters.T0=[0.0, inf]", fragment="solver.parameters.T0 ([0.0, inf]) must be"),
    case("bounds-float32", "solver.parameters.T0=[1e39, 1e40]", fragment="solver.parameters.T0 ([1e+39, 1e+40])"),
    case("r-cycles-inf", "breed.r_cycles=inf", fragment="breed.r_cycles (inf) must be positive"),
    case("max-attempts-zero", "launcher.max_attempts=0", fragment="launcher.max_attempts (0) must be at least 1"),
    case(
        "halve-every-huge",
        "train.halve_every_samples=9000000000000000000",
        fragment="train.halve_every_samples (9000000000000000000) must be at most 2**31 - 1 batches",
    ),
    case("layers-huge", "model.layers=100000", fragment="model.layers (100000) must be at most 1000"),
    # Memory.
    case("hidden-huge", "model.hidden=100000000", fragment="model (mlp: model.hidden 100000000"),
    case(
        "batch-huge", "train.batch_size=10000000000000", fragment="train.batch_size × (sample size + inputs) × 4 B × 3"
    ),
    case(
        "validation-huge",
        "train.n_validation=1000000000",
        fragment="train.n_validation × solver.n_steps × sample size × 4 B = 1000000000 × 50",
    ),
    # Fields.
    case(
        "field-5-dims",
        FIELDS + '[{name = "u", shape = [2, 2, 2, 2, 2]}]',
        fragment="solver.fields[0].shape ([2, 2, 2, 2, 2]) has 5 dimensions",
    ),
    case(
        "field-dim-huge",
        FIELDS + '[{name = "u", shape = [5000000000]}]',
        fragment="solver.fields[0].shape entry 5000000000 must be at most",
    ),
    case("field-name-empty", FIELDS + '[{name = "", shape = [4]}]', fragment="solver.fields[0].name ('')"),
    case(
        "field-duplicate",
        FIELDS + '[{name = "u", shape = [4]}, {name = "u", shape = [4]}]',
        fragment="solver.fields: the name 'u' is declared 2 times",
    ),
    case(
        "field-placeholder",
        FIELDS + '[{name = "u", shape = ["{grid}"]}]',
        fragment="solver.fields[0].shape entry '{grid}' must be",
    ),
    case("fields-not-tables", 'solver.fields="u"', fragment="solver.fields must be an array of tables"),
    # Keys, types, commands, names, directories.
    case("unknown-key", "train.batchsize=3", fragment="train.batchsize is not a known key"),
    case("unknown-section", "bogus.x=1", fragment="bogus is not a known key"),
    case("wrong-type", 'train.batch_size="64"', fragment="train.batch_size ('64') must be an integer"),
    case("bad-choice", "buffer.kind=lifo", fragment="buffer.kind ('lifo') must be one of"),
    case("watermark-above-capacity", "buffer.watermark=99999", fragment="buffer.watermark (99999) must not exceed"),
    case("command-empty", "solver.command=[]", fragment="solver.command must not be empty"),
    case(
        "command-placeholder",
        'solver.command=["{pyton}", "solvers/heat.py"]',
        fragment="solver.command[0] ('{pyton}') has an unknown placeholder",
    ),
    case("program-not-executable", 'solver.command=["./README.md"]', fragment="is not executable"),
    case("study-name-slash", "study.name='a/b'", fragment="study.name ('a/b') must be"),
    case(
        "output-dir-is-a-file",
        "study.output_dir='{tmp}/a-file'",
        fragment="study.output_dir ('{tmp}/a-file') must be a directory",
        files=("a-file",),
    ),
    case(
        "breed-window",
        "sampler.kind=breed",
        "study.n_simulations=20",
        fragment="breed.window (200) must not exceed study.n_simulations (20)",
    ),
    case("malformed-override", "batch_size=3", fragment="override 'batch_size=3' must look like section.key=value"),
    # Offline mode and training after reception.
    case("mode-unknown", "study.mode=batch", fragment="study.mode ('batch') must be one of 'online', 'offline'"),
    case("epochs-zero", "study.mode=offline", "study.epochs=0", fragment="study.epochs (0) must be at least 1"),
    case("epochs-online", "study.epochs=3", fragment='study.epochs (3) applies to study.mode = "offline"'),
    case("epochs-float", "study.mode=offline", "study.epochs=2.5", fragment="study.epochs (2.5) must be an integer"),
    case("encryption-unknown", "server.encryption=tls", fragment="server.encryption ('tls') must be one of"),
    case(
        "persistent-clients-negative",
        "launcher.persistent_clients=-1",
        fragment="launcher.persistent_clients (-1) must be at least 0",
    ),
    case(
        "after-reception-negative",
        "train.after_reception=-1",
        fragment="train.after_reception (-1) must be at least 0",
    ),
    case(
        "after-reception-word",
        "train.after_reception=forever",
        fragment="train.after_reception ('forever') must be one of 'drain' or an integer",
    ),
    case(
        "after-reception-offline",
        "study.mode=offline",
        "train.after_reception=10",
        fragment='train.after_reception (10) applies to study.mode = "online"',
    ),
    case(
        "offline-breed",
        "study.mode=offline",
        "sampler.kind=breed",
        "study.n_simulations=300",
        fragment='sampler.kind = "breed" needs study.mode = "online"',
    ),
    case(
        "offline-ranks",
        "study.mode=offline",
        "launcher.server_ranks=2",
        fragment='study.mode = "offline" runs on one server rank, not launcher.server_ranks = 2',
    ),
    case(
        "offline-disk",
        "study.mode=offline",
        "study.n_simulations=100000",
        "solver.n_steps=1000000",
        fragment='study.mode = "offline" writes its dataset to study.output_dir',
    ),
    # Bad files.
    case("bad-toml", fragment="not valid TOML", toml="[study\nname = 1\n"),
    case("section-not-a-table", fragment="solver must be a table", toml="solver = 3\n"),
    case(
        "missing-required",
        fragment="solver.command is required and missing",
        toml='[study]\nname = "x"\n[solver]\nparameters = {a = [0.0, 1.0]}\nfields = [{name = "u", shape = [4]}]\n',
    ),
    case("missing-file", fragment="does not exist", toml=""),  # "" : the file is not written
]


def command(module: str, config: Path, tmp: Path, overrides: tuple[str, ...], *extra: str) -> list[str]:
    directories = (f"study.output_dir='{tmp / 'runs'}'", f"study.cache_dir='{tmp / 'cache'}'")
    sets = [arg for value in (*directories, *extra, *overrides) for arg in ("--set", value)]
    return [sys.executable, "-m", module, str(config), *sets]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def refuse(module: str, case: Case, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Runs ``module`` on the case; returns the process and its wall time (best of two: the machine is shared)."""
    config = tmp / "bad.toml" if case.toml is not None else HEAT
    if case.toml:
        config.write_text(case.toml)
    for name in case.files:
        (tmp / name).write_text("")
    overrides = tuple(o.replace("{tmp}", str(tmp)) for o in case.overrides)
    before = tree(tmp)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        result = subprocess.run(
            command(module, config, tmp, overrides, *extra), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        times.append(time.perf_counter() - started)
        if times[-1] < LIMIT_S:
            break
    assert tree(tmp) == before, f"{module} created {sorted(set(tree(tmp)) - set(before))}"
    return result, min(times)


def assert_refused(result: subprocess.CompletedProcess[str], fragment: str, wall_s: float) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stdout == ""
    assert wall_s < LIMIT_S, f"refused in {wall_s:.2f} s"


def test_the_table_is_large_and_its_names_are_unique():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_configuration_is_refused_by_run(case, tmp_path):
    result, wall_s = refuse("jaxsurro.run", case, tmp_path)
    assert_refused(result, case.fragment.replace("{tmp}", str(tmp_path)), wall_s)


SOME = [c for c in CASES if c.name in ("client-timeout-inf", "missing-solver-script", "seed-negative", "bad-toml")]


@pytest.mark.parametrize("case", SOME, ids=lambda c: c.name)
@pytest.mark.parametrize("module", ["jaxsurro.submit", "jaxsurro.config"])
def test_bad_configuration_is_refused_by_submit_and_config(case, module, tmp_path):
    extra = ("launcher.scheduler=slurm",) if module == "jaxsurro.submit" else ()
    result, wall_s = refuse(module, case, tmp_path, *extra)
    assert_refused(result, case.fragment, wall_s)


REFUSE_IN_PROCESS = """
import sys
from jaxsurro.{module} import main
code = main({argv!r})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(code, heavy)
"""


@pytest.mark.parametrize("module", ["run", "submit", "config"])
def test_the_check_comes_before_any_heavy_import(module, tmp_path):
    argv = [str(HEAT), "--set", "study.seed=-1", "--set", f"study.output_dir='{tmp_path}/runs'"]
    code = REFUSE_IN_PROCESS.format(module=module, argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []", (result.stdout, result.stderr)
    assert "study.seed (-1)" in result.stderr
    assert tree(tmp_path) == []


TINY = [  # the sizes of tests/test_end_to_end.py's tiny()
    "study.n_simulations=6",
    "solver.n_steps=10",
    "solver.grid_size=8",
    "train.n_validation=2",
    "train.batch_size=16",
    "train.validation_every=20",
    "buffer.capacity=40",
    "buffer.watermark=10",
    "model.hidden=32",
    "server.receive_timeout=60.0",
    "train.batch_timeout=60.0",
]


def test_a_good_configuration_still_runs(tmp_path):
    result = subprocess.run(
        [*command("jaxsurro.run", HEAT, tmp_path, tuple(TINY)), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "[jaxsurro] finished 6/6 simulations" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "summary.json").is_file()
