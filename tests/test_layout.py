"""The package's shape: subpackages with a face each, no import circle at any level, small
modules and classes, the old public paths forwarded, and every relative link in the docs alive.

Read from the source as text (``ast``), so that an import hidden in a function or under
``TYPE_CHECKING`` counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

from tests.support.cli import ROOT, run_python

tomllib = pytest.importorskip("tomllib")

PACKAGE = ROOT / "pma_dist"
SUBPACKAGES = (
    "kernels", "core", "backends", "state", "export", "merger", "policies", "integrations",
    "tools", "testing",
)  # fmt: skip
FORWARDED = {
    "pma_dist.selection": "pma_dist.merger",
    "pma_dist.plan": "pma_dist.tools",
    "pma_dist.sharding": "pma_dist.tools",
    "pma_dist.cli": "pma_dist.tools.cli",
}
"""Old module paths kept for one release, and where their code lives now."""
MAX_TOP_LEVEL = 8
MAX_MODULE_LINES = 300
MAX_CLASS_LINES = 200


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every pma_dist module ``name`` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.add(target if target in modules else source)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _unit(module: str) -> str:
    """The subpackage a module belongs to, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_circle_between_modules() -> None:
    assert _cycle(_graph()) is None


def test_no_import_circle_between_subpackages() -> None:
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        unit = _unit(module)
        units.setdefault(unit, set()).update(_unit(t) for t in targets if _unit(t) != unit)
    assert _cycle(units) is None


def test_packages_reach_each_other_through_their_faces() -> None:
    """A private module (``_name``) of a subpackage is imported only inside that subpackage
    (the forwarding modules alias theirs on purpose)."""
    reached = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module not in FORWARDED
        for target in targets
        if target.count(".") >= 2
        and target.rpartition(".")[2].startswith("_")
        and _unit(target) != _unit(module)
    ]
    assert not reached


def test_a_circle_is_found_where_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_top_level_holds_few_modules_and_the_forwarding_ones_only_forward() -> None:
    top = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    forwarding = [
        p for p in top if "Forwarding module" in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    real = sorted(p.name for p in top if p not in forwarding)
    assert len(real) <= MAX_TOP_LEVEL, real
    assert sorted(f"pma_dist.{p.stem}" for p in forwarding) == sorted(FORWARDED)
    for path in forwarding:
        assert len(path.read_text().splitlines()) <= 25, f"{path.name} does more than forward"
    assert sorted(
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    ) == sorted(SUBPACKAGES)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_package_face_declares_what_it_exports(package: str) -> None:
    module = importlib.import_module(f"pma_dist.{package}")
    names = module.__all__
    assert names or package == "integrations", f"{package} exports nothing"
    assert len(set(names)) == len(names), package
    for name in names:
        assert hasattr(module, name) or importlib.util.find_spec(f"{module.__name__}.{name}"), name
    internal = [
        p.name
        for p in (PACKAGE / package).glob("*.py")
        if p.name != "__init__.py" and not p.name.startswith("_")
    ]
    public = {
        "integrations": {p.name for p in (PACKAGE / package).glob("*.py")},
        "tools": {"cli.py"},
    }
    assert set(internal) <= public.get(package, set()), (
        f"modules of {package} not private: {internal}"
    )


def test_the_root_face_declares_what_it_exports() -> None:
    import pma_dist

    assert all(hasattr(pma_dist, name) for name in pma_dist.__all__)


def test_importing_pma_dist_loads_no_engine() -> None:
    """``import pma_dist`` stays light: engines, DTensor, DCP and the trainers load when used."""
    heavy = (
        "torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp",
        "deepspeed", "transformers", "lightning", "olmo_core", "torchtitan", "safetensors",
    )  # fmt: skip
    child = run_python(
        f"import sys, pma_dist\nprint(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    assert child.returncode == 0 and child.stdout.strip() == "[]", child.stdout + child.stderr


def test_modules_and_classes_stay_small() -> None:
    long_modules, long_classes = [], []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ClassDef):
                continue
            lines = set(range(node.lineno, node.end_lineno + 1))
            for inner in ast.walk(node):
                if isinstance(inner, ast.Expr) and isinstance(
                    getattr(inner, "value", None), ast.Constant
                ):
                    if isinstance(inner.value.value, str):
                        lines -= set(range(inner.lineno, inner.end_lineno + 1))
            if len(lines) > MAX_CLASS_LINES:
                long_classes.append(f"{path.name}:{node.name}")
    assert not long_modules and not long_classes, (long_modules, long_classes)


def test_old_module_paths_forward_to_the_moved_code() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pma_dist import Merger, MergeSpec, merger, plan, selection, sharding, tools
        from pma_dist.cli import main

    assert merger.Merger is Merger and selection.Candidate is MergeSpec
    assert selection.select is importlib.import_module("pma_dist.merger").select
    assert plan is sys.modules["pma_dist.tools._plan"], "an alias of the module, not a copy"
    assert sharding.fully_shard_blocks is tools.fully_shard_blocks
    assert main is importlib.import_module("pma_dist.tools.cli").main
    fresh = run_python(
        "import warnings, pma_dist.plan\n"
        "warnings.simplefilter('error')\n"
        "import pma_dist.tools._plan as p\n"
        "assert pma_dist.plan is p\n"
    )
    assert fresh.returncode == 0, fresh.stderr
    old = run_python(
        "import runpy, sys\n"
        "sys.argv = ['pma-dist', '--version']\n"
        "runpy.run_module('pma_dist.cli', run_name='__main__')\n"
    )
    assert old.returncode == 0 and old.stdout.strip(), old.stderr


def test_packaging_points_at_the_moved_files() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["pma-dist"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: nothing matches {pattern}"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: p.name)
def test_every_relative_link_resolves(document: Path) -> None:
    text = document.read_text()
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(target)
    assert not broken, f"{document.name}: {broken}"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for heading in ("## Install", "## Quickstart", "make demo", "make test", "## Features"):
        assert heading in readme, heading


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A page\n[ok](#a-page) [gone](missing.md) [anchor](#nowhere)\n")
    targets = [m.group(1) for m in LINK.finditer(page.read_text())]
    assert targets == ["#a-page", "missing.md", "#nowhere"]
    assert _anchors(page.read_text()) == {"a-page"}
