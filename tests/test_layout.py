"""The source tree: as the README's Architecture section lists it (one line per module), and the one import
rule that lint-imports cannot check (who may import the kernels)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    """Every module of calm_fast and kernels, as a path from the repository root (kernels once, by its
    real folder, not through the calm_fast/kernels link)."""
    found = set()
    for package in ("calm_fast", "kernels"):
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if relative.parts[:2] == ("calm_fast", "kernels") or "__pycache__" in relative.parts:
                continue
            found.add(relative.as_posix())
    return found


def _architecture_tree() -> list[str]:
    """The paths the README's Architecture tree names, built from its indentation (two spaces a level)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    start = section.index("    calm_fast/\n")
    end = section.index("    configs/")
    paths, folders = [], []
    for line in section[start:end].splitlines():
        match = re.match(r"^( {4,})(\S+)", line)
        if not match:
            continue
        depth = (len(match.group(1)) - 4) // 2
        name = match.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        else:
            paths.append("".join(folders) + name)
    return paths


def test_the_readme_architecture_names_every_module_once_and_no_other():
    listed = _architecture_tree()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    modules = _source_modules()
    # An __init__.py that only re-exports or documents its package may be left to the folder's line.
    missing = {path for path in modules - set(listed) if not path.endswith("__init__.py")}
    stale = set(listed) - modules
    assert not missing, f"modules missing from the README's Architecture: {sorted(missing)}"
    assert not stale, f"README Architecture lines naming no module: {sorted(stale)}"


# The head dispatches to the kernels; the head benchmark and its checks time and test them directly. Every
# other module goes through calm_fast.head. lint-imports cannot enforce this: it lints kernels/ as the
# top-level package `kernels`, and `calm_fast.kernels` (installed from that folder) is not in its graph.
KERNEL_IMPORTERS = {"calm_fast/head.py", "calm_fast/bench/head.py", "calm_fast/bench/head_checks.py"}


def _imported_modules(source: str, package: list[str]) -> set[str]:
    """Every module an import statement of `source` names, for a module of `package` (relative imports
    resolved; `from A import B` gives both A and A.B, since B may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _imports_kernels(modules: set[str]) -> bool:
    return any(name.split(".")[:2] == ["calm_fast", "kernels"] or name.split(".")[0] == "kernels"
               for name in modules)


def test_only_the_head_and_its_benchmark_import_the_kernels():
    importers = set()
    for module in _source_modules():
        path = Path(module)
        if path.parts[0] == "calm_fast":
            # A module's package is its folder (for an __init__.py too).
            if _imports_kernels(_imported_modules((ROOT / path).read_text(), list(path.parts[:-1]))):
                importers.add(module)
    assert "calm_fast/head.py" in importers  # the scan sees the lazy imports inside functions
    assert importers <= KERNEL_IMPORTERS, (
        f"{sorted(importers - KERNEL_IMPORTERS)} import calm_fast.kernels; go through calm_fast.head instead")


def test_the_kernel_import_scan_sees_every_spelling():
    """Absolute, from-package and relative spellings of a kernels import are found; other imports are not."""
    spellings = {
        "from calm_fast.kernels.calm_head import calm_head": True,
        "from calm_fast import kernels": True,
        "import calm_fast.kernels.calm_loss as fused": True,
        "from ..kernels import calm_loss": True,
        "from .. import kernels": True,
        "import kernels.calm_head": True,
        "from calm_fast import head": False,
        "from calm_fast.head import calm_loss": False,
        "from .kernels import x": False,  # calm_fast.evaluate.kernels, not the kernels package
    }
    for line, expected in spellings.items():
        source = f"def lazily():\n    {line}\n"
        assert _imports_kernels(_imported_modules(source, ["calm_fast", "evaluate"])) is expected, line
