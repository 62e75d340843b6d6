"""The layering of docs/architecture.md holds: every module of src/mole imports only from its own layer or below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(text: str) -> dict[str, int]:
    """{row: layer} from the first ```text block whose first line starts with 'layer' (a row: 'io', 'eval/')."""
    for block in re.findall(r"```text\n(.*?)```", text, re.S):
        lines = block.splitlines()
        if lines and lines[0].startswith("layer"):
            rows = {}
            for line in lines[1:]:
                m = re.match(r"^\s*(\d+)\s+(.+)$", line)
                if m:
                    for name in m[2].split():
                        rows[name] = int(m[1])
            return rows
    raise AssertionError(f"{DOC} has no layer table (a ```text block starting with 'layer')")


def layer_of(module: str, rows: dict[str, int]) -> int | None:
    """The layer of a module 'mole.a.b' by the longest row that covers it ('a.b', 'a/' or 'a')."""
    parts = module.split(".")[1:]
    best = None
    for row, layer in rows.items():
        name = row.rstrip("/").split(".")
        folder = row.endswith("/")
        if parts[: len(name)] == name and (folder or len(parts) == len(name)):
            if best is None or len(name) > best[0] or (len(name) == best[0] and not folder):
                best = (len(name), layer)
    return None if best is None else best[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "mole").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> list[tuple[int, str, str]]:
    """(line, imported module of mole, text) for every import in the file, lazy ones included."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"
            if target == "mole" or target.startswith("mole."):
                if node.module is None:  # from . import x: x may be a module of the package
                    for name in names:
                        out.append((node.lineno, f"{target}.{name}", text))
                else:
                    out.append((node.lineno, target, text))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "mole" or a.name.startswith("mole."):
                    out.append((node.lineno, a.name, f"import {a.name}"))
    return out


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module an import names: `from mole.x import y` names mole.x.y when that is a module, else mole.x."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check(known: dict[str, Path], rows: dict[str, int]) -> list[str]:
    problems = []
    layer: dict[str, int] = {}
    faces = {m for m, p in known.items() if p.name == "__init__.py"}
    for m in known:
        if m == "mole":
            continue
        got = layer_of(m, rows)
        if got is None and m not in faces:
            problems.append(f"{m} has no layer in docs/architecture.md: add a row for it")
        elif got is not None:
            layer[m] = got
    edges = {m: [(ln, resolve(t, known), text) for ln, t, text in imports(known[m], m)] for m in known}

    def face_layer(face: str, seen=()) -> int:  # a folder's __init__ stands on the highest layer it imports
        if face in layer:
            return layer[face]
        tops = [effective(t, seen + (face,)) for _, t, _ in edges[face] if t and t != face and t not in seen]
        return max(tops, default=1)

    def effective(m: str, seen=()) -> int:
        return face_layer(m, seen) if m in faces and m not in layer else layer.get(m, 0)

    for m, found in edges.items():
        if m == "mole":
            continue
        own = effective(m)
        for line, target, text in found:
            if target is None or target == m:
                continue
            if target == "mole":
                problems.append(f"{_where(known[m])}:{line}: `{text}` imports the package face mole/__init__")
                continue
            if m in faces and target.startswith(m + "."):
                continue  # a face hands its own modules' names on
            theirs = effective(target)
            if theirs > own:
                problems.append(
                    f"{_where(known[m])}:{line}: `{text}` climbs from {m} (layer {own}) to {target} "
                    f"(layer {theirs})"
                )
    return problems


def test_every_module_imports_only_its_own_layer_or_below():
    problems = check(modules(), read_layers(DOC.read_text()))
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    known = modules()
    graph = {m: {resolve(t, known) for _, t, _ in imports(p, m)} - {None, m} for m, p in known.items()}
    graph = {m: {t for t in ts if not (m in t or t.startswith(m + "."))} for m, ts in graph.items()}  # faces
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != "mole":
            visit(m, [m])


@pytest.mark.parametrize(
    "source, module, bad",
    [
        ("from ..io import load_mole\n", "mole.formats.kohya", True),  # a format climbing to the orchestrator
        ("def f():\n    from .cli import main\n", "mole.inject", True),  # a lazy import climbs too
        ("from . import __version__\n", "mole.io", True),  # the package face
        ("from .inject import mole_layers\n", "mole.io", False),  # down is fine
        ("from .common import read_safetensors\n", "mole.formats.lora", False),  # same layer
        ("from mole.training.config import load_config\n", "mole.inference.pipeline", True),  # absolute, climbing
    ],
)
def test_the_check_fails_on_a_climbing_import(tmp_path, source, module, bad):
    known = modules()
    fake = tmp_path / (module.rsplit(".", 1)[-1] + ".py")
    fake.write_text(known[module].read_text() + "\n" + source)
    known[module] = fake
    rows = read_layers(DOC.read_text())
    problems = [p for p in check(known, rows) if p.startswith(str(fake))]
    assert bool(problems) is bad, problems


def test_the_table_covers_rows_by_the_longest_match():
    rows = {"eval/": 7, "eval.runner": 9, "io": 5, "cli/": 12}
    assert layer_of("mole.eval.metrics", rows) == 7
    assert layer_of("mole.eval.runner", rows) == 9
    assert layer_of("mole.cli.train", rows) == 12 and layer_of("mole.cli", rows) == 12
    assert layer_of("mole.io", rows) == 5 and layer_of("mole.iox", rows) is None
    assert layer_of("mole.io.sub", rows) is None  # a module row covers that module alone
