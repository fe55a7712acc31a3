"""The package layout stays true: a dependency order without circles, a library that does
not import its own lab, and a command line that loads only what its command needs.

Rules checked on the import graph of ``asft_optim/`` (built with ``ast``, nothing imported):

* An edge is every ``import asft_optim...`` / ``from asft_optim... import`` / relative
  import, at module level *and* inside functions (a lazy import is still an arrow), except
  those under ``if TYPE_CHECKING:`` (annotations only, never run). ``from . import x``
  points at the submodule ``x`` when there is one, else at the package ``__init__``.
  The implicit import of a module's parent packages is not an edge.
* No circle, whatever the edges' kind.
* No module outside ``asft_optim/lab/`` imports ``asft_optim.lab``. The lab is reached
  only by name, through :mod:`importlib` at run time: the ``asft lab`` command
  (``cli._COMMANDS``) and the landscape's default ``--score``
  (``landscape_cli.DEFAULT_SCORE``), loaded only when that command or score is used.
* No library module imports the package ``__init__`` (an arrow back to the top).

And one size rule: no function of the library (outside ``asft_optim/lab/`` and the
command-line modules ``cli.py`` / ``*_cli.py``) reaches 60 lines, ``def`` to end.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import asft_optim

PACKAGE = Path(asft_optim.__file__).parent
ROOT = PACKAGE.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _edges(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
            for t in targets:
                if t == "asft_optim" or t.startswith("asft_optim."):
                    out.add(t)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if not (mod == "asft_optim" or mod.startswith("asft_optim.")):
            continue
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
        out.update(subs)
        if len(subs) < len(node.names):  # some names are attributes of ``mod`` itself
            out.add(mod)
    out.discard(name)
    return {e for e in out if e in MODULES or any(m.startswith(e + ".") for m in MODULES)}


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_the_package():
    assert {"asft_optim", "asft_optim.optimizer", "asft_optim.targets", "asft_optim.baselines.safe_lora"} <= set(GRAPH)
    assert "asft_optim.targets" in GRAPH["asft_optim.optimizer"]
    assert "asft_optim.targets" in GRAPH["asft_optim.discovery"]


def test_no_import_circle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_does_not_import_its_lab():
    bad = {
        n: sorted(e for e in edges if e == "asft_optim.lab" or e.startswith("asft_optim.lab."))
        for n, edges in GRAPH.items()
        if not (n == "asft_optim.lab" or n.startswith("asft_optim.lab."))
    }
    bad = {n: e for n, e in bad.items() if e}
    assert not bad, f"library modules importing asft_optim.lab: {bad}"


def test_no_module_imports_the_package_top():
    bad = sorted(n for n, edges in GRAPH.items() if "asft_optim" in edges and not n.startswith("asft_optim.lab"))
    assert not bad, f"modules importing the package __init__ (an arrow back to the top): {bad}"


def test_every_public_module_declares_all():
    missing = [
        n for n, p in MODULES.items()
        if not p.name.startswith("_") or p.name == "__init__.py"
        if "__all__" not in p.read_text() and not n.endswith("_cli") and n not in ("asft_optim.version",)
        and not n.startswith("asft_optim.lab.")  # the lab is an application, not API
    ]
    assert not missing, f"modules without __all__: {missing}"


#: The longest a library function may be, from its ``def`` to its last line (docstring included).
MAX_FUNCTION_LINES = 59


def test_library_functions_stay_short():
    """Every function of the library (the lab and the command lines aside: applications that
    parse, run and write) is under 60 lines, so each does one thing a reader can hold."""
    long = []
    for n, p in MODULES.items():
        if n.startswith("asft_optim.lab") or n == "asft_optim.cli" or n.endswith("_cli"):
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{n}.{node.name} ({lines} lines, line {node.lineno})")
    assert MODULES and not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by responsibility): {long}"


def test_command_table_matches_the_commands_own_help():
    """``asft --help`` lists the commands from ``cli._COMMANDS`` without importing them:
    their one-line help there must be what each command says of itself."""
    import argparse
    import importlib

    from asft_optim.cli import _COMMANDS

    for name, (module, help_text) in _COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).add_parser(sub)
        [action] = sub._choices_actions
        assert (action.dest, action.help) == (name, help_text)


_PROBE = """
import json, sys
from asft_optim.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("transformers", "peft", "asft_optim.lab", "asft_optim.baselines", "asft_optim.integrations")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _loaded_by(*argv: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_asft_help_imports_neither_transformers_nor_the_lab():
    assert _loaded_by("--help") == []


@pytest.mark.parametrize("side", ["output", "input", "gradient"])
def test_asft_anchors_info_imports_neither_transformers_nor_the_lab(tmp_path, side):
    import torch

    from asft_optim import Anchors
    from asft_optim.input_anchors import InputAnchors
    from asft_optim.input_projection import InputProjection
    from asft_optim.refusal_gradients import SafetySubspaces
    from asft_optim.safety_subspace import SafetySubspace

    path = tmp_path / "a.anchors.safetensors"
    basis = torch.linalg.qr(torch.randn(4, 2)).Q
    {"output": lambda: Anchors.from_deltas({"layer.weight": torch.randn(4, 3)}, "safelora"),
     "input": lambda: InputAnchors({"layer.weight": InputProjection(basis, d_out=3)}),
     "gradient": lambda: SafetySubspaces({"layer.weight": SafetySubspace(basis, d_in=3)}),
     }[side]().save(path)
    assert _loaded_by("anchors", "info", str(path)) == []
