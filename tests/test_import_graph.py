"""The package's layering, checked on the source with ``ast`` (docs/architecture.md, "Four sides").

Every ``.py`` file under ``jaxsurro/``, ``solvers/`` and ``scripts/`` is parsed (not imported) and each
``import``/``from ... import`` is resolved to a full module name: relative forms against the file's
package, ``from jaxsurro import x`` to the module ``jaxsurro.x`` when such a module exists, and
``importlib.import_module("literal")`` calls as imports. Imports anywhere count, including inside
functions (lazy imports) and inside ``if TYPE_CHECKING:`` blocks, with one exception:

* **TYPE_CHECKING imports** count for the layering rules (a)-(d) and the private-name rule (f): a type
  annotation naming another side's class is a dependency on that side even though it never runs.
  They do **not** count for the cycle rule (e), because they never execute, and guarding an
  annotation-only import with TYPE_CHECKING is the standard way to break an import cycle.
* **Lazy imports inside functions** count everywhere, also for (e): an import that runs on the first
  call still executes the imported module, and a cycle through it is a cycle (it only moves the
  failure from import time to call time, where a partly initialised module shows up).

Rules (each failure prints ``path:line: rule: what``):

(a) ``jaxsurro/core/`` imports nothing of the project outside ``jaxsurro.core``, and nothing that does
    I/O: no zmq, mpi4py, mpi4jax, subprocess, multiprocessing, socket, os, io, pathlib, shutil,
    tempfile, glob; and no call to ``open`` (or ``np.load``/``np.save``/... style file functions).
(b) ``jaxsurro/client/`` imports only ``jaxsurro.client.*`` and ``jaxsurro.protocol`` of the project;
    the files a solver process loads (``jaxsurro/__init__.py``, ``jaxsurro/client/*``,
    ``jaxsurro/protocol.py``) never import jax, jaxlib, flax, optax, mpi4jax, nor mpi4py (the MPI
    client uses the communicator it is given); ``jaxsurro.protocol`` imports nothing of the project.
(c) ``jaxsurro/launcher/`` never imports ``jaxsurro.core`` or ``jaxsurro.server``.
(d) only the entry points (``jaxsurro/run.py``, ``submit.py``, ``plot.py``, ``cli.py`` and
    ``scripts/*.py``) import both ``jaxsurro.server`` and ``jaxsurro.launcher``.
(e) no import cycle among ``jaxsurro`` modules, over module-level and lazy imports (TYPE_CHECKING
    excluded, see above). An edge goes to the module named by the import (``from a.b import c`` goes to
    ``a.b.c`` when that is a module, else to ``a.b``); the implicit import of parent packages is not an
    edge, so a package ``__init__`` re-exporting its submodules is not a cycle by itself.
(f) no file imports another module's private name (``from a import _x``, ``import a._b``; dunder names
    such as ``__getattr__`` are not private), and, within ``jaxsurro/``, no ``module._private``
    attribute access on an imported project module.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("jaxsurro", "solvers", "scripts")
PACKAGE = "jaxsurro"

ENTRY_POINTS = frozenset({"jaxsurro/run.py", "jaxsurro/submit.py", "jaxsurro/plot.py", "jaxsurro/cli.py"})
CORE_FORBIDDEN = frozenset(
    {
        "zmq",
        "mpi4py",
        "mpi4jax",
        "subprocess",
        "multiprocessing",
        "socket",
        "os",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
    }
)
# Attribute calls that read or write files (np.load, path.write_text, ...); checked in core only.
FILE_CALLS = frozenset(
    {
        "open",
        "fromfile",
        "tofile",
        "loadtxt",
        "savetxt",
        "genfromtxt",
        "savez",
        "savez_compressed",
        "read_text",
        "write_text",
        "read_bytes",
        "write_bytes",
        "mkdir",
        "unlink",
        "rmdir",
    }
)
NUMPY_FILE_CALLS = frozenset({"load", "save"})  # only as np.load / jnp.save ...: "load" is too common otherwise
NUMPY_NAMES = frozenset({"np", "numpy", "jnp"})
CLIENT_HEAVY = frozenset({"jax", "jaxlib", "flax", "optax", "mpi4jax", "mpi4py"})
CLIENT_LOADED = ("jaxsurro/__init__.py", "jaxsurro/client/", "jaxsurro/protocol.py")


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from m import name`` of a non-module, the name taken from it)."""

    path: str  # repository-relative file
    line: int
    importer: str  # the importing module's name (``scripts.bench_amis`` for a script)
    target: str  # full name of the imported module
    name: str | None  # the name taken from ``target`` when it is not itself a module
    lazy: bool  # inside a function body
    type_checking: bool  # inside ``if TYPE_CHECKING:``

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclasses.dataclass
class Source:
    path: str
    module: str
    tree: ast.Module


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def sources() -> tuple[tuple[Source, ...], tuple[str, ...]]:
    """Every scanned file parsed, and the files that do not parse (another edit may be half done)."""
    parsed, broken = [], []
    for top in SCANNED:
        for file in sorted((ROOT / top).rglob("*.py")):
            relative = file.relative_to(ROOT)
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(relative))
            except SyntaxError as exc:
                broken.append(f"{relative}:{exc.lineno}: does not parse: {exc.msg}")
                continue
            parsed.append(Source(relative.as_posix(), _module_name(relative), tree))
    return tuple(parsed), tuple(broken)


