"""The package layering of docs/architecture.md: what a VMM uses (``pagehint.device``,
``pagehint.migration``) never imports the simulator or the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pagehint

PACKAGE = Path(pagehint.__file__).parent
# package -> packages it must not import
FORBIDDEN = {
    "device": ("pagehint.sim", "pagehint.cli", "pagehint.migration"),
    "migration": ("pagehint.sim", "pagehint.cli"),
    "sim": ("pagehint.cli",),
    "kvm": ("pagehint.sim", "pagehint.cli"),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"no modules in pagehint.{package}"
    bad = [
        f"{f.relative_to(PACKAGE)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if m.startswith(FORBIDDEN[package])
    ]
    assert bad == []


def test_the_vmm_side_loads_without_the_simulator() -> None:
    probe = (
        "import sys, pagehint, pagehint.device, pagehint.migration; "
        "print(sorted(m for m in sys.modules if m.startswith(('pagehint.sim', 'pagehint.cli'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_the_top_level_reexports_the_core() -> None:
    from pagehint import _core

    for name in ("DirtyBitmap", "MemoryMap", "SplitQueue", "PackedQueue", "apply_hints"):
        assert hasattr(pagehint, name) and name in pagehint.__all__
    assert pagehint.DirtyBitmap is _core.DirtyBitmap and pagehint.MemoryMap is _core.MemoryMap
