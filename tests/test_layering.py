"""Imports point down: the import graph of ga_ray (built with `ast`, every import, function-level ones
included) never goes from a lower layer to a higher one.

LAYERS is THE layer order of the project (the README's design section shows it): a module may import
modules of its own layer or of lower layers only. A unit is a top-level module or package of ga_ray
(`config`, `atoms`), or a submodule named on its own (`demo.formats`): a module belongs to the unit of
its longest matching name. A new module or package must be given a layer here, or this test fails.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "ga_ray"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors"),  # "" is the package itself (ga_ray/__init__.py: the version)
    ("config", "tables"),
    ("rundir",),
    ("context", "resources", "raycluster", "storage"),
    # pure helpers every stage may use: behaviour detectors, the per-document kernel, the generation engine,
    # the demo world's format checks and tasks (used by finetune and evaluate), the vendored manifest schemas
    ("detectors", "kernel", "engine", "demo.formats", "demo.tasks", "demo.vocab", "demo.tokenizer", "manifests"),
    ("data",),
    ("finetune",),
    ("factors",),
    ("gradients",),
    ("atoms",),
    ("coherence",),
    ("groups",),
    ("steer",),
    ("serve",),
    ("evaluate",),
    ("report",),
    ("demo",),
    ("bench",),
    ("pipeline",),
    ("cli",),
    ("__main__",),
)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. "ga_ray.coherence.stage"
    imported: str  # dotted module name (a `from X import name` of a submodule counts as X.name)
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of a `PACKAGE` module in `source`: top-level, function-level, relative; `known` names the
    package's modules, so that `from ga_ray.demo import tasks` is an import of `ga_ray.demo.tasks`."""
    out: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append(Import(module, sub if sub in known else target, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> list[Import]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    edges: list[Import] = []
    for f in files:
        edges += imports_of(f.read_text(), module_name(f, root), f.name == "__init__.py", known)
    return edges


def unit_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> str | None:
    """The longest unit name that `module` (dotted, with the package prefix) lies in."""
    rel = module.split(".", 1)[1] if "." in module else ""
    best: str | None = None
    for layer in layers:
        for unit in layer:
            if rel == unit or (unit and rel.startswith(unit + ".")) or (unit == "" and rel == ""):
                if best is None or len(unit) > len(best):
                    best = unit
    return best


def layer_index(layers: tuple[tuple[str, ...], ...] = LAYERS) -> dict[str, int]:
    return {unit: i for i, layer in enumerate(layers) for unit in layer}


def wrong_way(edges: list[Import], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Imports from a lower layer to a higher one, as readable lines."""
    index = layer_index(layers)
    bad: list[str] = []
    for e in edges:
        a, b = unit_of(e.importer, layers), unit_of(e.imported, layers)
        if a is None or b is None:
            continue  # reported by unlayered()
        if index[b] > index[a]:
            line = f"{e.importer} (layer {a or PACKAGE!r}) imports {e.imported} (higher layer {b!r}) at line {e.line}"
            if line not in bad:  # `from X import a, b` is one import
                bad.append(line)
    return bad


def unlayered(modules: set[str], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    return sorted(m for m in modules if unit_of(m, layers) is None)


# ------------------------------------------------------------------------------------------ tests


def test_every_module_has_a_layer():
    modules = {module_name(f) for f in ROOT.rglob("*.py")}
    missing = unlayered(modules)
    assert not missing, f"give these modules a layer in LAYERS (tests/test_layering.py): {missing}"
    units = [u for layer in LAYERS for u in layer]
    assert len(units) == len(set(units)), "a unit is listed in two layers"


def test_imports_point_down():
    edges = import_graph()
    assert len(edges) > 100  # the graph was really built
    bad = wrong_way(edges)
    assert not bad, "wrong-way imports (a lower layer must not import a higher one):\n" + "\n".join(bad)


def test_a_planted_wrong_way_import_is_caught(tmp_path):
    """On a synthetic package: a kernel module importing the pipeline inside a function, a stage importing the
    CLI through a relative import, and a stage importing a pure helper of a higher package (allowed)."""
    pkg = tmp_path / PACKAGE
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "pipeline.py": "from ga_ray.errors import StageError\n",
        "cli.py": "import ga_ray.pipeline\n",
        "kernel/__init__.py": "",
        "kernel/collate.py": "def f():\n    from ga_ray.pipeline import StageContext\n    return StageContext\n",
        "atoms/__init__.py": "",
        "atoms/stage.py": "from .. import cli\nfrom ga_ray.demo import formats\n",
        "demo/__init__.py": "",
        "demo/formats.py": "from ga_ray.errors import StageError\n",
        "demo/world.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    layers = (("", "errors"), ("kernel", "demo.formats"), ("atoms",), ("demo",), ("pipeline",), ("cli",))
    edges = import_graph(pkg)
    assert Import("ga_ray.kernel.collate", "ga_ray.pipeline", 2) in edges  # function-level import seen
    assert Import("ga_ray.atoms.stage", "ga_ray.cli", 1) in edges  # relative import resolved
    assert Import("ga_ray.atoms.stage", "ga_ray.demo.formats", 2) in edges  # submodule named by `from X import`
    bad = wrong_way(edges, layers)
    assert len(bad) == 2, bad
    assert any(b.startswith("ga_ray.kernel.collate ") and "ga_ray.pipeline" in b and "line 2" in b for b in bad)
    assert any(b.startswith("ga_ray.atoms.stage ") and "ga_ray.cli" in b for b in bad)
    # the other direction is fine, and so is the same layer
    assert not wrong_way([Import("ga_ray.cli", "ga_ray.kernel.collate", 1), Import("ga_ray.kernel", "ga_ray.demo.formats", 1)], layers)
    # a module without a layer is reported, not silently allowed
    assert unlayered({"ga_ray.demo.world", "ga_ray.newthing"}, layers) == ["ga_ray.newthing"]
    assert unit_of("ga_ray.demo.world", layers) == "demo" and unit_of("ga_ray.demo.formats", layers) == "demo.formats"


@pytest.mark.parametrize("module,unit", [("ga_ray", ""), ("ga_ray.errors", "errors"), ("ga_ray.coherence.io", "coherence"), ("ga_ray.demo.tasks", "demo.tasks")])
def test_units_of_real_modules(module, unit):
    assert unit_of(module) == unit
