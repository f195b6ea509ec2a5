"""The packages import one way: model -> quant -> contract -> export / runtime -> serve, with bench, cli and the
reference backend on top. Read off every module's import statements (ast), relative imports resolved."""

from __future__ import annotations

import ast
from pathlib import Path

import vl2edge

ROOT = Path(vl2edge.__file__).resolve().parent

# what each package may import from the others (itself always); "" is the vl2edge package's own __init__
ALLOWED = {
    "model": set(),
    "quant": set(),
    "contract": {"model"},
    "export": {"model", "quant", "contract"},
    "runtime": {"model", "contract"},
    "serve": {""},  # the documented surface only (vl2edge.__all__), checked by name below
}


def _module(path: Path) -> list[str]:
    parts = ["vl2edge", *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def vl2edge_imports(path: Path):
    """(imported module, imported name or None, line) for every import of a vl2edge module in `path`."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] == "vl2edge":
                for alias in node.names:
                    yield module, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vl2edge":
                    yield alias.name, None, node.lineno


def _package_of(module: str, name: str | None) -> str:
    parts = module.split(".")
    if len(parts) == 1 and name is not None and (ROOT / name).is_dir():
        return name  # `from vl2edge import runtime`
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_in_one_direction():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, name, line in vl2edge_imports(path):
                target = _package_of(module, name)
                if target != package and target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({name})")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_serve_uses_only_the_documented_surface():
    used = set()
    for path in sorted((ROOT / "serve").rglob("*.py")):
        for module, name, line in vl2edge_imports(path):
            if module == "vl2edge":
                used.add(name)
                assert name in vl2edge.__all__, f"serve/{path.name}:{line} imports vl2edge.{name}, not in __all__"
    assert {"Box", "GroundingParser"} <= used  # the check sees the imports it is about
    for name in vl2edge.__all__:  # every name of the surface resolves
        assert getattr(vl2edge, name) is not None


def test_the_checker_sees_relative_imports():
    """The resolver maps `from ..export.x import y` in runtime/ to vl2edge.export.x, so a violation would show."""
    found = {m for m, _, _ in vl2edge_imports(ROOT / "runtime" / "engine.py")}
    assert "vl2edge.contract.cache" in found and "vl2edge.model.config" in found
    assert _package_of("vl2edge.export.exporter", "export") == "export"
