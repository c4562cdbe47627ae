"""The source tree as the README describes it: one line per module in its Architecture section."""

from __future__ import annotations

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