@functools.cache
def project_modules() -> frozenset[str]:
    return frozenset(s.module for s in sources()[0] if s.module == PACKAGE or s.module.startswith(PACKAGE + "."))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_base(source: Source, node: ast.ImportFrom) -> str:
    """The module a ``from X import ...`` names, relative forms resolved against the file's package."""
    if not node.level:
        return node.module or ""
    package = source.module.split(".")
    if not source.path.endswith("__init__.py"):
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


class _ImportCollector(ast.NodeVisitor):
    """Collects a file's imports with their context (lazy, TYPE_CHECKING)."""

    def __init__(self, source: Source):
        self.source = source
        self.imports: list[Import] = []
        self._depth = 0  # function nesting
        self._type_checking = 0

    def _add(self, node: ast.AST, target: str, name: str | None = None) -> None:
        self.imports.append(
            Import(
                self.source.path,
                node.lineno,
                self.source.module,
                target,
                name,
                self._depth > 0,
                self._type_checking > 0,
            )
        )

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.visit(node.test)
            self._type_checking += 1
            for statement in node.body:
                self.visit(statement)
            self._type_checking -= 1
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_base(self.source, node)
        for alias in node.names:
            candidate = f"{base}.{alias.name}" if base else alias.name
            if alias.name != "*" and candidate in project_modules():
                self._add(node, candidate)
            else:
                self._add(node, base, alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if (
            isinstance(function, ast.Attribute)
            and function.attr == "import_module"
            and isinstance(function.value, ast.Name)
            and function.value.id == "importlib"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


@functools.cache
def all_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for source in sources()[0]:
        collector = _ImportCollector(source)
        collector.visit(source.tree)
        found.extend(collector.imports)
    return tuple(found)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports_of(prefix: str) -> Iterator[Import]:
    return (i for i in all_imports() if i.path.startswith(prefix))


def _fail(rule: str, violations: list[str]) -> None:
    if violations:
        pytest.fail(
            f'rule {rule} broken {len(violations)} time(s) (docs/architecture.md, "Four sides"):\n'
            + "\n".join(sorted(set(violations))),
            pytrace=False,
        )


def _kind(i: Import) -> str:
    return " (TYPE_CHECKING)" if i.type_checking else " (lazy, in a function)" if i.lazy else ""


def _shown(i: Import) -> str:
    return f"{i.target}.{i.name}" if i.name and i.name != "*" else i.target


# ------------------------------------------------------------------------------------------------
def test_every_scanned_file_parses() -> None:
    _, broken = sources()
    assert not broken, "files the import rules could not read:\n" + "\n".join(broken)


def test_a_core_is_pure() -> None:
    rule = "(a) jaxsurro/core imports only jaxsurro.core of the project and does no I/O"
    violations = []
    for i in _imports_of("jaxsurro/core/"):
        if _within(i.target, PACKAGE) and not _within(i.target, "jaxsurro.core"):
            violations.append(f"{i.where()}: {rule}: imports {_shown(i)}{_kind(i)}")
        elif i.target.split(".")[0] in CORE_FORBIDDEN:
            violations.append(f"{i.where()}: {rule}: imports {i.target}{_kind(i)}")
    for source in sources()[0]:
        if not source.path.startswith("jaxsurro/core/"):
            continue
        for node in ast.walk(source.tree):
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            if isinstance(function, ast.Name) and function.id == "open":
                violations.append(f"{source.path}:{node.lineno}: {rule}: calls open()")
            elif isinstance(function, ast.Attribute) and (
                function.attr in FILE_CALLS
                or (
                    function.attr in NUMPY_FILE_CALLS
                    and isinstance(function.value, ast.Name)
                    and function.value.id in NUMPY_NAMES
                )
            ):
                violations.append(f"{source.path}:{node.lineno}: {rule}: calls .{function.attr}() (file I/O)")
    _fail("(a)", violations)


def test_b_client_is_light() -> None:
    rule = "(b) jaxsurro/client imports only jaxsurro.client.* and jaxsurro.protocol, never JAX or MPI"
    violations = []
    for i in _imports_of("jaxsurro/client/"):
        if _within(i.target, PACKAGE) and not (_within(i.target, "jaxsurro.client") or i.target == "jaxsurro.protocol"):
            violations.append(f"{i.where()}: {rule}: imports {_shown(i)}{_kind(i)}")
    for i in all_imports():
        if i.path.startswith(CLIENT_LOADED) and i.target.split(".")[0] in CLIENT_HEAVY:
            violations.append(f"{i.where()}: {rule}: a solver process would load {i.target}{_kind(i)}")
    for i in _imports_of("jaxsurro/protocol.py"):
        if _within(i.target, PACKAGE):
            violations.append(
                f"{i.where()}: {rule}: jaxsurro.protocol must import nothing of the project, "
                f"imports {_shown(i)}{_kind(i)}"
            )
    _fail("(b)", violations)


def test_c_launcher_knows_neither_core_nor_server() -> None:
    rule = "(c) jaxsurro/launcher never imports jaxsurro.core or jaxsurro.server"
    violations = [
        f"{i.where()}: {rule}: imports {_shown(i)}{_kind(i)}"
        for i in _imports_of("jaxsurro/launcher/")
        if _within(i.target, "jaxsurro.core") or _within(i.target, "jaxsurro.server")
    ]
    _fail("(c)", violations)


def test_d_only_entry_points_join_server_and_launcher() -> None:
    rule = (
        "(d) only run.py, submit.py, plot.py, cli.py and scripts/*.py import both jaxsurro.server and jaxsurro.launcher"
    )
    by_file: dict[str, dict[str, Import]] = {}
    for i in all_imports():
        for side in ("jaxsurro.server", "jaxsurro.launcher"):
            if _within(i.target, side):
                by_file.setdefault(i.path, {}).setdefault(side, i)
    violations = []
    for path, sides in by_file.items():
        if len(sides) == 2 and path not in ENTRY_POINTS and not path.startswith("scripts/"):
            server, launcher = sides["jaxsurro.server"], sides["jaxsurro.launcher"]
            violations.append(
                f"{path}:{min(server.line, launcher.line)}: {rule}: imports {_shown(server)} "
                f"(line {server.line}) and {_shown(launcher)} (line {launcher.line})"
            )
    _fail("(d)", violations)


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, or with a self-edge."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, {})))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, {}):
                    components.append(sorted(component))
    return components


def _cycle_in(component: list[str], graph: dict[str, dict[str, Import]]) -> list[Import]:
    """One concrete cycle through the component's first module, as the imports that make it."""
    members = set(component)
    start = component[0]
    parents: dict[str, Import] = {}
    frontier = [start]
    while frontier:  # breadth first, so the cycle shown is a shortest one through `start`
        following = []
        for node in frontier:
            for successor, edge in sorted(graph.get(node, {}).items()):
                if successor not in members:
                    continue
                if successor == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, parents[path[0].importer])
                    return path
                if successor not in parents:
                    parents[successor] = edge
                    following.append(successor)
        frontier = following
    return []


def test_e_no_import_cycle() -> None:
    rule = "(e) no import cycle among jaxsurro modules (module-level and lazy imports; TYPE_CHECKING excluded)"
    graph: dict[str, dict[str, Import]] = {}
    for i in all_imports():
        if i.type_checking or not _within(i.importer, PACKAGE) or i.target not in project_modules():
            continue
        edges = graph.setdefault(i.importer, {})
        if i.target not in edges or (edges[i.target].lazy and not i.lazy):  # show a module-level edge if any
            edges[i.target] = i
    violations = []
    for component in _strongly_connected(graph):
        cycle = _cycle_in(component, graph)
        steps = "; ".join(f"{e.importer} -> {e.target} at {e.where()}{_kind(e)}" for e in cycle)
        violations.append(f"{cycle[0].where()}: {rule}: {' -> '.join(component)} form a cycle: {steps}")
    _fail("(e)", violations)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def test_f_no_private_names_across_modules() -> None:
    rule = "(f) no import of another module's _private name, no module._private access"
    violations = []
    for i in all_imports():
        private_parts = [part for part in i.target.split(".") if _private(part)]
        if i.name is not None and _private(i.name):
            violations.append(f"{i.where()}: {rule}: imports {i.name} from {i.target}{_kind(i)}")
        elif private_parts and i.importer.split(".")[0] != i.target.split(".")[0]:
            violations.append(f"{i.where()}: {rule}: imports the private module {i.target}{_kind(i)}")
    for source in sources()[0]:
        if not source.path.startswith("jaxsurro/"):
            continue
        bound: dict[str, str] = {}  # local name -> project module it names
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        bound[top] = top
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_base(source, node)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    if candidate in project_modules():
                        bound[alias.asname or alias.name] = candidate
        for node in ast.walk(source.tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head not in bound:
                continue
            module = bound[head] + (f".{rest}" if rest else "")
            if module in project_modules() and module != source.module:
                violations.append(f"{source.path}:{node.lineno}: {rule}: reads {module}.{node.attr}")
    _fail("(f)", violations)


def test_importing_the_client_loads_neither_jax_nor_mpi() -> None:
    """``import jaxsurro.client`` (and its MPI form) in a fresh interpreter loads no JAX, MPI or server code."""
    script = (
        "import json, sys\n"
        "import jaxsurro.client, jaxsurro.client.parallel\n"
        "heavy = ('jax', 'jaxlib', 'flax', 'optax', 'mpi4py', 'mpi4jax')\n"
        "sides = ('jaxsurro.core', 'jaxsurro.server', 'jaxsurro.launcher')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                        or any(m == s or m.startswith(s + '.') for s in sides))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing jaxsurro.client loaded {loaded}"
