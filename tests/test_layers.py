"""Imports flow one way: cli -> api -> builders -> models / data / evaluation / ops, with training beside api."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alignseg"
# A module of the left may not import any of the right (the layers above it, or beside it).
FORBIDDEN = {
    "kernels": ("ops", "models", "data", "evaluation", "builders", "api", "training", "cli", "config"),
    "ops": ("models", "data", "evaluation", "builders", "api", "training", "cli", "config"),
    "models": ("builders", "api", "training", "cli", "evaluation"),
    "data": ("models", "builders", "api", "training", "cli", "evaluation", "config"),
    "evaluation": ("models", "builders", "api", "training", "cli", "config"),
    "visualize": ("models", "builders", "api", "training", "cli", "evaluation"),
    "checkpoint": ("builders", "api", "training", "cli"),
    "distributed": ("builders", "api", "training", "cli"),
    "config": ("models", "builders", "api", "training", "cli"),
    "builders": ("api", "training", "cli"),
    "api": ("training", "cli"),
    "training": ("api", "cli"),
}


def _imported_alignseg_parts(path: Path) -> set[str]:
    """The first component under alignseg of every module ``path`` imports (relative imports resolved)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1] if path.name != "__init__.py" else module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            names = [target + [alias.name] for alias in node.names] if not node.module else [target]
        for parts in names:
            if parts and parts[0] == "alignseg" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_nothing_imports_a_layer_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]
    assert files
    wrong = {
        f"{path.relative_to(PACKAGE)} imports alignseg.{part}"
        for path in files
        if not (layer == "training" and path.name in ("checkpoint.py", "distributed.py"))  # re-exporting shims
        for part in _imported_alignseg_parts(path) & set(FORBIDDEN[layer])
    }
    assert not wrong, sorted(wrong)
